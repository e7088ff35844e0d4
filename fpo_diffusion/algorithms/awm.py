"""AWM, Advantage Weighted Matching (Xue et al., 2025), in the shared loop, for the flow families.

The loss is :func:`fpo_diffusion.awm.awm_loss` on the per-pair losses of
:func:`~fpo_diffusion.awm.awm_pair_loss` (the official ``scripts/train_sd3_awm.py`` of
scxue/advantage_weighted_matching, lines 210-252 and 1265-1354): the flow-matching loss on the
policy's own samples, weighted by the advantage. **It is FPO with the ratio fixed at 1**: its
gradient is FPO's surrogate gradient at ``rho == 1`` (``ratio_mode: per_sample``, ``beta: 1``,
the same per-pair loss); FPO's ratio and clip are what differ once the policy has moved within
an iteration. Around the loss, as the official loop does:

* rollouts are on-policy (``off_policy = False``): the stock pipeline with the ``sampling``
  settings and the current weights (official: CFG-free, ``sampling.guidance_scale=1``);
* each sample trains on ``train_timesteps`` times of the sampler's flow schedule, one per
  stratum of the steps ``[1, int(S * timestep_fraction))`` (``time_type =
  "discrete_wo_init"``, lines 1197-1205; the official code shares the draw across a
  minibatch, here each sample has its own);
* two anchors at the same ``x_t``, computed once in :meth:`prepare`: ``kl_beta * mean (v -
  v_ref)^2`` to the base model and ``ema_kl_beta * mean (v - v_ema)^2`` to a lagged copy of the
  policy (lines 1272-1352), which after ``k`` iterations becomes ``d * ema + (1 - d) * theta``
  with ``d = min(k * ema_decay_rate, ema_decay_max)`` (lines 1409-1419).

The official configurations take one optimizer step per rollout (``gradient_accumulation_steps``
covers every minibatch); ``train.grad_accum_steps`` reproduces that here. With several steps per
iteration, the minibatches after the first optimizer step take the official ratio (lines 1224-1327,
``off_policy = False``): per pair ``rho = exp(l_old - l)`` with ``l_old`` the per-pair loss under the
weights the update started from (computed in :meth:`prepare`, only when the update takes more than one
step), and the surrogate ``mean max(-A rho, -A clip(rho, 1 - c, 1 + c))``, ``c = awm.clip_range``
(official 1); the first step's minibatches keep ``rho == 1`` (:func:`~fpo_diffusion.awm.awm_loss`).
"""
from __future__ import annotations

import math

import torch

from ..awm import awm_advantages, awm_loss, awm_pair_loss, awm_ratio_loss, stratified_step_indices
from ..fpo import kl_penalty
from ..policies.base import batch_slices, cond_index
from .forward_process import ForwardProcessAlgorithm


class AWM(ForwardProcessAlgorithm):
    """AWM: the advantage-weighted flow-matching loss on the policy's own samples (config ``awm``)."""

    name = "awm"
    section = "awm"

    def step_indices(self, generator):
        a = self.acfg
        u = torch.rand(a.train_timesteps, generator=generator)
        return stratified_step_indices(self.steps, a.train_timesteps, a.timestep_fraction, u)

    def decay_schedule(self):
        return {"flat": 0, "rate": self.acfg.ema_decay_rate, "maximum": self.acfg.ema_decay_max}

    @torch.no_grad()
    def prepare(self, ro, iteration):
        a = self.acfg
        t, eps = self.pairs(ro, iteration)
        prep = {"t": t, "eps": eps}
        if a.kl_beta > 0:
            prep["v_ref"] = self.frozen_velocity(ro, t, eps, self.policy.reference())
        if a.ema_kl_beta > 0:
            prep["v_ema"] = self.frozen_velocity(ro, t, eps, self.lagged.swapped_in())
        if self.several_steps(len(ro.x0)):  # the per-pair losses of the weights the update starts from
            prep["l_old"] = torch.cat([
                awm_pair_loss(self.velocity(ro.x0[mb], cond_index(ro.cond, mb), t[mb], eps[mb])[0], t[mb], a.weighting,
                              a.ghuber_power) for mb in batch_slices(len(ro.x0), self.ctx.train.minibatch_size)])
        return prep

    def several_steps(self, n_local: int) -> bool:
        """Whether an update of ``n_local`` samples takes more than one optimizer step."""
        tr = self.ctx.train
        return tr.epochs > 1 or math.ceil(n_local / tr.minibatch_size) > tr.grad_accum_steps

    def after_first_step(self, epoch: int, step: int) -> bool:
        """Whether minibatch ``step`` of ``epoch`` comes after the update's first optimizer step."""
        return epoch > 0 or step >= self.ctx.train.grad_accum_steps

    def loss(self, ro, prep, idx, adv, *, iteration, epoch, step):
        a = self.acfg
        t = prep["t"][idx]
        mse, v = self.velocity(ro.x0[idx], cond_index(ro.cond, idx), t, prep["eps"][idx])
        pair_loss = awm_pair_loss(mse, t, a.weighting, a.ghuber_power)
        adv_w = awm_advantages(adv.float(), a.adv_clip_max, a.advantage_max)
        if "l_old" in prep and self.after_first_step(epoch, step):
            loss, stats = awm_ratio_loss(pair_loss, prep["l_old"][idx], adv_w, a.clip_range)
        else:
            loss, stats = awm_loss(pair_loss, adv_w)
            if "l_old" in prep:  # the same stats in every minibatch (rho == 1 in the first step's)
                one = torch.ones((), device=pair_loss.device)
                stats.update(ratio_mean=one, ratio_min=one, ratio_max=one, clip_frac=one * 0)
        for name, weight in (("ref", a.kl_beta), ("ema", a.ema_kl_beta)):
            if f"v_{name}" in prep:
                kl = kl_penalty(v, prep[f"v_{name}"][idx]).mean()
                loss = loss + weight * kl
                stats[f"kl_{name}"] = kl.detach()
        return loss, stats


__all__ = ["AWM"]
