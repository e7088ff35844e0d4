"""Flow-GRPO (Liu et al., 2025) in the shared loop, for the rectified-flow families (SD3/3.5, FLUX).

As yifan123/flow_grpo's code is today (commit ac4c86e, 2025-07-18; ``flow_grpo/diffusers_patch/
sd3_sde_with_logprob.py`` lines 40-70 and ``scripts/train_sd3.py`` lines 180-215, 796-897).

Sampling replaces the Euler ODE step of the flow scheduler by Flow-GRPO's SDE step with the same
marginals (``sde_step_with_logprob``): with ``sigma`` the current and ``sigma'`` the next noise level
(``dt = sigma' - sigma < 0``), velocity ``v``, noise level ``a`` and ``sigma_max`` the scheduler's
second sigma::

    std_dev_t = a * sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))   (line 47)
    mean      = x (1 + std_dev_t^2 dt / (2 sigma)) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt
    x'        = mean + std_dev_t sqrt(-dt) * eps

At the first step (``sigma = 1``) only the **denominator** takes ``sigma_max``; the numerator stays
``sigma = 1``. The step's log-probability is the Gaussian ``N(mean, (std_dev_t sqrt(-dt))^2)``
log-density at ``x'``, averaged over latent dims. The update is GRPO's clipped ratio over the
denoising steps; the options and their official defaults:

* ``timestep_selection: first``: every sample trains on the first ``int(S * timestep_fraction)``
  steps (``train_timesteps = range(num_train_timesteps)``, line 864); ``random``: a random subset;
* ``kl_beta``: KL to the frozen base model ``mean_d (mean - mean_ref)^2 / (2 std_dev_t^2)`` (line
  895), divided by the square of ``std_dev_t`` (the returned noise scale), **not** of the
  transition's std ``std_dev_t sqrt(-dt)``; official GenEval weight 0.04 (``config/grpo.py`` line 91);
* ``detach_uncond``: with CFG in training the unconditional branch is detached (line 190, since the
  official commit 2d76907 of 2025-07-15), so the gradient flows through ``g * v_cond`` only;
* ``filter_zero_advantage``: samples whose advantage is exactly 0 are left out of the update and the
  rest is split into the same number of minibatches (lines 796-823; padded with randomly chosen
  zero-advantage samples to a multiple of that number).
"""
from __future__ import annotations

import torch

from ..policies.schedulers import flow_sigmas
from .stepwise import StepwiseAlgorithm, _bcast, gaussian_log_prob


def sde_std_dev_t(sigma: torch.Tensor, *, noise_level: float, sigma_max: float) -> torch.Tensor:
    """Flow-GRPO's noise scale ``a * sqrt(sigma / (1 - sigma'))`` with ``sigma' = sigma_max`` where ``sigma >= 1``,
    else ``sigma`` (official line 47: only the denominator is replaced at the first step)."""
    denom = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_max), sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step_with_logprob(v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, x: torch.Tensor, *,
                          noise_level: float, sigma_max: float, prev_sample: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step for rows ``x`` with per-row ``sigma``, ``sigma_next`` (``[n]``).

    Returns ``(x_next, log_prob [n], mean, std)`` where ``std`` (``[n, 1, ...]``) is the
    transition's standard deviation ``std_dev_t * sqrt(-dt)`` (:func:`sde_std_dev_t` for the noise scale).
    """
    if (prev_sample is None) == (noise is None):
        raise ValueError("pass exactly one of prev_sample and noise")
    v = v.to(x.dtype)
    s = _bcast(sigma, x)
    s_next = _bcast(sigma_next, x)
    dt = s_next - s
    std_t = sde_std_dev_t(s, noise_level=noise_level, sigma_max=sigma_max)
    mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + std * noise.to(x.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std


class FlowGRPO(StepwiseAlgorithm):
    """Flow-GRPO: SDE rollouts with per-step log-probs, GRPO clip over steps (config ``flow_grpo``)."""

    name = "flow_grpo"
    families = ("sd3", "flux")
    section = "flow_grpo"

    def _build_schedule(self) -> None:
        self.sigmas = flow_sigmas(self.policy, self.steps, self.height, self.width)  # [S+1], last 0
        self.sigma_max = float(self.sigmas[1]) if self.steps > 1 else 0.99

    def model_time(self, j):
        return self.sigmas[j.cpu()].to(self.policy.device, torch.float32)

    def step(self, pred, j, x, *, prev_sample=None, noise=None):
        jc = j.cpu()
        sig = self.sigmas[jc].to(x.device, x.dtype)
        sig_next = self.sigmas[jc + 1].to(x.device, x.dtype)
        return sde_step_with_logprob(pred, sig, sig_next, x, noise_level=self.acfg.noise_level,
                                     sigma_max=self.sigma_max, prev_sample=prev_sample, noise=noise)

    # --- the official options (module docstring) -------------------------------------------
    @property
    def detach_uncond(self) -> bool:
        return bool(self.acfg.detach_uncond)

    def kl_variance(self, j: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``std_dev_t^2`` (``[n, 1, ...]``) of steps ``j``: the official KL's denominator (line 895)."""
        sig = self.sigmas[j.cpu()].to(std.device, std.dtype)
        st = sde_std_dev_t(sig, noise_level=self.acfg.noise_level, sigma_max=self.sigma_max)
        return st.reshape(std.shape) ** 2

    def select_steps(self, ro, idx, iteration, epoch):
        """``timestep_selection: first``: the first ``k`` steps for every sample (official); ``random``: a
        random subset per (sample, iteration, epoch)."""
        if self.acfg.timestep_selection == "first":
            return torch.arange(self.steps_per_update).expand(len(idx), -1)
        return super().select_steps(ro, idx, iteration, epoch)

    def update_subset(self, adv: torch.Tensor, iteration: int, n_minibatches: int, rank_key: int):
        """``filter_zero_advantage``: the indices of the samples with a nonzero advantage, padded with randomly
        chosen zero-advantage ones to a multiple of ``n_minibatches`` (at least ``n_minibatches``, so every rank
        takes the same steps; the official code would stop on a rank with none left)."""
        if not self.acfg.filter_zero_advantage:
            return None
        return zero_advantage_subset(adv, n_minibatches, self.ctx.seeds.generator("zero_adv_pad", iteration, rank_key))


def zero_advantage_subset(adv: torch.Tensor, n_minibatches: int, generator: torch.Generator) -> torch.Tensor:
    """Flow-GRPO's zero-advantage filter (``scripts/train_sd3.py`` lines 796-816): the sorted indices of the
    nonzero advantages; if their count is not a multiple of ``n_minibatches`` (or is 0), randomly chosen
    zero-advantage indices are added to make it one, where there are enough of them."""
    adv = adv.detach().cpu()
    keep = adv != 0
    count = int(keep.sum())
    short = (-count) % n_minibatches if count else n_minibatches
    zeros = torch.nonzero(~keep).flatten()
    if short and len(zeros) >= short:
        keep[zeros[torch.randperm(len(zeros), generator=generator)[:short]]] = True
    return torch.nonzero(keep).flatten()


__all__ = ["FlowGRPO", "sde_std_dev_t", "sde_step_with_logprob", "zero_advantage_subset"]
