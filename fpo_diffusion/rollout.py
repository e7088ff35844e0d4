"""Rollouts: a rank's share of an iteration sampled, decoded and scored; the frozen base model's
reference samples; fixed-noise evaluation images.

Every sample's noise comes from its own generator keyed by ``(seed, iteration, global sample
index)`` (``noise.STREAMS``), so what a sample is does not depend on how samples are spread over
ranks or batched.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from tqdm.auto import tqdm

from . import faults
from .algorithms.context import stock_sampler
from .config import Config
from .images import foreground_share, grid_positions, to_pil
from .noise import SeedStreams, sample_generator
from .policies.base import Cond, Policy, batch_slices, cond_cat, cond_index, cond_to
from .prompts import PromptItem, iteration_plan, rank_slice


@dataclass
class Rollout:
    """One iteration's samples on this rank."""

    global_idx: torch.Tensor  # [n] global sample index
    prompt_idx: torch.Tensor  # [n] prompt index (the group id)
    cond: Cond  # [n, ...]
    x0: torch.Tensor  # [n, *L]
    rewards: torch.Tensor  # [n]
    components: dict[str, torch.Tensor]  # name -> [n]
    images: list = field(default_factory=list)  # a few PIL images for the grid
    seconds: float = 0.0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-sample data of the algorithm's sampler
    image_index: list = field(default_factory=list)  # positions of ``images`` among this rank's samples
    foreground_share: torch.Tensor | None = None  # [n] share of each image's pixels off its corner colour


@dataclass
class ReferenceSamples:
    """Samples of the frozen base model (scored only when a threshold keeps the good ones)."""

    global_idx: torch.Tensor  # [n]
    prompt_idx: torch.Tensor  # [n]
    cond: Cond  # [n, ...]
    x0: torch.Tensor  # [n, *L]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    rewards: torch.Tensor | None = None  # [n] the run's reward on each, where they were scored


class PromptConditions:
    """Text conditions, computed once per distinct prompt and cached on CPU."""

    def __init__(self, policy: Policy, device: torch.device):
        self.policy, self.device = policy, device
        self._cache: dict[str, Cond] = {}

    def __call__(self, prompts: list[str]) -> Cond:
        # One prompt per call: an embedding must not depend on which prompts share its batch
        # (batch-size-dependent kernels would make runs differ with the number of ranks).
        for p in sorted({p for p in prompts if p not in self._cache}):
            self._cache[p] = cond_to(self.policy.encode_prompts([p]), "cpu")
        return cond_to(cond_cat([self._cache[p] for p in prompts]), self.device)


