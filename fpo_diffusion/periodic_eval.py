"""Periodic evaluation during training (Flow-GRPO's ``eval_freq``; config section ``eval``).

Every ``eval.every`` iterations (and after the last) the current policy samples a fixed prompt set
(``eval.prompts``, never the training prompts) with fixed seeds: image ``j`` of prompt ``i`` is
drawn from the same noise at every evaluation, on any number of ranks. Its reward, each reward
component and, when the prompts' metadata carries a GenEval ``tag``, the mean per task (``eval/task/*``) and its
standard error over images (``eval/task_se/*``) are merged
into that iteration's row of ``metrics.jsonl`` and TensorBoard as ``eval/*``; a grid of the first
``eval.grid_prompts`` prompts (one row each, the reward on every tile) goes to the logged images.
"""
from __future__ import annotations

import math

import torch

from rewards.geneval.summary import task_scores

from .config import ConfigError, EvalConfig, PromptConfig
from .images import group_rows, labelled_grid
from .prompts import load_prompts


def eval_items(cfg: EvalConfig) -> list:
    """The evaluation prompts of ``eval.*`` (``eval.prompts`` in any prompt-source form, ``eval.tags``,
    the first ``eval.max_prompts``)."""
    items = load_prompts(PromptConfig(source=cfg.prompts, column=cfg.column, tags=cfg.tags))
    return items[: cfg.max_prompts] if cfg.max_prompts else items


class PeriodicEval:
    """The evaluation prompt set of a run and how to score the current policy on it."""

    def __init__(self, cfg: EvalConfig, iterations: int, *, driver, reward, accelerator, items: list | None = None):
        self.cfg, self.iterations = cfg, iterations
        self.driver, self.reward, self.accelerator = driver, reward, accelerator
        self.items = eval_items(cfg) if items is None else items
        k = cfg.images_per_prompt
        self.n = len(self.items) * k
        world, rank = accelerator.num_processes, accelerator.process_index
        if self.n < world:
            raise ConfigError(f"eval: {self.n} evaluation images for {world} ranks; give every rank one "
                              f"(more eval.prompts or eval.images_per_prompt)")
        self.shares = [range(r * self.n // world, (r + 1) * self.n // world) for r in range(world)]
        self.per_rank = math.ceil(self.n / world)
        self.mine = self.shares[rank]
        self.prompt_of = [i // k for i in range(self.n)]  # global sample -> prompt index

    def due(self, iteration: int) -> bool:
        """Whether to evaluate after ``iteration``'s update."""
        e = self.cfg.every
        return bool(e) and ((iteration + 1) % e == 0 or iteration == self.iterations - 1)

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """All ranks' values in global sample order (each rank's share padded to the same length)."""
        acc = self.accelerator
        pad = torch.full((self.per_rank,), float("nan"))
        pad[: len(values)] = values.float().cpu()
        everything = acc.gather(pad.to(acc.device)).cpu()
        per = self.per_rank
        return everything[[r * per + j for r, share in enumerate(self.shares) for j in range(len(share))]]

    @torch.no_grad()
    def run(self, model, iteration: int) -> tuple[dict[str, float], object | None]:
        """``(metrics, grid)`` of ``model`` now: ``eval/*`` scalars (every rank) and the grid image (main
        process; ``None`` elsewhere or with ``eval.grid_prompts: 0``)."""
        mine = [self.items[self.prompt_of[g]] for g in self.mine]
        prompts, metadata = [it.prompt for it in mine], [it.metadata for it in mine]
        images = self.driver.images(prompts, self.cfg.seed, model=model, first=self.mine.start)
        total, parts = self.reward(images, prompts, metadata)
        rewards = self._gather(total)
        comps = {name: self._gather(v) for name, v in sorted(parts.items())}
        out = {"eval/reward/mean": float(rewards.mean()), "eval/reward/std": float(rewards.std(unbiased=False))}
        if len(comps) > 1:
            out.update({f"eval/reward/{name}": float(v.mean()) for name, v in comps.items()})
        tags = [self.items[self.prompt_of[g]].metadata.get("tag") for g in range(self.n)]
        tagged = [i for i, t in enumerate(tags) if isinstance(t, str) and t]
        per_task = task_scores([tags[i] for i in tagged], [float(rewards[i]) for i in tagged])
        for tag in sorted(per_task):
            out[f"eval/task/{tag}"] = per_task[tag].accuracy
            out[f"eval/task_se/{tag}"] = per_task[tag].se
        grid = None
        if self.accelerator.is_main_process and self.cfg.grid_prompts:
            keys = [self.prompt_of[g] for g in self.mine]
            rows = group_rows(keys, max_rows=self.cfg.grid_prompts)
            grid = labelled_grid([[images[j] for j in r] for r in rows], [self.items[keys[r[0]]].prompt for r in rows],
                                 [[f"{float(total[j]):.2f}" for j in r] for r in rows],
                                 title=f"evaluation after iteration {iteration}: mean reward "
                                       f"{out['eval/reward/mean']:.3f} over {self.n} images")
        return out, grid


__all__ = ["PeriodicEval"]
