"""Flow-GRPO (Liu et al., 2025) in the shared loop, for the rectified-flow families (SD3/3.5, FLUX).

Sampling replaces the Euler ODE step of the flow scheduler by Flow-GRPO's SDE step with
the same marginals (``sde_step_with_logprob`` in yifan123/flow_grpo): with ``sigma`` the
current and ``sigma'`` the next noise level (``dt = sigma' - sigma < 0``), velocity ``v`` and
noise level ``a``::

    std_t = a * sqrt(sigma / (1 - sigma))              (sigma = 1 replaced by the 2nd sigma)
    mean  = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'    = mean + std_t sqrt(-dt) * eps

and the step's log-probability is the Gaussian ``N(mean, (std_t sqrt(-dt))^2)`` log-density
at ``x'``, averaged over latent dims. The update is GRPO's clipped ratio over the
denoising steps (a random ``timestep_fraction`` of them per sample and epoch), with an
optional KL to the frozen base model, ``||mean - mean_ref||^2 / (2 std^2)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .stepwise import StepwiseAlgorithm, _bcast, gaussian_log_prob


def sde_step_with_logprob(v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, x: torch.Tensor, *,
                          noise_level: float, sigma_max: float, prev_sample: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step for rows ``x`` with per-row ``sigma``, ``sigma_next`` (``[n]``).

    Returns ``(x_next, log_prob [n], mean, std)`` where ``std`` (``[n, 1, ...]``) is the
    transition's standard deviation ``std_t * sqrt(-dt)``.
    """
    if (prev_sample is None) == (noise is None):
        raise ValueError("pass exactly one of prev_sample and noise")
    v = v.to(x.dtype)
    s = _bcast(sigma, x)
    s_next = _bcast(sigma_next, x)
    dt = s_next - s
    s_safe = torch.where(s >= 1, torch.full_like(s, sigma_max), s)
    std_t = noise_level * torch.sqrt(s_safe / (1 - s_safe))
    mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + std * noise.to(x.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std


def flow_sigmas(policy, steps: int, height: int, width: int) -> torch.Tensor:
    """The noise levels ``[S+1]`` (float64, last 0) of the policy's flow scheduler for ``steps`` sampler
    steps: ``FlowMatchEulerDiscreteScheduler`` with the model's own config (its shift; FLUX's
    resolution-dependent shift as ``FluxPipeline`` computes it). ``sigmas[j]`` is step ``j``'s time
    ``t`` (the pipeline's ``timesteps / 1000``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(policy.base_scheduler.config)
    kw = {}
    if sched.config.get("use_dynamic_shifting", False):  # FLUX: resolution-dependent shift, as FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = policy.latent_shape(height, width)
        c = sched.config
        kw["mu"] = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256),
                                   c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                   c.get("max_shift", 1.15))
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(steps, device="cpu", **kw)
    sigmas = sched.sigmas.to(torch.float64).cpu()
    if len(sigmas) != steps + 1:
        raise ValueError(f"unexpected flow schedule of {len(sigmas)} sigmas for {steps} steps")
    return sigmas


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


__all__ = ["FlowGRPO", "flow_sigmas", "sde_step_with_logprob"]
