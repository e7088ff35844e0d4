"""Shared machinery of the per-step log-probability baselines (Flow-GRPO, DDPO).

Both baselines sample with their own stochastic sampler (one Gaussian transition per
denoising step), keep the trajectory ``latents [n, S+1, *L]`` and the per-step
log-probabilities ``log_probs [n, S]`` in ``Rollout.extras``, and train a PPO/GRPO clipped
ratio ``exp(log p_theta(x_{j+1} | x_j) - log p_old(x_{j+1} | x_j))`` over (a random subset
of) the denoising steps. Subclasses supply the schedule and the one-step transition.

Log-probabilities are reduced by a **mean** over latent dimensions, as in ddpo-pytorch's
``ddim_step_with_logprob`` and Flow-GRPO's ``sde_step_with_logprob``; that is why their
clip ranges are ~1e-4.

All selected ``(sample, step)`` rows of a minibatch go through the denoiser in one batched
forward (``B * k`` rows, doubled with CFG), the way FPO batches its ``B * N_mc`` rows.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch

from ..fpo import approx_kl
from ..policies.base import Cond, cond_cat, cond_index, cond_to, runnable_module
from .base import Algorithm

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-row log-density of ``N(mean, std^2 I)`` at ``x``, **mean** over non-batch dims.

    ``std`` broadcasts against ``x`` (``[n, 1, ...]``). float32 or float64 in, same out.
    """
    lp = -((x.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - LOG_SQRT_2PI
    return lp.reshape(lp.shape[0], -1).mean(dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


class StepwiseAlgorithm(Algorithm):
    """A baseline whose policy is the chain of per-step Gaussian transitions of its sampler."""

    def __init__(self, ctx):
        super().__init__(ctx)  # refuses a model family outside ``families``; ``acfg``: the ``section``
        s = self.ctx.sampling
        self.steps = int(s.steps)
        self.guidance = float(s.guidance_scale)
        self.height = int(s.height or self.policy.height)
        self.width = int(s.width or self.policy.width)
        self._build_schedule()

    # --- what subclasses define ------------------------------------------------------------
    @abstractmethod
    def _build_schedule(self) -> None:
        """Fill in the per-step schedule (tensors indexed by step ``j = 0 .. S-1``)."""

    @abstractmethod
    def model_time(self, j: torch.Tensor) -> torch.Tensor:
        """The denoiser's native time input at steps ``j`` (``[m]``)."""

    @abstractmethod
    def step(self, pred: torch.Tensor, j: torch.Tensor, x: torch.Tensor, *, prev_sample: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stochastic transition from ``x`` at steps ``j``: ``(x_next, log_prob, mean, std)``.

        Exactly one of ``prev_sample`` (evaluate its log-prob) and ``noise`` (draw ``x_next``).
        """

    init_noise_sigma: float = 1.0

    detach_uncond: bool = False
    """Detach the unconditional branch of CFG in training (Flow-GRPO's official code since 2025-07-15)."""

    def kl_variance(self, j: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The variance the KL to the base model divides by, ``[n, 1, ...]``: the transition's ``std^2``
        (DDPO); Flow-GRPO overrides it with its official ``std_dev_t^2``."""
        return std ** 2

    # --- the guided prediction ---------------------------------------------------------------
    def negative_rows(self, n: int) -> Cond | None:
        if self.guidance <= 1:
            return None
        neg = self.ctx.negative_cond
        if neg is None:
            neg = self.policy.negative_cond(1)
        return {k: v[:1].expand(n, *v.shape[1:]) for k, v in neg.items()}

    def predict(self, model: torch.nn.Module, x: torch.Tensor, j: torch.Tensor, cond: Cond,
                negative: Cond | None, detach_uncond: bool = False) -> torch.Tensor:
        """The (CFG-combined) prediction at rows ``x`` and steps ``j`` in float32 (float64 models: float64);
        ``detach_uncond``: no gradient through the unconditional branch."""
        mt = self.model_time(j)
        cdt = torch.float64 if self.policy.dtype == torch.float64 else torch.float32
        if negative is None:
            return self.policy.predict(x, mt, cond, model=model).to(cdt)
        both = cond_cat([cond_to(negative, x.device), cond_to(cond, x.device)])
        out = self.policy.predict(torch.cat([x, x]), torch.cat([mt, mt]), both, model=model).to(cdt)
        unc, con = out.chunk(2)
        if detach_uncond:
            unc = unc.detach()
        return unc + self.guidance * (con - unc)

    # --- rollout -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond, generators, negative_cond, iteration):
        n = len(generators)
        dev = self.policy.device
        cdt = torch.float64 if self.policy.dtype == torch.float64 else torch.float32
        shape = tuple(self.policy.latent_shape(self.height, self.width))
        model = runnable_module(self.ctx.model)
        was_training = model.training
        model.eval()
        neg = negative_cond if (negative_cond is not None and self.guidance > 1) else self.negative_rows(n)
        try:
            x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(dev, cdt) * self.init_noise_sigma
            traj, lps = [x], []
            for j in range(self.steps):
                jj = torch.full((n,), j, dtype=torch.long)
                pred = self.predict(model, x, jj, cond, neg)
                noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(dev, cdt)
                x, lp, _, _ = self.step(pred, jj, x, noise=noise)
                traj.append(x)
                lps.append(lp)
        finally:
            model.train(was_training)
        return x, {"latents": torch.stack(traj, 1), "log_probs": torch.stack(lps, 1)}

    # --- update ------------------------------------------------------------------------------
    def prepare(self, ro, iteration):
        if "latents" not in ro.extras:
            raise RuntimeError(f"algorithm {self.name!r} needs the trajectory from its own sampler in rollout extras")
        dev = self.ctx.device
        return {"latents": ro.extras["latents"].to(dev), "log_probs": ro.extras["log_probs"].to(dev)}

    @property
    def steps_per_update(self) -> int:
        """Denoising steps trained per sample and update: ``max(1, int(S * timestep_fraction))``."""
        return max(1, min(self.steps, int(self.steps * self.acfg.timestep_fraction)))

    def select_steps(self, ro, idx: torch.Tensor, iteration: int, epoch: int) -> torch.Tensor:
        """``[B, k]`` step indices per sample: a random subset, fixed per (sample, iteration, epoch)."""
        k = self.steps_per_update
        rows = []
        for gi in ro.global_idx[idx.cpu()].tolist():
            g = self.ctx.seeds.generator("step_subset", iteration, int(gi), multiple=epoch + 1)
            rows.append(torch.randperm(self.steps, generator=g)[:k] if k < self.steps else torch.arange(self.steps))
        return torch.stack(rows)

    def loss(self, ro, prep, idx, adv, *, iteration, epoch, step):
        a = self.acfg
        dev = self.ctx.device
        b = len(idx)
        j = self.select_steps(ro, idx, iteration, epoch)  # [B, k] (CPU)
        k = j.shape[1]
        jd = j.to(dev)
        lat = prep["latents"][idx]  # [B, S+1, *L]
        bi = torch.arange(b, device=dev).unsqueeze(1).expand(b, k)
        x = lat[bi, jd].reshape(b * k, *lat.shape[2:])
        x_next = lat[bi, jd + 1].reshape(b * k, *lat.shape[2:])
        lp_old = prep["log_probs"][idx][bi, jd].reshape(b * k)
        jf = j.reshape(b * k)
        cond = cond_index(ro.cond, idx)
        cond = {kk: v.repeat_interleave(k, dim=0) for kk, v in cond.items()}
        neg = self.negative_rows(b * k)
        with self.ctx.autocast():
            pred = self.predict(self.ctx.model, x, jf, cond, neg, detach_uncond=self.detach_uncond)
        _, lp_new, mean, std = self.step(pred, jf, x, prev_sample=x_next)
        log_ratio = lp_new - lp_old.to(lp_new.dtype)
        ratio = log_ratio.exp()
        adv_r = adv.to(ratio.dtype).repeat_interleave(k)
        unclipped = -adv_r * ratio
        clipped = -adv_r * ratio.clamp(1.0 - a.clip_range, 1.0 + a.clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
        with torch.no_grad():
            stats: dict[str, Any] = {
                "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                "clip_frac": ((ratio - 1.0).abs() > a.clip_range).float().mean(),
                "approx_kl": approx_kl(log_ratio),
            }
        if a.kl_beta > 0:
            model = runnable_module(self.ctx.model)
            with torch.no_grad(), self.policy.reference(), self.ctx.autocast():
                pred_ref = self.predict(model, x, jf, cond, neg)
                _, _, mean_ref, _ = self.step(pred_ref, jf, x, prev_sample=x_next)
            var = self.kl_variance(jf, std).reshape(b * k, -1)
            kl = ((mean - mean_ref) ** 2).reshape(b * k, -1).mean(1, keepdim=True) / (2 * var)
            kl = kl.mean()
            loss = loss + a.kl_beta * kl
            stats["kl_ref"] = kl.detach()
        return loss, stats


__all__ = ["StepwiseAlgorithm", "gaussian_log_prob", "LOG_SQRT_2PI"]
