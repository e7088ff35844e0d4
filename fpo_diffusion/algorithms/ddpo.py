"""DDPO (Black et al., 2023) in the shared loop, for the VP families (SD1.x/2.x, SDXL).

Sampling is DDIM with ``eta`` (1 by default: DDPM-like stochastic steps), as in
ddpo-pytorch's ``ddim_step_with_logprob``: with ``a_t``/``a_prev`` the cumulative alphas of
the current and previous timestep, the predicted ``x0`` and ``eps`` (from an eps- or
v-prediction), ``var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)`` and
``std = eta * sqrt(var)``::

    mean = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps_hat
    x'   = mean + std * eps

The step's log-probability is the Gaussian log-density at ``x'`` averaged over latent dims;
the update is PPO's clipped ratio over (a ``timestep_fraction`` of) the denoising steps.
"""
from __future__ import annotations

import torch

from .stepwise import StepwiseAlgorithm, _bcast, gaussian_log_prob


def ddim_step_with_logprob(model_output: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
                           x: torch.Tensor, *, eta: float, prediction_type: str = "epsilon",
                           prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step with ``eta`` for rows ``x`` with per-row cumulative alphas (``[n]``).

    Returns ``(x_next, log_prob [n], mean, std)``; no sample clipping (SD's schedulers use
    ``clip_sample=False``).
    """
    if (prev_sample is None) == (noise is None):
        raise ValueError("pass exactly one of prev_sample and noise")
    if eta <= 0:
        raise ValueError("ddpo.eta must be > 0: a deterministic step has no log-probability")
    out = model_output.to(x.dtype)
    a_t = _bcast(alpha_t, x)
    a_p = _bcast(alpha_prev, x)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0_hat = (x - b_t.sqrt() * out) / a_t.sqrt()
        eps_hat = out
    elif prediction_type == "v_prediction":
        x0_hat = a_t.sqrt() * x - b_t.sqrt() * out
        eps_hat = a_t.sqrt() * out + b_t.sqrt() * x
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    var = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * var.clamp_min(0).sqrt()
    mean = a_p.sqrt() * x0_hat + (1 - a_p - std ** 2).clamp_min(0).sqrt() * eps_hat
    if prev_sample is None:
        prev_sample = mean + std * noise.to(x.dtype)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std


class DDPO(StepwiseAlgorithm):
    """DDPO: DDIM(eta) rollouts with per-step log-probs, PPO clip over steps (config ``ddpo``)."""

    name = "ddpo"
    families = ("sd", "sdxl")
    section = "ddpo"

    def _build_schedule(self) -> None:
        from diffusers import DDIMScheduler

        base = self.policy.base_scheduler
        cfg = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
        cfg.update(clip_sample=False)
        sched = DDIMScheduler.from_config(cfg)
        sched.set_timesteps(self.steps, device="cpu")
        ts = sched.timesteps.long().cpu()  # [S], descending
        acp = self.policy.alphas_cumprod.to(torch.float64).cpu()
        prev = ts - sched.config.num_train_timesteps // self.steps
        final = torch.tensor(1.0, dtype=torch.float64) if sched.config.set_alpha_to_one else acp[0]
        self.timesteps = ts
        self.alpha_t = acp[ts]
        self.alpha_prev = torch.where(prev >= 0, acp[prev.clamp_min(0)], final)
        self.init_noise_sigma = float(sched.init_noise_sigma)

    def model_time(self, j):
        return self.timesteps[j.cpu()].to(self.policy.device)

    def step(self, pred, j, x, *, prev_sample=None, noise=None):
        jc = j.cpu()
        return ddim_step_with_logprob(pred, self.alpha_t[jc].to(x.device, x.dtype),
                                      self.alpha_prev[jc].to(x.device, x.dtype), x, eta=self.acfg.eta,
                                      prediction_type=self.policy.prediction_type, prev_sample=prev_sample,
                                      noise=noise)


__all__ = ["DDPO", "ddim_step_with_logprob"]
