"""``fpo.beta: auto``: the FPO ratio's temperature, adapted once per iteration toward a target.

FPO's log-ratio is ``beta * (L_old - L_new)``. With the CFM loss averaged over 10^4-10^5
latent dimensions the difference is ~1e-3 per update, so with a fixed ``beta`` the ratio stays
within ~1 % of 1 and the PPO clip never binds (docs/architecture.md, "The ratio's scale"). The controller
below adapts ``beta`` so that a measured statistic of the ratio sits near a target:

* ``clip_frac``: the fraction of ratio terms outside ``[1 - eps_clip, 1 + eps_clip]`` over the
  iteration's update (``fpo/clip_frac``);
* ``log_ratio_std``: the spread of ``log rho`` over the iteration's update (``fpo/log_ratio_std``),
  which for a given policy move is proportional to ``beta``.

The rule is PPO's adaptive-KL rule (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms", section 4: ``d < d_targ / 1.5 -> beta / 2``; ``d > d_targ * 1.5 -> beta * 2``)
turned around, because here ``beta`` is a temperature (a larger ``beta`` gives a larger
statistic) rather than a penalty weight::

    measured < target / tolerance  ->  beta <- beta * rate
    measured > target * tolerance  ->  beta <- beta / rate
    otherwise                      ->  beta unchanged
    beta <- clamp(beta, beta_min, beta_max)

Defaults ``rate = 2``, ``tolerance = 1.5`` are PPO's. For a statistic proportional to
``beta`` (``log_ratio_std``) a step can never jump over the band when ``rate <= tolerance ** 2``
(the band ``[target / tolerance, target * tolerance]`` is ``tolerance ** 2`` wide), so the
controller settles instead of cycling; the configuration enforces that bound. A non-finite
measurement (a skipped update) leaves ``beta`` unchanged.

Pure: :func:`update_beta` takes the state and the measurement and returns the new state; the
FPO algorithm (``algorithms/fpo.py``) calls it once per iteration and checkpoints the state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

STATISTICS = ("clip_frac", "log_ratio_std")
"""What ``beta: auto`` can aim at (keys of ``fpo_loss``'s stats)."""
LOG_RATIO_STD_MAX = 1.0
"""The largest ``log_ratio_std`` target: a spread of 1 already puts ratios at ``e^-1..e^1`` (0.37..2.7), far
outside any PPO clip range, so every term is clipped and a larger target only drives ``beta`` (and the ratio)
to overflow (issue 24: ``target=1e30`` took ``beta`` from 5 to 2.6e6 and the ratio to inf)."""


@dataclass
class BetaController:
    """Settings of the adaptive temperature, defined here once: ``config.BetaAutoConfig`` (``fpo.beta_auto``)
    extends this class, so these fields, defaults and ranges are the config's ``fpo.beta_auto.*``."""

    statistic: str = "clip_frac"
    """The measured statistic, one of :data:`STATISTICS`: ``clip_frac`` (share of ratio terms outside the clip
    range, ``fpo/clip_frac``) or ``log_ratio_std`` (spread of ``log rho``, ``fpo/log_ratio_std``)."""
    target: float = 0.1
    """Its target value (``clip_frac``: in ``(0, 1)``; ``log_ratio_std``: in ``(0, 1]``, :data:`LOG_RATIO_STD_MAX`:
    a spread of 1 already puts the ratios at 0.37..2.7, outside any clip range)."""
    rate: float = 2.0
    """Multiplicative step per iteration (> 1 and <= ``tolerance ** 2``; PPO's 2)."""
    tolerance: float = 1.5
    """No-change band ``[target / tolerance, target * tolerance]`` (finite, > 1; PPO's 1.5)."""
    beta_min: float = 1e-3
    """Lower clamp on ``beta`` (> 0)."""
    beta_max: float = 1e7
    """Upper clamp on ``beta`` (finite, >= ``beta_min``)."""

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"fpo.beta_auto.statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        if self.statistic == "clip_frac" and not 0 < self.target < 1:
            raise ValueError(f"fpo.beta_auto.target must be in (0, 1) for clip_frac, got {self.target}")
        if not 0 < self.target < math.inf:
            raise ValueError(f"fpo.beta_auto.target must be a finite number > 0, got {self.target}")
        if self.statistic == "log_ratio_std" and self.target > LOG_RATIO_STD_MAX:
            raise ValueError(f"fpo.beta_auto.target must be in (0, {LOG_RATIO_STD_MAX:g}] for log_ratio_std, got "
                             f"{self.target:g} (a log-ratio spread of 1 already puts the ratios at 0.37..2.7, outside "
                             f"any clip range: a larger target only drives beta and the ratio to overflow)")
        if not 1 < self.tolerance < math.inf:
            raise ValueError(f"fpo.beta_auto.tolerance must be a finite number > 1, got {self.tolerance}")
        if not 1 < self.rate <= self.tolerance ** 2:
            raise ValueError(f"fpo.beta_auto.rate must be in (1, tolerance^2 = {self.tolerance ** 2:g}], got {self.rate} "
                             f"(a larger step jumps over the no-change band and the temperature cycles)")
        if not 0 < self.beta_min <= self.beta_max < math.inf:
            raise ValueError(f"fpo.beta_auto needs 0 < beta_min <= beta_max < inf, got beta_min={self.beta_min}, "
                             f"beta_max={self.beta_max}")


@dataclass(frozen=True)
class BetaState:
    """What the controller carries from one iteration to the next (checkpointed)."""

    beta: float
    """The temperature used by the next iteration."""
    updates: int = 0
    """Iterations measured so far."""


def update_beta(state: BetaState, measured: float, ctl: BetaController) -> BetaState:
    """The state after one iteration whose update measured ``measured`` (see the module docstring)."""
    beta = state.beta
    if math.isfinite(measured):
        if measured < ctl.target / ctl.tolerance:
            beta = beta * ctl.rate
        elif measured > ctl.target * ctl.tolerance:
            beta = beta / ctl.rate
    beta = min(max(beta, ctl.beta_min), ctl.beta_max)
    return BetaState(beta=beta, updates=state.updates + 1)


__all__ = ["BetaController", "BetaState", "STATISTICS", "update_beta"]
