"""What the loop hands an algorithm: the explicit, small interface between the two.

An algorithm sees the run through an :class:`AlgorithmContext` only: no trainer object, no
import of the loop. A benchmark or a unit test builds one directly around a policy
(:meth:`AlgorithmContext.for_policy`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

import torch
from torch import nn

from ..config import ALGORITHMS, Config, SamplingConfig, TrainConfig
from ..noise import SeedStreams, TimeSampling
from ..policies.base import Cond, Policy


class Samples(Protocol):
    """What an algorithm reads of a rollout (``rollout.Rollout`` has these fields)."""

    global_idx: torch.Tensor  # [n] global sample index
    cond: Cond  # [n, ...]
    x0: torch.Tensor  # [n, *L] final latents
    extras: dict[str, torch.Tensor]  # per-sample data of the algorithm's own sampler


StockSampler = Callable[..., torch.Tensor]
"""``(cond, generators, negative_cond, *, model=None) -> x0``: the stock pipeline with the config's
``sampling`` settings (``model``: the denoiser to run; ``None``: the policy's own, e.g. inside
``policy.reference()``)."""

ReferenceSampler = Callable[..., Samples]
"""``(n, *, min_reward=None, tags=None, guidance_scale=None) -> samples``: ``n`` samples of this rank from the
frozen base model (adapter disabled), drawn from the ``reference`` seed stream (at ``guidance_scale``, by default
the run's), fixed for the whole run; with ``min_reward`` only those the run's reward scores at least that high,
with ``tags`` only those of prompts with one of these metadata tags."""

RankMean = Callable[[torch.Tensor], torch.Tensor]
"""``(tensor) -> tensor``: the mean over the ranks (every rank calls it, every rank gets the same value)."""


def _one_rank(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class AlgorithmContext:
    """The run as an algorithm sees it."""

    train: TrainConfig
    """Batch shape and seed (``minibatch_size``, ``group_size``, ``grad_accum_steps``, ...)."""
    sampling: SamplingConfig
    """The rollout settings (steps, CFG, scheduler, size)."""
    sections: dict[str, Any]
    """Each algorithm's own config section by name (``config.ALGORITHMS``): ``sections["awm"]`` is ``cfg.awm``."""
    cfm_time_sampling: TimeSampling
    """The time distribution of the own-sample CFM loss, the loop's collapse signal (``fpo.time_sampling``)."""
    policy: Policy
    model: nn.Module
    """The denoiser to train and run (as prepared by accelerate: DDP-wrapped on several ranks)."""
    device: torch.device
    autocast: Callable[[], ContextManager]
    """The run's mixed-precision context (``accelerator.autocast``)."""
    latent_shape: tuple[int, ...]
    negative_cond: Cond | None
    """The encoded negative prompt (one row), ``None`` without CFG."""
    seeds: SeedStreams
    stock_sample: StockSampler
    reference_samples: ReferenceSampler | None = None
    rank_mean: RankMean = _one_rank
    """Mean over the ranks, for what every rank must agree on (e.g. an adapted temperature); one rank: identity."""

    @classmethod
    def for_policy(cls, cfg: Config, policy: Policy, *, latent_shape: tuple[int, ...] | None = None,
                   mixed_precision: str = "no", stock_sample: StockSampler | None = None,
                   reference_samples: ReferenceSampler | None = None) -> "AlgorithmContext":
        """A context around a bare policy (its own denoiser, no CFG negative prompt), for benchmarks and
        tests. ``latent_shape`` defaults to the policy's at ``cfg.sampling``'s size, ``stock_sample`` to
        the policy's pipeline with ``cfg.sampling``."""
        dev = policy.device

        def autocast():
            if mixed_precision == "bf16":
                return torch.autocast(dev.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        s = cfg.sampling
        return cls(**cls.settings_of(cfg), policy=policy, model=policy.denoiser, device=dev, autocast=autocast,
                   latent_shape=tuple(latent_shape or policy.latent_shape(s.height, s.width)), negative_cond=None,
                   seeds=SeedStreams(cfg.train.seed), stock_sample=stock_sample or stock_sampler(policy, s),
                   reference_samples=reference_samples)


    @staticmethod
    def settings_of(cfg: Config) -> dict[str, Any]:
        """The context's settings fields, read off a whole run's config (the only place the two meet)."""
        return {"train": cfg.train, "sampling": cfg.sampling,
                "sections": {n: getattr(cfg, n) for n in ALGORITHMS if hasattr(cfg, n)},
                "cfm_time_sampling": cfg.fpo.time_sampling}


def stock_sampler(policy: Policy, sampling: SamplingConfig) -> StockSampler:
    """The policy's stock pipeline with the ``sampling`` settings (steps, CFG scale, scheduler, size)."""
    s = sampling

    def sample(cond: Cond, generators: list[torch.Generator], negative_cond: Cond | None, *,
               model: nn.Module | None = None) -> torch.Tensor:
        return policy.sample(cond, generators, steps=s.steps, guidance_scale=s.guidance_scale, scheduler=s.scheduler,
                             height=s.height, width=s.width, negative_cond=negative_cond, model=model)

    return sample


__all__ = ["AlgorithmContext", "RankMean", "ReferenceSampler", "Samples", "StockSampler", "stock_sampler"]
