"""The AWM objective (Advantage Weighted Matching): pure tensor functions, no model code.

Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion
Models". The official code is scxue/advantage_weighted_matching (commit be51372); line
numbers below are of ``advantage_weighted_matching/scripts/train_sd3_awm.py`` there, defaults
of ``config/dgx_awm.py`` (``geneval_sd3_no_cfg_1node``, lines 31-98).

AWM is the policy gradient of the flow-matching loss on the policy's own samples, each pair
weighted by its sample's advantage::

    loss = mean_{b, i} A_b * l(v_theta(x_t, t), eps - x0, t)

where ``l`` is the per-pair flow-matching loss under a time weighting (``compute_log_prob_awm``,
lines 210-252, which returns ``-l``; ``mse = mean_d (v_theta - (eps - x0))^2``):

* ``uniform``: ``mse``;  ``t``: ``t * mse``;  ``t2``: ``t^2 * mse``;
* ``huber``: ``t * (sqrt(mse + 1e-10) - 1e-5)``;
* ``ghuber`` (the default, ``ghuber_power = 0.25``): ``t * ((mse + 1e-10)^p - (1e-10)^p) / p``,
  a generalised Huber loss whose gradient ``t (mse + 1e-10)^(p - 1) grad mse`` down-weights
  pairs with a large error.

The advantage is clipped and rescaled first (lines 1293-1299): ``A <- clamp(A, -5, 5) / 5 *
advantage_max`` (``adv_clip_max = 5``, ``advantage_max = 1``).

**Relation to FPO: AWM is FPO with the ratio fixed at 1.** The official code writes the loss as
a PPO surrogate ``mean(max(-A rho, -A clip(rho, 1 - c, 1 + c)))`` with ``rho = exp(l_old - l)``
per pair (``loss_type = "exp_first"``, lines 1301-1327), but in every shipped configuration one
optimizer step covers the whole rollout (``gradient_accumulation_steps`` = all minibatches) and
the old losses are the live ones detached (lines 1282-1284), so ``rho == 1`` identically and
the clip (``clip_range = 1``) never acts. At ``rho == 1`` the gradient of that surrogate is
``mean(A grad l)``: exactly the gradient of :func:`awm_loss`, and exactly the gradient of
FPO's surrogate (``fpo.fpo_loss``, ``ratio_mode="per_sample"``, ``beta=1``) at ``rho == 1``
(an invariant of docs/architecture.md). FPO differs only off-policy, where its ratio and clip bound the step;
AWM keeps weighting the flow-matching loss by ``A`` however far the policy has moved.
``tests/test_nft_awm.py`` checks both identities.

Times (``time_type = "discrete_wo_init"``, lines 1197-1205): ``train_timesteps = 6`` times per
sample from the sampler's own schedule, one per stratum of the step indices ``[1, K)``,
``K = int(steps * timestep_fraction)`` (``timestep_fraction = 0.9``), see
:func:`stratified_step_indices`. Regularisers: ``beta = 0.001`` times ``mean (v_theta -
v_ref)^2`` to the base model and ``ema_beta = 1`` times ``mean (v_theta - v_ema)^2`` to a
lagged copy of the policy (lines 1330-1352; ``kl_weight = kl_ema_weight = "Uniform"``), whose
weights trail the trained ones with ``decay = min(0.3, 0.001 * step)`` (lines 1409-1419).
"""
from __future__ import annotations

import torch

WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
"""Time weightings of the per-pair loss (official names ``Uniform``, ``t``, ``t**2``, ``huber``, ``ghuber``)."""
MSE_FLOOR = 1e-10
"""Added to the squared error under the roots (``+ 1e-10``, lines 247 and 249)."""


