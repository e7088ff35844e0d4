"""DiffusionNFT (Zheng et al., 2025) in the shared loop, for the flow families (SD3/3.5, FLUX).

The loss is :func:`fpo_diffusion.nft.nft_loss` (the official ``scripts/train_nft_sd3.py`` of
NVlabs/DiffusionNFT, lines 862-978; see that module for the formula). Around it, as the
official loop does:

* rollouts come from the **old** policy (the ``"old"`` adapter, lines 640-659): the stock
  pipeline with the ``sampling`` settings, run with the lagged weights swapped in; the
  official recipe is CFG-free (``sampling.guidance_scale=1``) and any sampler works;
* each sample trains on ``max(1, int(S * timestep_fraction))`` distinct times of the
  sampler's ``S``-step flow schedule, a random subset (lines 569, 810-816, 864), with
  ``v_old`` (old weights) and ``v_ref`` (base model, for the KL) at the same ``x_t``
  computed once in :meth:`prepare`;
* after the update the old weights move toward the trained ones,
  ``old <- d * old + (1 - d) * theta`` with ``d = min(max(0, k - flat) * rate, maximum)``
  after ``k`` iterations (``return_decay``, lines 169-189 and 1034-1039).

On the first minibatch of an iteration whose old policy equals the trained one (``d = 0``)
the gradient is the advantage-weighted flow-matching gradient, FPO's at ``rho == 1``
(``fpo_diffusion/nft.py``).
"""
from __future__ import annotations

import torch

from ..fpo import kl_penalty
from ..nft import nft_loss
from ..policies.base import cond_index
from .forward_process import ForwardProcessAlgorithm


class DiffusionNFT(ForwardProcessAlgorithm):
    """DiffusionNFT: implicit positive/negative policies on the forward process (config ``diffusion_nft``)."""

    name = "diffusion_nft"
    section = "diffusion_nft"

    def step_indices(self, generator):
        k = max(1, int(self.steps * self.acfg.timestep_fraction))
        return torch.randperm(self.steps, generator=generator)[:k]

    def decay_schedule(self):
        a = self.acfg
        return {"flat": a.old_decay_flat, "rate": a.old_decay_rate, "maximum": a.old_decay_max}

    def sample(self, cond, generators, negative_cond, iteration):
        """The stock pipeline, run by the old policy."""
        with self.lagged.swapped_in():
            return self.ctx.stock_sample(cond, generators, negative_cond, model=self.ctx.model), {}

    @torch.no_grad()
    def prepare(self, ro, iteration):
        t, eps = self.pairs(ro, iteration)
        prep = {"t": t, "eps": eps, "v_old": self.frozen_velocity(ro, t, eps, self.lagged.swapped_in())}
        if self.acfg.kl_beta > 0:
            prep["v_ref"] = self.frozen_velocity(ro, t, eps, self.policy.reference())
        return prep

    def loss(self, ro, prep, idx, adv, *, iteration, epoch, step):
        a = self.acfg
        x0 = ro.x0[idx]
        _, v = self.velocity(x0, cond_index(ro.cond, idx), prep["t"][idx], prep["eps"][idx])
        loss, stats = nft_loss(v, prep["v_old"][idx], x0.float(), prep["eps"][idx], prep["t"][idx], adv.float(),
                               beta=a.beta, adv_clip_max=a.adv_clip_max)
        if "v_ref" in prep:
            kl = kl_penalty(v, prep["v_ref"][idx]).mean()
            loss = loss + a.kl_beta * kl
            stats["kl_ref"] = kl.detach()
        return loss, stats


__all__ = ["DiffusionNFT"]
