"""What an RL algorithm plugs into the shared training loop.

The loop (``trainer.py``) owns prompts, rollouts through the policy, rewards, gathering,
advantages, minibatching, gradient accumulation, clipping, optimizer steps, EMA,
checkpoints and logging. An algorithm sees the run only through an
:class:`~fpo_diffusion.algorithms.context.AlgorithmContext` and owns only what differs
between FPO and the baselines:

* ``sample``: how final latents are produced (FPO: the stock pipeline, any sampler; a
  baseline that needs per-step log-probabilities runs its own stochastic sampler and
  returns the trajectory in ``extras``);
* ``prepare``: per-sample tensors computed once after the rollout, without grad (FPO: the
  ``(t, eps)`` pairs and old CFM losses);
* ``loss``: the differentiable loss of one minibatch and its diagnostics;
* ``end_iteration``: what changes between iterations besides the weights (FPO's ``beta: auto``
  temperature, DiffusionNFT's old policy, AWM's lagged anchor), with ``state_dict`` /
  ``load_state_dict`` so that a checkpoint holds it and a resumed run continues exactly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..config import ConfigError
from ..policies.base import Cond, batch_slices, cond_index
from .context import AlgorithmContext, Samples


class Algorithm(ABC):
    name: str = ""
    families: tuple[str, ...] = ()
    """Model families the algorithm supports (empty: every family)."""
    section: str = ""
    """Name of the algorithm's own section on :class:`~fpo_diffusion.config.Config` (``acfg``, from
    ``ctx.sections``), if any."""

    def __init__(self, ctx: AlgorithmContext):
        self.ctx = ctx
        self.policy = ctx.policy
        if self.families and self.policy.family not in self.families:
            raise ConfigError(f"algorithm {self.name!r} supports model families {', '.join(self.families)}; "
                              f"this model is {self.policy.family!r}")
        self.acfg = ctx.sections[self.section] if self.section else None

    def setup(self) -> None:
        """Called once the loop is fully built (and resumed)."""

    def sample(self, cond: Cond, generators: list[torch.Generator], negative_cond: Cond | None,
               iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final latents ``[n, *L]`` and per-sample extras (batch first). Default: the stock pipeline."""
        return self.ctx.stock_sample(cond, generators, negative_cond, model=self.ctx.model), {}

    @abstractmethod
    def prepare(self, ro: Samples, iteration: int) -> dict[str, torch.Tensor]:
        """Per-sample tensors (batch first) needed by :meth:`loss`, computed without grad."""

    @abstractmethod
    def loss(self, ro: Samples, prep: dict[str, torch.Tensor], idx: torch.Tensor, adv: torch.Tensor, *,
             iteration: int, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of minibatch ``idx`` (indices into the rank's samples) with advantages ``adv``."""

    def update_subset(self, adv: torch.Tensor, iteration: int, n_minibatches: int, rank_key: int
                      ) -> torch.Tensor | None:
        """Which of the rank's samples the update trains on (indices, CPU), split into the same
        ``n_minibatches`` minibatches per epoch; ``None`` (default): all of them, in minibatches of
        ``train.minibatch_size`` (Flow-GRPO's zero-advantage filter overrides it). ``rank_key``: a key unique
        to the rank, for seeded draws."""
        return None

    def end_iteration(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """Called once after ``iteration``'s update (not after a skipped one) with the algorithm's own
        statistics of it (this rank's means, unprefixed: ``clip_frac``, ``skipped_updates``, ...); returns more
        statistics to log, unprefixed (the loop logs them as ``<name>/<stat>``). Default: nothing."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue this algorithm exactly (empty: nothing; the loop then
        registers nothing, and checkpoints stay as they were)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""

    @torch.no_grad()
    def own_cfm_loss(self, ro: Samples, prep: dict[str, torch.Tensor], iteration: int) -> torch.Tensor:
        """The policy's CFM loss on its own fresh samples (rank mean): the collapse signal.

        Default: one ``(t, eps)`` pair per sample from the ``own_cfm`` stream.
        """
        ctx = self.ctx
        t, eps = ctx.seeds.tau_eps("own_cfm", ctx.latent_shape, 1, ctx.cfm_time_sampling, iteration,
                                   ro.global_idx)
        out = []
        for mb in batch_slices(len(ro.x0), ctx.train.minibatch_size):
            with ctx.autocast():
                out.append(self.policy.cfm_loss(ro.x0[mb], cond_index(ro.cond, mb), t[mb].to(ctx.device),
                                                eps[mb].to(ctx.device), model=ctx.model).float())
        return torch.cat(out).mean()
