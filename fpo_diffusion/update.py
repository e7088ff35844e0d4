"""The update of one iteration: E epochs of shuffled minibatches of the algorithm's loss, with
gradient accumulation, gradient clipping, and non-finite steps skipped.

A non-finite reward skips the whole iteration's update (the loop decides, :class:`NonfiniteGuard`
counts); a non-finite loss, FPO ratio or gradient norm skips one optimizer step. Either way
nothing non-finite reaches the weights, the optimizer state, the LR schedule, the EMA or a
checkpoint; each skip is printed with its iteration and counted in the metrics
(``nonfinite/<cause>``), and ``train.max_nonfinite_in_a_row`` skips in a row stop the run with
:class:`TrainingError`.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import faults
from .config import TrainConfig
from .noise import SeedStreams
from .policies.base import batch_slices


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row)."""


CAUSES = ("", "gradient", "loss", "ratio", "reward")
"""Why an update was skipped (index 0: it was not); a higher index wins when several apply."""


def adamw(params, **kw) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has one (one kernel for all LoRA tensors instead of a
    Python loop over hundreds of small ones), else the multi-tensor ``foreach`` path."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw)


class NonfiniteGuard:
    """Counts updates skipped for non-finite numbers; too many in a row stop the run."""

    def __init__(self, limit: int, *, verbose: bool = True, in_a_row: int = 0):
        self.limit, self.verbose, self.in_a_row = limit, verbose, in_a_row

    def ok(self) -> None:
        """An update went through."""
        self.in_a_row = 0

    def skip(self, iteration: int, cause: str, detail: str = "") -> None:
        """Count an update skipped for a non-finite ``cause`` (printed with the iteration); raise
        :class:`TrainingError` once ``limit`` updates in a row were skipped."""
        self.in_a_row += 1
        if self.verbose:
            print(f"iteration {iteration}: skipped an update with a non-finite {cause}{detail}", flush=True)
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} updates in a row were skipped for non-finite numbers "
                                f"(train.max_nonfinite_in_a_row={self.limit}; the last: a non-finite {cause} at "
                                f"iteration {iteration}); stopping")


class Updater:
    """Runs :meth:`update` with the run's optimizer, LR schedule, EMA and accelerator."""

    def __init__(self, train: TrainConfig, accelerator, model: torch.nn.Module, optimizer, lr_scheduler, *,
                 n_local: int, guard: NonfiniteGuard, ema=None):
        self.train, self.accelerator, self.model = train, accelerator, model
        self.optimizer, self.lr_scheduler, self.ema = optimizer, lr_scheduler, ema
        self.n_local, self.guard = n_local, guard
        self.seeds = SeedStreams(train.seed)

    def _max_over_ranks(self, cause: int) -> int:
        acc = self.accelerator
        return int(acc.gather(torch.tensor([float(cause)], device=acc.device)).max())

    def update(self, algorithm, ro, adv: torch.Tensor, prep: dict[str, torch.Tensor],
               iteration: int) -> dict[str, float]:
        """E epochs of shuffled minibatches of ``algorithm.loss``; returns the update's metrics."""
        tr, acc, model = self.train, self.accelerator, self.model
        dev = acc.device
        adv = adv.to(dev)
        sums: dict[str, float] = {}
        n_terms = 0
        skipped = 0
        nonfinite = dict.fromkeys(CAUSES[1:], 0)
        grad_norms = []
        model.train()
        for epoch in range(tr.epochs):
            g = self.seeds.generator("shuffle", iteration, acc.process_index * 1009 + epoch)
            perm = torch.randperm(self.n_local, generator=g)
            mbs = [perm[s] for s in batch_slices(self.n_local, tr.minibatch_size)]
            groups = [mbs[i:i + tr.grad_accum_steps] for i in range(0, len(mbs), tr.grad_accum_steps)]
            for step, group in enumerate(groups):
                cause = 0  # index into CAUSES; the worst over the accumulated minibatches and the ranks wins
                for j, idx in enumerate(group):
                    sync = j == len(group) - 1
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
                    idx_d = idx.to(dev)
                    with ctx:
                        loss, stats = algorithm.loss(ro, prep, idx_d, adv[idx_d], iteration=iteration,
                                                     epoch=epoch, step=step * tr.grad_accum_steps + j)
                        if not bool(torch.isfinite(loss.detach())):
                            bad_ratio = any("ratio" in k and not math.isfinite(float(v)) for k, v in stats.items())
                            cause = max(cause, CAUSES.index("ratio" if bad_ratio else "loss"))
                        acc.backward(loss / len(group))
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    sums["surrogate"] = sums.get("surrogate", 0.0) + float(loss.detach())
                    n_terms += 1
                gn = acc.clip_grad_norm_(model.parameters(), tr.max_grad_norm if tr.max_grad_norm else float("inf"))
                gn = float(gn) if gn is not None else float("nan")
                if cause == 0 and not math.isfinite(gn):
                    cause = CAUSES.index("gradient")
                cause = self._max_over_ranks(cause)
                if cause == 0:
                    self.optimizer.step()
                    faults.hit("update")
                    self.lr_scheduler.step()
                    if self.ema is not None:
                        self.ema.step()
                    self.guard.ok()
                    grad_norms.append(gn)
                else:  # nothing of this step reaches the weights, the optimizer state, the LR schedule or the EMA
                    skipped += 1
                    nonfinite[CAUSES[cause]] += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    self.guard.skip(iteration, CAUSES[cause])
                self.optimizer.zero_grad(set_to_none=True)
        name = algorithm.name
        out = {f"{name}/{k}": v / max(n_terms, 1) for k, v in sums.items()}
        out[f"{name}/skipped_updates"] = skipped
        out.update({f"nonfinite/{k}": v for k, v in nonfinite.items()})
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        out["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        return out


__all__ = ["CAUSES", "NonfiniteGuard", "TrainingError", "Updater", "adamw"]