SampleFn = Callable[[Cond, list[torch.Generator], "Cond | None", int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``(cond, generators, negative_cond, iteration) -> (x0, extras)``: an algorithm's ``sample``."""


def _repeat_rows(cond: Cond | None, n: int) -> Cond | None:
    """A one-row condition repeated for ``n`` rows (``None`` stays ``None``)."""
    return None if cond is None else {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


class RolloutDriver:
    """A rank's rollouts of a run: which samples it draws, their conditions, the sampling itself."""

    def __init__(self, cfg: Config, policy: Policy, prompts: list[PromptItem], *, rank: int, world: int,
                 device: torch.device, autocast: Callable[[], ContextManager], progress: bool = False):
        self.cfg, self.policy, self.prompts = cfg, policy, prompts
        self.rank, self.world, self.device, self.autocast, self.progress = rank, world, device, autocast, progress
        self.seeds = SeedStreams(cfg.train.seed)
        self.conditions = PromptConditions(policy, device)
        s = cfg.sampling
        self.negative_cond = self.conditions([s.negative_prompt]) if s.guidance_scale > 1 else None
        self.stock_sample = stock_sampler(policy, s)

    def negative_batch(self, n: int) -> Cond | None:
        """The negative-prompt condition repeated for ``n`` rows (``None`` without CFG)."""
        return _repeat_rows(self.negative_cond, n)

    def _share(self, iteration: int, stream: str, n_samples: int | None = None):
        """This rank's ``(global_idx, prompt_idx, items, cond)`` of the plan seeded by ``stream``."""
        t = self.cfg.train
        plan = iteration_plan(len(self.prompts), iteration, prompts_per_iteration=t.prompts_per_iteration,
                              group_size=t.group_size, seed=self.seeds.seed_of(stream))
        sl = rank_slice(len(plan), self.rank, self.world)
        global_idx, prompt_idx = torch.arange(len(plan))[sl], plan[sl]
        if n_samples is not None:
            global_idx, prompt_idx = global_idx[:n_samples], prompt_idx[:n_samples]
        items = [self.prompts[i] for i in prompt_idx.tolist()]
        return global_idx, prompt_idx, items, self.conditions([it.prompt for it in items])

    def _batches(self, n: int, iteration: int):
        return tqdm(list(batch_slices(n, self.cfg.sampling.batch_size)), desc=f"rollout {iteration}", leave=False,
                    disable=not self.progress)

    @torch.no_grad()
    def rollout(self, iteration: int, sample: SampleFn, reward) -> Rollout:
        """Sample this rank's share of ``iteration`` with ``sample``, decode, and score it with ``reward``
        (a ``MultiReward``: scoring of one batch overlaps sampling of the next)."""
        global_idx, prompt_idx, items, cond = self._share(iteration, "rollout")
        n_grid = self.cfg.log.grid_images
        grid_pick = set(grid_positions(prompt_idx.tolist(), n_grid))  # a few samples of every prompt, as fit
        x0s, futures, grid_images, extras = [], [], [], {}
        t0 = time.perf_counter()
        for chunk in self._batches(len(items), iteration):
            gens = [self.seeds.generator("rollout", iteration, int(g)) for g in global_idx[chunk]]
            with self.autocast():
                x0, ext = sample(cond_index(cond, chunk), gens, self.negative_batch(len(gens)), iteration)
            x0 = x0.float()
            faults.hit("rollout")
            x0s.append(x0)
            for k, v in ext.items():
                extras.setdefault(k, []).append(v)
            pil = to_pil(self.policy.decode(x0))
            grid_images.extend(im for i, im in zip(range(chunk.start, chunk.stop), pil) if i in grid_pick)
            chunk_items = items[chunk]
            futures.append((reward.submit(pil, [it.prompt for it in chunk_items],
                                          [it.metadata for it in chunk_items]), pil))
        x0 = torch.cat(x0s)
        rewards, comps, fg = [], {}, []
        for fut, pil in futures:
            total, parts = fut.result()
            rewards.append(total)
            for k, v in parts.items():
                comps.setdefault(k, []).append(v)
            fg.extend(foreground_share([im]) for im in pil)
        comps = {k: torch.cat(v) for k, v in comps.items()}
        return Rollout(global_idx, prompt_idx, cond, x0, torch.cat(rewards), comps, grid_images,
                       time.perf_counter() - t0, {k: torch.cat(v) for k, v in extras.items()},
                       image_index=sorted(grid_pick), foreground_share=torch.tensor(fg, dtype=torch.float64))

    @torch.no_grad()
    def reference_samples(self, n_samples: int | None = None, model: torch.nn.Module | None = None, *,
                          reward=None, min_reward: float | None = None, tags: list[str] | None = None,
                          guidance_scale: float | None = None) -> ReferenceSamples:
        """``n_samples`` of this rank's samples of the frozen base model (adapter disabled) through the stock
        pipeline, from the ``reference`` stream: iteration 0's plan of that seed, then iteration 1's and on as
        far as ``n_samples`` needs (``None``: iteration 0's share). ``model``: the prepared denoiser (an FSDP
        wrapper must run the forward; ``None``: the policy's own module). ``guidance_scale``: the CFG scale to
        draw them with (``None``: the run's ``sampling.guidance_scale``).

        With ``min_reward`` the samples are scored by ``reward`` (a ``MultiReward``, the run's) and only those
        scoring at least ``min_reward`` are kept (their rewards in ``rewards``): an anchor on what the base
        model already does right. With ``tags`` only the rows of prompts whose metadata ``tag`` is one of them
        are drawn (``n_samples`` counts every row of the plans walked: the kept ones are the same draws as an
        unfiltered call's, equal up to the float rounding of a smaller batch, without paying for the others).
        Raises ``ValueError`` when none is kept."""
        if min_reward is not None and reward is None:
            raise ValueError("reference_samples: min_reward needs the reward to score the samples with")
        sample, negative_cond = self.stock_sample, self.negative_cond
        if guidance_scale is not None:  # its own sampler and negative condition (none without CFG)
            s = dataclasses.replace(self.cfg.sampling, guidance_scale=guidance_scale)
            sample = stock_sampler(self.policy, s)
            negative_cond = self.conditions([s.negative_prompt]) if guidance_scale > 1 else None
        parts, drawn, it = [], 0, 0
        while it == 0 or (n_samples is not None and drawn < n_samples):
            left = None if n_samples is None else n_samples - drawn
            part, planned = self._reference_share(it, left, sample, negative_cond, model,
                                                  reward if min_reward is not None else None, tags)
            parts += [part] if part is not None else []
            drawn, it = drawn + planned, it + 1
        if not parts:
            raise ValueError(f"none of the {drawn} base-model samples has a prompt tagged "
                             f"{' or '.join(tags)}: draw more samples")
        out = ReferenceSamples(torch.cat([p.global_idx for p in parts]), torch.cat([p.prompt_idx for p in parts]),
                               cond_cat([p.cond for p in parts]), torch.cat([p.x0 for p in parts]),
                               rewards=None if min_reward is None else torch.cat([p.rewards for p in parts]))
        if min_reward is None:
            return out
        mask = torch.isfinite(out.rewards) & (out.rewards >= min_reward)
        if not mask.any():
            best = float(out.rewards.nan_to_num(-math.inf).max())
            raise ValueError(f"none of the {len(out.x0)} base-model samples{' so tagged' if tags else ''} "
                             f"scores at least {min_reward} (best {best:.4g}): lower the threshold or draw "
                             f"more samples")
        keep = torch.nonzero(mask).flatten()
        return ReferenceSamples(out.global_idx[keep], out.prompt_idx[keep], cond_index(out.cond, keep.to(self.device)),
                                out.x0[keep], rewards=None if out.rewards is None else out.rewards[keep])

    def _reference_share(self, iteration: int, n_samples: int | None, sample, negative_cond: Cond | None,
                         model: torch.nn.Module | None, reward, tags: list[str] | None
                         ) -> tuple[ReferenceSamples | None, int]:
        """``(samples, planned)``: up to ``n_samples`` of this rank's share of the ``reference`` stream's plan of
        ``iteration`` (``planned`` of them; global indices offset past the earlier iterations' plans), scored by
        ``reward`` unless it is ``None``. With ``tags`` only the rows of prompts so tagged are drawn (each from its
        own generator, so the same draws as unfiltered; ``None`` when there is none)."""
        global_idx, prompt_idx, items, cond = self._share(iteration, "reference", n_samples)
        planned = len(items)
        if tags is not None:
            keep = [i for i, item in enumerate(items) if item.metadata.get("tag") in tags]
            if not keep:
                return None, planned
            rows = torch.tensor(keep, dtype=torch.long)
            global_idx, prompt_idx, items = global_idx[rows], prompt_idx[rows], [items[i] for i in keep]
            cond = cond_index(cond, rows.to(self.device))
        x0s, futures = [], []
        with self.policy.reference():
            for chunk in self._batches(len(items), iteration):
                gens = [self.seeds.generator("reference", iteration, int(g)) for g in global_idx[chunk]]
                with self.autocast():
                    x0 = sample(cond_index(cond, chunk), gens, _repeat_rows(negative_cond, len(gens)),
                                model=model).float()
                faults.hit("rollout")
                x0s.append(x0)
                if reward is not None:
                    futures.append(reward.submit(to_pil(self.policy.decode(x0)), [i.prompt for i in items[chunk]],
                                                 [i.metadata for i in items[chunk]]))
        plan = self.cfg.train.prompts_per_iteration * self.cfg.train.group_size
        return ReferenceSamples(global_idx + iteration * plan, prompt_idx, cond, torch.cat(x0s),
                                rewards=torch.cat([f.result()[0] for f in futures]) if reward is not None else None
                                ), planned

    @torch.no_grad()
    def images(self, prompts: list[str], seed: int, model: torch.nn.Module | None = None, first: int = 0) -> list:
        """PIL images of ``model`` (``None``: the policy's denoiser) for ``prompts`` through the stock
        pipeline (the config's ``sampling`` settings), image ``i`` from ``sample_generator(seed, 0, first + i)``
        (``first``: the position of ``prompts[0]`` in a list split over ranks).

        The noise depends only on ``seed`` and the position, so two policies (say before and after
        training) are compared on the same draws. For evaluations; training uses :meth:`rollout`.
        """
        cond = self.conditions(prompts)
        images = []
        for chunk in batch_slices(len(prompts), self.cfg.sampling.batch_size):
            gens = [sample_generator(seed, 0, first + i) for i in range(chunk.start, chunk.stop)]
            with self.autocast():
                x0 = self.stock_sample(cond_index(cond, chunk), gens, self.negative_batch(len(gens)), model=model)
            images.extend(to_pil(self.policy.decode(x0.float())))
        return images


__all__ = ["PromptConditions", "ReferenceSamples", "Rollout", "RolloutDriver", "SampleFn"]
