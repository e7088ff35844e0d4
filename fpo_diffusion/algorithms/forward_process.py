"""Shared machinery of the forward-process baselines (DiffusionNFT, AWM) for the flow families.

Like FPO they need only the rollout's clean samples ``x0``: each sample gets ``k`` pairs
``(t, eps)`` with ``t`` from the sampler's own flow schedule (as both official codes take
``pipeline.scheduler.timesteps / 1000``), a loss on the velocity ``v_theta(x_t, t)`` at
``x_t = (1 - t) x0 + t eps``, and frozen predictions at the same ``x_t`` from models that do not
change during the update (the base model, a lagged copy of the policy), computed once in
:meth:`prepare`. The lagged copy (:class:`~fpo_diffusion.lagged.LaggedWeights`) trails the
trained weights by a decay that grows with the iterations done; it is blended after each
update (:meth:`end_iteration`) and checkpointed (:meth:`state_dict`).

The pairs come from the ``tau_eps`` stream (the objective's pairs; FPO's own draws in an FPO
run), keyed by iteration and global sample index, so they do not depend on the rank layout.
Unlike the official loops (fresh ``torch.randn`` per inner epoch) the pairs are fixed for the
iteration, as FPO's are; with the official one epoch per rollout that is the same thing.
"""
from __future__ import annotations

from abc import abstractmethod
from contextlib import AbstractContextManager

import torch

from ..lagged import LaggedWeights, lag_decay
from ..policies.base import batch_slices, cond_index
from .base import Algorithm
from ..policies.schedulers import flow_sigmas


class ForwardProcessAlgorithm(Algorithm):
    """A flow-matching baseline trained on ``(t, eps)`` pairs of the sampler's schedule."""

    families = ("sd3", "flux")

    def __init__(self, ctx):
        super().__init__(ctx)  # refuses a model family outside ``families``; ``acfg``: the ``section``
        s = self.ctx.sampling
        self.steps = int(s.steps)
        self.sigmas = flow_sigmas(self.policy, self.steps, int(s.height or self.policy.height),
                                  int(s.width or self.policy.width))  # [S+1]; step j runs at t = sigmas[j]
        self.lagged = LaggedWeights(self.policy.trainable_parameters())

    # --- what subclasses define ------------------------------------------------------------
    @abstractmethod
    def step_indices(self, generator: torch.Generator) -> torch.Tensor:
        """``[k]`` sampler-step indices of one sample's pairs (``t = sigmas[j]``), drawn from ``generator``."""

    @abstractmethod
    def decay_schedule(self) -> dict[str, float]:
        """``lag_decay``'s ``flat``, ``rate`` and ``maximum`` for the lagged copy."""

    # --- pairs and frozen predictions --------------------------------------------------------
    def pairs(self, ro, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``t [n, k]`` and ``eps [n, k, *L]`` of this rank's samples (CPU generators, on the device)."""
        ts, eps = [], []
        for gi in ro.global_idx.tolist():
            g = self.ctx.seeds.generator("tau_eps", iteration, int(gi))
            j = self.step_indices(g)
            ts.append(self.sigmas[j].float())
            eps.append(torch.randn((len(j), *self.ctx.latent_shape), generator=g))
        return torch.stack(ts).to(self.ctx.device), torch.stack(eps).to(self.ctx.device)

    def velocity(self, x0, cond, t, eps) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mse [B, k], v [B, k, *L])``: the flow-matching error and velocity of the model as it is now."""
        with self.ctx.autocast():
            mse, v = self.policy.cfm_loss(x0, cond, t, eps, model=self.ctx.model, return_pred=True)
        return mse.float(), v.float()

    @torch.no_grad()
    def frozen_velocity(self, ro, t, eps, weights: AbstractContextManager) -> torch.Tensor:
        """``[n, k, *L]`` velocities of every sample's pairs under ``weights`` (e.g. ``policy.reference()``)."""
        out = []
        with weights:
            for mb in batch_slices(len(ro.x0), self.ctx.train.minibatch_size):
                out.append(self.velocity(ro.x0[mb], cond_index(ro.cond, mb), t[mb], eps[mb])[1])
        return torch.cat(out)

    # --- between iterations ------------------------------------------------------------------
    def end_iteration(self, iteration, metrics):
        """Blend the lagged copy toward the trained weights: ``d * lagged + (1 - d) * theta``,
        ``d = lag_decay(iteration + 1, ...)`` (the iterations done; the official codes count optimizer
        steps, one per rollout in their shipped configurations)."""
        d = lag_decay(iteration + 1, **self.decay_schedule())
        self.lagged.blend(d)
        return {"lag_decay": d}

    def state_dict(self) -> dict:
        return {"lagged": {k: v.detach().cpu().clone() for k, v in self.lagged.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.lagged.load_state_dict(state["lagged"])


__all__ = ["ForwardProcessAlgorithm"]
