"""The FPO objective: pure tensor functions, no model code.

Notation (docs/architecture.md, "The objective and what the tests pin"):

* ``l_old[b, i]``: per-sample CFM loss of the rollout policy at the pair ``(t_i, eps_i)``
  of sample ``b``, computed without grad right after the rollout;
* ``l_new[b, i]``: the same loss under the current parameters, same ``(t_i, eps_i)``;
* ``advantages[b]``: group-normalised advantage of sample ``b``.

Two ratio modes:

* ``"mean"`` (FPO paper): ``rho_b = exp(beta * clamp(mean_i l_old - mean_i l_new, -delta, delta))``;
* ``"per_sample"`` (FPO++): ``rho_bi = exp(beta * clamp(l_old_bi - l_new_bi, -delta, delta))``,
  one PPO term per ``(b, i)``, averaged.

``l`` is the CFM loss averaged over the ``D`` latent dimensions (what ``Policy.cfm_loss``
returns). With ``ratio_reduction="sum"`` the ratio uses the sum over dimensions instead, as
the FPO paper writes the loss (a squared norm): the difference ``l_old - l_new`` is multiplied
by ``D`` before the clamp, which makes the log-ratio ``D`` times larger at the same ``beta``.

Surrogate (to minimise): ``-mean(min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A))``.
With ``negative_adv="spo"`` samples with ``A < 0`` use the SPO penalty instead of the
clip (FPO++'s asymmetric trust region):
``rho A - |A| / (2 eps_low) * (rho - 1)^2``, whose optimum in ``rho`` sits exactly at the
clip boundary ``1 - eps_low`` but whose gradient never vanishes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RATIO_MODES = ("mean", "per_sample")
RATIO_REDUCTIONS = ("mean", "sum")
NEGATIVE_ADV_MODES = ("clip", "spo")


@dataclass
class FPOSurrogate:
    """The surrogate's settings, defined here once: ``config.FPOConfig`` (the ``fpo`` section) extends this
    class, so these fields, defaults and ranges are the config's ``fpo.*`` of the same names."""

    ratio_mode: str = "mean"
    """``mean`` (FPO paper: average the N_mc losses, then exp) or ``per_sample`` (FPO++)."""
    beta: float = 5.0
    """Scale on the loss difference inside the exp (finite, > 0); sets how far the ratio moves per step."""
    ratio_reduction: str = "mean"
    """How the CFM loss is reduced over latent dims inside the ratio: ``mean`` (per-dimension mean) or ``sum``
    (the FPO paper's squared norm: the log-ratio grows by the number of latent dims, 16k-65k for SD-size
    latents, so ``beta`` must shrink by as much; ``beta: auto`` finds it)."""
    delta: float | None = None
    """Clamp on the (``beta``-free) loss difference before the exp (> 0); ``None`` (or ``inf``): no clamp."""
    eps_clip: float = 0.2
    """PPO clip range below 1 (and above 1 unless ``eps_clip_high`` is set), in ``(0, 1)``."""
    eps_clip_high: float | None = None
    """Separate upper clip range (``1 + eps_clip_high``; finite, > 0); ``None``: same as ``eps_clip``."""
    negative_adv: str = "clip"
    """``clip`` (PPO clip for every sample) or ``spo`` (SPO penalty for ``A < 0``, FPO++)."""

    def check_surrogate(self, beta: float) -> None:
        """ValueError unless the settings (with the numeric temperature ``beta``) are in range."""
        if self.ratio_mode not in RATIO_MODES:
            raise ValueError(f"fpo.ratio_mode must be one of {RATIO_MODES}, got {self.ratio_mode!r}")
        if self.negative_adv not in NEGATIVE_ADV_MODES:
            raise ValueError(f"fpo.negative_adv must be one of {NEGATIVE_ADV_MODES}, got {self.negative_adv!r}")
        if not beta > 0:
            raise ValueError(f"fpo.beta must be > 0, got {beta}")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"fpo.delta must be > 0, got {self.delta}")
        if not 0 < self.eps_clip < 1:
            raise ValueError(f"fpo.eps_clip must be in (0, 1), got {self.eps_clip}")


@dataclass
class FPOObjective(FPOSurrogate):
    """Hyper-parameters of the FPO surrogate (see the module docstring): the settings plus the latent size."""

    latent_dims: int = 1
    """``D``, the number of latent dimensions of one sample (used by ``ratio_reduction="sum"``)."""

    def __post_init__(self):
        if self.ratio_reduction not in RATIO_REDUCTIONS:
            raise ValueError(f"fpo.ratio_reduction must be one of {RATIO_REDUCTIONS}, got {self.ratio_reduction!r}")
        if not (isinstance(self.latent_dims, int) and self.latent_dims >= 1):
            raise ValueError(f"latent_dims must be an integer >= 1, got {self.latent_dims!r}")
        self.check_surrogate(self.beta)