def awm_pair_loss(mse: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber", power: float = 0.25) -> torch.Tensor:
    """The per-pair loss ``l`` from the per-pair mean squared velocity error ``mse`` at times ``t`` (same shape)."""
    if weighting == "uniform":
        return mse
    if weighting == "t":
        return mse * t
    if weighting == "t2":
        return mse * t ** 2
    if weighting == "huber":
        return (torch.sqrt(mse + MSE_FLOOR) - MSE_FLOOR ** 0.5) * t
    if weighting == "ghuber":
        return ((mse + MSE_FLOOR) ** power - MSE_FLOOR ** power) * t / power
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def awm_advantages(advantages: torch.Tensor, adv_clip_max: float = 5.0, advantage_max: float = 1.0) -> torch.Tensor:
    """``clamp(A, -adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max`` (lines 1293-1299)."""
    return advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max


def awm_loss(l_new: torch.Tensor, advantages: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``mean_{b, i} A_b * l_new[b, i]``: the advantage-weighted matching loss (a scalar to minimise).

    ``l_new [B, N]`` per-pair losses (:func:`awm_pair_loss`) of the current policy on its own
    samples, ``advantages [B]`` (already :func:`awm_advantages`). Stats (detached):
    ``matching_loss`` (the unweighted mean of ``l_new``), ``positive_share`` (share of samples
    with ``A > 0``).
    """
    if l_new.dim() != 2 or advantages.shape != l_new.shape[:1]:
        raise ValueError(f"l_new must be [B, N] and advantages [B]; got {tuple(l_new.shape)} and "
                         f"{tuple(advantages.shape)}")
    loss = (advantages.to(l_new.dtype).reshape(-1, 1) * l_new).mean()
    with torch.no_grad():
        stats = {"matching_loss": l_new.detach().mean(), "positive_share": (advantages > 0).float().mean()}
    return loss, stats


def awm_ratio_loss(l_new: torch.Tensor, l_old: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official surrogate on minibatches after the first optimizer step of a rollout (lines 1224-1327,
    ``loss_type = "exp_first"``, ``off_policy = False``): per pair ``rho = exp(l_old - l_new)`` with ``l_old``
    the per-pair loss of the weights the rollout's update started from (detached), and
    ``mean_{b, i} max(-A_b rho, -A_b clip(rho, 1 - c, 1 + c))``. ``l_new``, ``l_old`` ``[B, N]``, ``advantages [B]``
    (already :func:`awm_advantages`). At ``rho == 1`` its gradient is :func:`awm_loss`'s."""
    if l_new.shape != l_old.shape or l_new.dim() != 2 or advantages.shape != l_new.shape[:1]:
        raise ValueError(f"l_new and l_old must be [B, N] and advantages [B]; got {tuple(l_new.shape)}, "
                         f"{tuple(l_old.shape)} and {tuple(advantages.shape)}")
    ratio = torch.exp(l_old.detach().to(l_new.dtype) - l_new)
    a = advantages.to(l_new.dtype).reshape(-1, 1)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)).mean()
    with torch.no_grad():
        stats = {"matching_loss": l_new.detach().mean(), "positive_share": (advantages > 0).float().mean(),
                 "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                 "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean()}
    return loss, stats


def stratified_step_indices(steps: int, n_times: int, timestep_fraction: float, u: torch.Tensor) -> torch.Tensor:
    """AWM's ``discrete_wo_init`` draw of sampler-step indices (lines 1197-1203).

    ``K = int(steps * timestep_fraction)``; the boundaries ``linspace(1, K, n_times + 1)`` truncated to
    integers split ``[1, K)`` into ``n_times`` strata and ``u`` (``[..., n_times]`` uniforms in
    ``[0, 1)``) picks ``lower + floor(u * (upper - lower))`` in each (a stratum of width 0 gives its
    lower bound). Step 0 (pure noise, ``t = 1``) is never drawn.
    """
    k = int(steps * timestep_fraction)
    if k < 2:
        raise ValueError(f"int(steps * timestep_fraction) = {k}: AWM needs at least two sampler steps to draw from")
    bounds = torch.linspace(1, k, n_times + 1, dtype=torch.float32)
    lower, upper = bounds[:-1].long(), bounds[1:].long()
    return lower + (u * (upper - lower)).long()


__all__ = ["MSE_FLOOR", "WEIGHTINGS", "awm_advantages", "awm_loss", "awm_pair_loss", "awm_ratio_loss",
           "stratified_step_indices"]
