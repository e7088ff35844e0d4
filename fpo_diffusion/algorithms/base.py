"""What an RL algorithm plugs into the shared training loop.

The loop (``trainer.py``) owns prompts, rollouts through the policy, rewards, gathering,
advantages, minibatching, gradient accumulation, clipping, optimizer steps, EMA,
checkpoints and logging. An algorithm owns only what differs between FPO and the
baselines:

* ``sample``: how final latents are produced (FPO: the stock pipeline, any sampler; a
  baseline that needs per-step log-probabilities runs its own stochastic sampler and
  returns the trajectory in ``extras``);
* ``prepare``: per-sample tensors computed once after the rollout, without grad (FPO: the
  ``(t, eps)`` pairs and old CFM losses);
* ``loss``: the differentiable loss of one minibatch and its diagnostics.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from ..policies.base import Cond

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import FPOTrainer, Rollout


class Algorithm(ABC):
    name: str = ""

    def __init__(self, trainer: "FPOTrainer"):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.policy = trainer.policy

    def setup(self) -> None:
        """Called once the trainer is fully built (and resumed)."""

    def sample(self, cond: Cond, generators: list[torch.Generator], negative_cond: Cond | None,
               iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final latents ``[n, *L]`` and per-sample extras (batch first). Default: the stock pipeline."""
        return self.trainer.stock_sample(cond, generators, negative_cond, model=self.trainer.model), {}

    @abstractmethod
    def prepare(self, ro: "Rollout", iteration: int) -> dict[str, torch.Tensor]:
        """Per-sample tensors (batch first) needed by :meth:`loss`, computed without grad."""

    @abstractmethod
    def loss(self, ro: "Rollout", prep: dict[str, torch.Tensor], idx: torch.Tensor, adv: torch.Tensor, *,
             iteration: int, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of minibatch ``idx`` (indices into the rank's samples) with advantages ``adv``."""

    @torch.no_grad()
    def own_cfm_loss(self, ro: "Rollout", prep: dict[str, torch.Tensor], iteration: int) -> torch.Tensor:
        """The policy's CFM loss on its own fresh samples (rank mean): the collapse signal.

        Default: one ``(t, eps)`` pair per sample from a dedicated stream.
        """
        from ..noise import draw_tau_eps
        from ..policies.base import cond_index

        tr = self.trainer
        dev = tr.accelerator.device
        t, eps = draw_tau_eps(tr.latent_shape, 1, self.cfg.fpo.time_sampling, self.cfg.train.seed + 20_011,
                              iteration, ro.global_idx)
        out = []
        for s in range(0, len(ro.x0), self.cfg.train.minibatch_size):
            mb = slice(s, s + self.cfg.train.minibatch_size)
            with tr.accelerator.autocast():
                out.append(self.policy.cfm_loss(ro.x0[mb], cond_index(ro.cond, mb), t[mb].to(dev), eps[mb].to(dev),
                                                model=tr.model).float())
        return torch.cat(out).mean()

    def iteration_metrics(self, prep: dict[str, torch.Tensor]) -> dict[str, float]:
        """Extra scalars for the iteration's log (already gathered where needed)."""
        return {}
