"""FPO in the shared loop: fixed ``(t, eps)`` pairs, old CFM losses, the clipped FPO ratio,
plus the optional KL anchor to the frozen base model and flow-matching anchor.

With ``fpo.beta: auto`` the ratio's temperature is adapted once per iteration by the pure
controller of ``beta_control.py`` from the update's measured ``fpo/clip_frac`` or
``fpo/log_ratio_std`` (mean over the minibatches and the ranks); the temperature in use is logged
as ``fpo/beta`` every iteration and checkpointed (:meth:`FPO.state_dict`). With
``beta_auto.keep_gradient_scale`` the surrogate is divided by ``beta / init``, so ``beta`` moves
where the clip binds but not the size of the on-policy gradient.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..beta_control import BetaState, update_beta
from ..config import ConfigError
from ..fpo import fpo_loss, kl_penalty
from ..policies.base import batch_slices, cond_index
from .base import Algorithm


class FPO(Algorithm):
    name = "fpo"
    section = "fpo"

    def __init__(self, ctx):
        super().__init__(ctx)
        f = self.acfg
        self.objective = f.objective(latent_dims=math.prod(ctx.latent_shape))
        self.anchor = None
        self.auto = f.beta == "auto"
        self.controller = f.beta_auto.controller() if self.auto else None
        self.beta_state = BetaState(beta=f.beta_auto.init) if self.auto else None

    def setup(self) -> None:
        if self.acfg.fm_anchor_beta > 0:
            # Samples of the frozen base model (adapter disabled), fixed for the whole run.
            if self.ctx.reference_samples is None:
                raise ValueError("fpo.fm_anchor_beta > 0 needs a reference sampler in the algorithm context")
            f, kw = self.acfg, {}
            if f.fm_anchor_min_reward is not None:  # only what the base model already does right
                kw["min_reward"] = f.fm_anchor_min_reward
            if f.fm_anchor_tags is not None:  # only the samples of these tasks' prompts
                kw["tags"] = f.fm_anchor_tags
            if f.fm_anchor_guidance_scale is not None:
                kw["guidance_scale"] = f.fm_anchor_guidance_scale
            try:
                self.anchor = self.ctx.reference_samples(f.fm_anchor_samples, **kw)
            except ValueError as e:  # no base sample meets fm_anchor_min_reward / fm_anchor_tags: the user's setting
                raise ConfigError(f"fpo.fm_anchor_samples={f.fm_anchor_samples}, fm_anchor_min_reward="
                                  f"{f.fm_anchor_min_reward}, fm_anchor_tags={f.fm_anchor_tags}: {e}") from None

    def cfm(self, x0, cond, t, eps, *, return_pred=False, guided=False):
        """The per-pair CFM losses; ``guided`` (``fpo.guided_loss``): of the rollouts' CFG-combined prediction."""
        kw = {}
        w = self.ctx.sampling.guidance_scale
        if guided and w > 1:
            neg = self.ctx.negative_cond
            kw = {"guidance_scale": w, "negative_cond": None if neg is None else {k: v[:1] for k, v in neg.items()}}
        with self.ctx.autocast():
            return self.policy.cfm_loss(x0, cond, t, eps, model=self.ctx.model, return_pred=return_pred, **kw)

    @torch.no_grad()
    def prepare(self, ro, iteration):
        """``(t, eps)`` drawn once per sample, the rollout policy's losses there, and reference predictions."""
        f, ctx = self.acfg, self.ctx
        keys = ro.global_idx // self.ctx.train.group_size if f.group_noise else ro.global_idx
        t, eps = ctx.seeds.tau_eps("tau_eps", ctx.latent_shape, f.n_mc, f.time_sampling, iteration, keys)
        t, eps = t.to(ctx.device), eps.to(ctx.device)
        l_old, ref_pred = [], []
        for mb in batch_slices(len(ro.x0), self.ctx.train.minibatch_size):
            l_old.append(self.cfm(ro.x0[mb], cond_index(ro.cond, mb), t[mb], eps[mb], guided=f.guided_loss).float())
            if f.kl_beta > 0:
                with self.policy.reference():
                    _, pred = self.cfm(ro.x0[mb], cond_index(ro.cond, mb), t[mb], eps[mb], return_pred=True,
                                       guided=f.guided_loss)
                ref_pred.append(pred)
        prep = {"t": t, "eps": eps, "l_old": torch.cat(l_old)}
        if ref_pred:
            prep["ref_pred"] = torch.cat(ref_pred)
        return prep

    def own_cfm_loss(self, ro, prep, iteration) -> torch.Tensor:
        """The policy's CFM loss on its own fresh samples: the old losses, already computed."""
        return prep["l_old"].mean()

    def _anchor_loss(self, iteration: int, epoch: int, step: int, n: int) -> torch.Tensor:
        a, f, ctx = self.anchor, self.acfg, self.ctx
        g = ctx.seeds.generator("anchor_pick", iteration, epoch * 100_003 + step)
        idx = torch.randperm(len(a.x0), generator=g)[: min(n, len(a.x0))]
        t, eps = ctx.seeds.tau_eps("reference_tau_eps", ctx.latent_shape, f.n_mc, f.time_sampling,
                                   iteration * 1000 + epoch, a.global_idx[idx] + step * 7919)
        idx = idx.to(ctx.device)
        return self.cfm(a.x0[idx], cond_index(a.cond, idx), t.to(ctx.device), eps.to(ctx.device)).mean()

    def loss(self, ro, prep, idx, adv, *, iteration, epoch, step):
        f = self.acfg
        need_pred = "ref_pred" in prep
        out = self.cfm(ro.x0[idx], cond_index(ro.cond, idx), prep["t"][idx], prep["eps"][idx], return_pred=need_pred,
                       guided=f.guided_loss)
        l_new, pred = out if need_pred else (out, None)
        objective = dataclasses.replace(self.objective, beta=self.beta_state.beta) if self.auto else self.objective
        loss, stats = fpo_loss(prep["l_old"][idx], l_new.float(), adv, objective)
        if self.auto and f.beta_auto.keep_gradient_scale:
            loss = loss * (f.beta_auto.init / objective.beta)
        stats["beta"] = torch.tensor(objective.beta)
        if need_pred:
            kl = kl_penalty(pred, prep["ref_pred"][idx]).mean()
            loss = loss + f.kl_beta * kl
            stats["kl_ref"] = kl.detach()
        if self.anchor is not None:
            anc = self._anchor_loss(iteration, epoch, step, len(idx))
            loss = loss + f.fm_anchor_beta * anc
            stats["fm_anchor_loss"] = anc.detach()
            stats["fm_anchor_samples"] = torch.tensor(float(len(self.anchor.x0)))
        return loss, stats

    def end_iteration(self, iteration, metrics):
        """``beta: auto``: the next iteration's temperature from this one's measured statistic."""
        if not self.auto:
            return {}
        stat = self.controller.statistic
        local = torch.tensor([metrics.get(stat, math.nan)], dtype=torch.float64, device=self.ctx.device)
        measured = float(self.ctx.rank_mean(local))
        self.beta_state = update_beta(self.beta_state, measured, self.controller)
        return {f"beta_auto_{stat}": measured, "beta_next": self.beta_state.beta}

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.beta_state) if self.auto else {}

    def load_state_dict(self, state: dict) -> None:
        if self.auto:
            self.beta_state = BetaState(beta=float(state["beta"]), updates=int(state["updates"]))