def fpo_log_ratio(l_old: torch.Tensor, l_new: torch.Tensor, *, ratio_mode: str = "mean",
                  beta: float = 1.0, delta: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """Log of the FPO ratio: ``beta * clamp(scale * (l_old - l_new), -delta, delta)``.

    ``l_old``/``l_new`` are ``[B, N]``. Returns ``[B, 1]`` for ``"mean"`` and ``[B, N]`` for
    ``"per_sample"``. ``l_old`` is treated as a constant. ``scale``: the number of latent dims for
    ``ratio_reduction="sum"`` (the losses are per-dimension means), else 1. ``delta``: ``None`` or ``inf``, no clamp.
    """
    if l_old.shape != l_new.shape or l_old.dim() != 2:
        raise ValueError(f"l_old and l_new must both be [B, N]; got {tuple(l_old.shape)} and {tuple(l_new.shape)}")
    diff = l_old.detach() - l_new
    if scale != 1:
        diff = diff * scale
    if ratio_mode == "mean":
        diff = diff.mean(dim=1, keepdim=True)
    elif ratio_mode != "per_sample":
        raise ValueError(f"unknown ratio_mode {ratio_mode!r}; expected one of {RATIO_MODES}")
    if delta is not None and math.isfinite(delta):
        diff = diff.clamp(-delta, delta)
    return beta * diff


def fpo_loss(l_old: torch.Tensor, l_new: torch.Tensor, advantages: torch.Tensor,
             objective: FPOObjective | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The FPO clipped surrogate (a scalar to minimise) and its diagnostics.

    Args:
        l_old: ``[B, N]`` CFM losses at rollout time (no grad needed).
        l_new: ``[B, N]`` CFM losses under the current parameters, same ``(t, eps)``.
        advantages: ``[B]`` advantages.
        objective: hyper-parameters (``None``: the defaults).

    Returns:
        ``(loss, stats)`` where ``stats`` holds detached scalars: ``ratio_mean``,
        ``ratio_min``, ``ratio_max``, ``clip_frac``, ``approx_kl`` (k3 estimator
        ``(rho - 1) - log rho``), ``log_ratio_std`` (the spread of ``log rho`` over the terms),
        ``loss_diff_mean``, ``loss_diff_std``, ``loss_diff_absmax`` (of the per-dimension
        ``l_old - l_new``, before ``beta`` and the ``sum`` reduction) and ``delta_clamp_frac``.
    """
    o = FPOObjective() if objective is None else objective
    delta = math.inf if o.delta is None else o.delta
    scale = float(o.latent_dims) if o.ratio_reduction == "sum" else 1.0
    log_ratio = fpo_log_ratio(l_old, l_new, ratio_mode=o.ratio_mode, beta=o.beta, delta=delta, scale=scale)
    ratio = log_ratio.exp()
    adv = advantages.to(ratio.dtype).reshape(-1, 1).expand_as(ratio)
    lo, hi = 1.0 - o.eps_clip, 1.0 + (o.eps_clip if o.eps_clip_high is None else o.eps_clip_high)
    unclipped = ratio * adv
    clipped = ratio.clamp(lo, hi) * adv
    objective_terms = torch.minimum(unclipped, clipped)
    if o.negative_adv == "spo":
        spo = ratio * adv - adv.abs() / (2.0 * o.eps_clip) * (ratio - 1.0) ** 2
        objective_terms = torch.where(adv < 0, spo, objective_terms)
    loss = -objective_terms.mean()

    with torch.no_grad():
        diff = (l_old.detach() - l_new.detach()).float()
        if o.ratio_mode == "mean":
            diff_r = diff.mean(dim=1, keepdim=True) * scale
        else:
            diff_r = diff * scale
        r = ratio.detach().float()
        stats = {
            "ratio_mean": r.mean(),
            "ratio_min": r.min(),
            "ratio_max": r.max(),
            "clip_frac": ((r < lo) | (r > hi)).float().mean(),
            "approx_kl": approx_kl(log_ratio.detach().float()),
            "log_ratio_std": log_ratio.detach().float().std(unbiased=False),
            "loss_diff_mean": diff.mean(),
            "loss_diff_std": diff.std(unbiased=False),
            "loss_diff_absmax": diff.abs().max(),
            "delta_clamp_frac": (diff_r.abs() > delta).float().mean(),
        }
    return loss, stats


def kl_penalty(pred: torch.Tensor, pred_ref: torch.Tensor) -> torch.Tensor:
    """``mean((v_theta - v_ref)^2)`` per sample: the KL anchor to the frozen base model.

    For Gaussian transition kernels with a shared variance, the KL between the policy and
    reference one-step distributions at the same ``x_t`` is proportional to the squared
    difference of their predictions; the constant is absorbed into ``kl_beta``.
    Shapes ``[B, N, ...]`` (or any ``[B, ...]``); returns ``[B]``.
    """
    d = (pred.float() - pred_ref.detach().float()) ** 2
    return d.flatten(1).mean(dim=1)


def approx_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of ``KL(old || new)`` from log-ratios ``log(p_new / p_old)`` of samples of the old
    policy: ``mean((rho - 1) - log rho)`` (non-negative, unbiased; CleanRL's and TRL's ``approx_kl``).

    Every algorithm reports this one estimator under ``<algorithm>/approx_kl``, so values compare
    across algorithms (for FPO ``log rho`` is the ``beta``-scaled CFM-loss difference).
    """
    return (log_ratio.exp() - 1.0 - log_ratio).mean()
