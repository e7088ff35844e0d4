"""The DiffusionNFT objective: pure tensor functions, no model code.

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process". The
official code is NVlabs/DiffusionNFT (commit 24af555); line numbers below are of
``scripts/train_nft_sd3.py`` there, defaults of ``config/base.py`` and ``config/nft.py``.

Flow convention (rectified flow, as SD3/FLUX): ``x_t = (1 - t) x0 + t eps``, velocity target
``v = eps - x0``, and a velocity ``u`` predicts the clean sample ``x0_hat(u) = x_t - t u``
(lines 870, 940).

With ``v_theta`` the trained policy's velocity and ``v_old`` the rollout ("old") policy's at the
same ``x_t`` (lines 873-892), DiffusionNFT trains two *implicit* policies (lines 934-937)::

    v+ = beta v_theta + (1 - beta) v_old        the positive policy
    v- = (1 + beta) v_old - beta v_theta        the negative policy (v+ mirrored about v_old)

and maps the advantage ``A`` to an optimality probability (lines 910-929, ``m = adv_clip_max``)::

    r = clamp(clamp(A, -m, m) / m / 2 + 1/2, 0, 1)        in [0, 1]; A = 0 gives 1/2

Each implicit policy gets a flow-matching loss on ``x0`` with the *adaptive weight* (lines
939-957): the squared error divided by its own mean absolute error, held constant::

    L+ = mean_d (x0_hat(v+) - x0)^2 / sg(max(mean_d |x0_hat(v+) - x0|, 1e-5))
    L- = the same with v-

    loss = mean_{b, i} m * (r L+ + (1 - r) L-) / beta                     (lines 959-960)

Since ``x0_hat(u) - x0 = -t (u - v)``, the adaptive weight turns ``t^2 ||u - v||^2`` into
``t ||u - v||^2 / mean|u - v|``: no hand-tuned time weighting is needed.

**Relation to FPO / AWM.** On-policy (``v_theta == v_old``) both implicit policies equal
``v_theta``, both weights agree, and the gradient is ``clamp(A, -m, m) * grad l_w`` with
``l_w`` the adaptive-weighted CFM loss of ``v_theta``: an advantage-weighted flow-matching
gradient, the same direction as AWM's and as FPO's surrogate at ``rho == 1`` (for the
weighted loss); ``beta`` cancels there. Off-policy the two differ: FPO clips a likelihood
ratio, DiffusionNFT keeps ``v_theta`` close to ``v_old`` only through ``beta`` and the ``1/beta``
scale (``beta -> 0`` is a trust region of vanishing size). ``tests/test_nft_awm.py`` checks the
on-policy identity.

Official defaults (``config/nft.py`` ``_get_config`` / ``sd3_geneval``): ``beta = 1.0``
(0.1 for OCR and multi-reward), ``adv_clip_max = 5``, a KL to the base model of weight
``train.beta = 1e-4`` on ``mean (v_theta - v_ref)^2`` (lines 966-970), ``timestep_fraction =
0.99`` of the 10 sampler steps per sample, CFG-free rollouts (``guidance_scale = 1``) with the
old policy, which trails the trained one: after each update ``old <- decay * old + (1 - decay) *
theta`` (lines 1034-1039) with ``decay = min(0.001 * step, 0.5)`` (``decay_type = 1``,
:func:`fpo_diffusion.lagged.lag_decay`).
"""
from __future__ import annotations

import torch

WEIGHT_FLOOR = 1e-5
"""Lower clamp of the adaptive weight (``.clip(min=0.00001)``, lines 945 and 953)."""


def nft_optimality(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """``r = clamp(clamp(A, -m, m) / m / 2 + 1/2, 0, 1)``: the advantage as an optimality probability."""
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def adaptive_x0_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``mean_d (x0_hat - x0)^2 / sg(max(mean_d |x0_hat - x0|, 1e-5))`` per pair.

    ``x0_hat [B, N, *L]``, ``x0`` broadcastable to it; returns ``[B, N]``. The weight is computed
    in float64, as the official code does."""
    err = x0_hat - x0
    dims = tuple(range(2, err.dim()))
    with torch.no_grad():
        w = err.double().abs().mean(dim=dims).clamp(min=WEIGHT_FLOOR).to(err.dtype)
    return (err ** 2).mean(dim=dims) / w


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, *, beta: float = 1.0, adv_clip_max: float = 5.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT loss (a scalar to minimise) and its diagnostics.

    Args:
        v_theta: ``[B, N, *L]`` velocities of the trained policy at ``x_t`` (differentiable).
        v_old: ``[B, N, *L]`` velocities of the old (rollout) policy at the same ``x_t`` (constant).
        x0: ``[B, *L]`` the rollout's clean samples.
        eps: ``[B, N, *L]`` the noise of each of the ``N`` pairs.
        t: ``[B, N]`` the times of the pairs.
        advantages: ``[B]``.
        beta: the implicit policies' step (> 0).
        adv_clip_max: ``m``: the advantage clip and the loss scale.

    Returns:
        ``(loss, stats)``; ``stats`` (detached): ``positive_loss``, ``negative_loss`` (means of
        ``L+`` and ``L-``), ``optimality_mean`` (of ``r``), ``old_deviate`` (``mean (v_theta -
        v_old)^2``).
    """
    b, n = t.shape
    if v_theta.shape != v_old.shape or v_theta.shape[:2] != (b, n) or eps.shape != v_theta.shape \
            or x0.shape != (b, *v_theta.shape[2:]) or advantages.shape != (b,):
        raise ValueError(f"shape mismatch: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)}, x0 "
                         f"{tuple(x0.shape)}, eps {tuple(eps.shape)}, t {tuple(t.shape)}, advantages "
                         f"{tuple(advantages.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dt = v_theta.dtype
    v_old = v_old.detach().to(dt)
    tt = t.to(dt).reshape(b, n, *([1] * (v_theta.dim() - 2)))
    x0r = x0.to(dt).unsqueeze(1)
    x_t = (1 - tt) * x0r + tt * eps.to(dt)

    v_pos = beta * v_theta + (1 - beta) * v_old  # implicit positive policy
    v_neg = (1 + beta) * v_old - beta * v_theta  # implicit negative policy
    loss_pos = adaptive_x0_loss(x_t - tt * v_pos, x0r)  # [B, N]
    loss_neg = adaptive_x0_loss(x_t - tt * v_neg, x0r)
    r = nft_optimality(advantages.to(dt), adv_clip_max).reshape(b, 1)
    per_pair = (r * loss_pos + (1 - r) * loss_neg) / beta
    loss = (per_pair * adv_clip_max).mean()

    with torch.no_grad():
        stats = {
            "positive_loss": loss_pos.mean(),
            "negative_loss": loss_neg.mean(),
            "optimality_mean": r.mean(),
            "old_deviate": ((v_theta.detach() - v_old) ** 2).mean(),
        }
    return loss, stats


__all__ = ["WEIGHT_FLOOR", "adaptive_x0_loss", "nft_loss", "nft_optimality"]
