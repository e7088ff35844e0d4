"""The update of one iteration: E epochs of shuffled minibatches of the algorithm's loss, with
gradient accumulation, gradient clipping, and non-finite steps skipped.

A non-finite reward skips the whole iteration's update (the loop decides, :class:`NonfiniteGuard`
counts); a non-finite loss, FPO ratio or gradient norm skips one optimizer step; and a step that
itself overflows (finite gradients, but ``train.lr=1e39`` or a huge weight decay) is undone: the
weights and optimizer state from before it are restored (:class:`StepUndo`) and it counts as a
skipped step of cause ``step``. Either way nothing non-finite reaches the weights, the optimizer
state, the LR schedule, the EMA or a checkpoint (which refuses non-finite tensors besides); each
skip is printed with its iteration and counted in the metrics
(``nonfinite/<cause>``), and ``train.max_nonfinite_in_a_row`` skips in a row stop the run with
:class:`TrainingError`.
"""
from __future__ import annotations

from dataclasses import dataclass

import contextlib
import math

import torch

from . import faults
from .config import TrainConfig
from .noise import SeedStreams
from .policies.base import batch_slices


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row)."""


CAUSES = ("", "step", "gradient", "loss", "ratio", "reward")
"""Why an update was skipped (index 0: it was not); a higher index wins when several apply."""


def adamw(params, **kw) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has one (one kernel for all LoRA tensors instead of a
    Python loop over hundreds of small ones), else the multi-tensor ``foreach`` path."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kw)


class NonfiniteGuard:
    """Counts updates skipped for non-finite numbers; too many in a row stop the run.

    Two counts, one limit (``train.max_nonfinite_in_a_row``): skipped optimizer steps in a row
    (:meth:`skip` / :meth:`ok`), and iterations in a row that skipped at least one of their steps
    (:meth:`end_iteration`): a run whose every iteration skips its later steps (its first step finite,
    e.g. after ``beta: auto`` drove the ratio to overflow) never skips steps in a row, yet learns nothing."""

    def __init__(self, limit: int, *, verbose: bool = True, in_a_row: int = 0, iterations_in_a_row: int = 0):
        self.limit, self.verbose, self.in_a_row = limit, verbose, in_a_row
        self.iterations_in_a_row = iterations_in_a_row
        self._skipped_this_iteration = False

    def ok(self) -> None:
        """An update went through."""
        self.in_a_row = 0

    def skip(self, iteration: int, cause: str, detail: str = "") -> None:
        """Count an update skipped for a non-finite ``cause`` (printed with the iteration); raise
        :class:`TrainingError` once ``limit`` updates in a row were skipped."""
        self.in_a_row += 1
        self._skipped_this_iteration = True
        if self.verbose:
            print(f"iteration {iteration}: skipped an update with a non-finite {cause}{detail}", flush=True)
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} updates in a row were skipped for non-finite numbers "
                                f"(train.max_nonfinite_in_a_row={self.limit}; the last: a non-finite {cause} at "
                                f"iteration {iteration}); stopping")

    def end_iteration(self, iteration: int) -> None:
        """An iteration ended: count it if it skipped any update, else reset; raise :class:`TrainingError`
        once ``limit`` iterations in a row skipped updates."""
        skipped, self._skipped_this_iteration = self._skipped_this_iteration, False
        self.iterations_in_a_row = self.iterations_in_a_row + 1 if skipped else 0
        if self.iterations_in_a_row >= self.limit:
            raise TrainingError(f"{self.iterations_in_a_row} iterations in a row skipped updates for non-finite "
                                f"numbers (train.max_nonfinite_in_a_row={self.limit}; the last: iteration {iteration}; "
                                f"with fpo.beta: auto, look at fpo/beta and fpo/ratio_max); stopping")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one device sync)."""
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class StepUndo:
    """A copy of the trainable weights and their optimizer state, taken right before an optimizer step,
    to put back if the step made any of them non-finite."""

    def __init__(self, optimizer):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            self.weights = [p.detach().clone() for p in self.params]
            self.state = {id(p): ({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                                  if (st := self.optimizer.state.get(p)) else None) for p in self.params}

    def step_was_finite(self) -> bool:
        """Whether the weights and the optimizer state after the step are all finite."""
        tensors = list(self.params)
        for p in self.params:
            tensors.extend(v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v))
        return all_finite(tensors)

    @torch.no_grad()
    def restore(self) -> None:
        for p, w in zip(self.params, self.weights):
            p.copy_(w)
            saved = self.state[id(p)]
            if saved is None:
                self.optimizer.state.pop(p, None)
            else:
                self.optimizer.state[p] = saved


class Updater:
    """Runs :meth:`update` with the run's optimizer, LR schedule, EMA and accelerator."""

    def __init__(self, train: TrainConfig, accelerator, model: torch.nn.Module, optimizer, lr_scheduler, *,
                 n_local: int, guard: NonfiniteGuard, ema=None):
        self.train, self.accelerator, self.model = train, accelerator, model
        self.optimizer, self.lr_scheduler, self.ema = optimizer, lr_scheduler, ema
        self.n_local, self.guard = n_local, guard
        self.seeds = SeedStreams(train.seed)
        from accelerate.utils import DistributedType

        # DeepSpeed's engine steps inside the backward pass that ends an accumulation (accelerate's
        # ``sync_gradients``), before any check after it could skip the step.
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    @staticmethod
    def _deepspeed_stop(iteration: int, what: str) -> str:
        return (f"iteration {iteration}: {what} under DeepSpeed, whose engine steps inside the backward pass, so "
                f"the update cannot be skipped as in other runs: stopping (resume from the last checkpoint, e.g. "
                f"with a lower train.lr)")

    def _max_over_ranks(self, cause: int) -> int:
        acc = self.accelerator
        return int(acc.gather(torch.tensor([float(cause)], device=acc.device)).max())

    def update(self, algorithm, ro, adv: torch.Tensor, prep: dict[str, torch.Tensor],
               iteration: int) -> "UpdateStats":
        """E epochs of shuffled minibatches of ``algorithm.loss``; returns the update's statistics."""
        tr, acc, model = self.train, self.accelerator, self.model
        dev = acc.device
        adv = adv.to(dev)
        sums: dict[str, float] = {}
        n_terms = 0
        skipped = 0
        nonfinite = dict.fromkeys(CAUSES[1:], 0)
        grad_norms = []
        model.train()
        n_mb = math.ceil(self.n_local / tr.minibatch_size)
        subset = algorithm.update_subset(adv.cpu(), iteration, n_mb, int(ro.global_idx[0]))
        for epoch in range(tr.epochs):
            g = self.seeds.generator("shuffle", iteration, acc.process_index * 1009 + epoch)
            if subset is None:
                perm = torch.randperm(self.n_local, generator=g)
                mbs = [perm[s] for s in batch_slices(self.n_local, tr.minibatch_size)]
            else:  # the same number of minibatches over fewer samples (Flow-GRPO's zero-advantage filter)
                perm = subset[torch.randperm(len(subset), generator=g)]
                mbs = [mb for mb in torch.tensor_split(perm, n_mb) if len(mb)]
            groups = [mbs[i:i + tr.grad_accum_steps] for i in range(0, len(mbs), tr.grad_accum_steps)]
            for step, group in enumerate(groups):
                cause = 0  # index into CAUSES; the worst over the accumulated minibatches and the ranks wins
                for j, idx in enumerate(group):
                    sync = j == len(group) - 1
                    acc.sync_gradients = sync  # the state accelerate's accumulate() sets: DeepSpeed steps at sync only
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
                    idx_d = idx.to(dev)
                    with ctx:
                        loss, stats = algorithm.loss(ro, prep, idx_d, adv[idx_d], iteration=iteration,
                                                     epoch=epoch, step=step * tr.grad_accum_steps + j)
                        if not bool(torch.isfinite(loss.detach())):
                            bad_ratio = any("ratio" in k and not math.isfinite(float(v)) for k, v in stats.items())
                            cause = max(cause, CAUSES.index("ratio" if bad_ratio else "loss"))
                        if sync and self.deepspeed and (worst := self._max_over_ranks(cause)):
                            raise TrainingError(self._deepspeed_stop(iteration, f"a non-finite {CAUSES[worst]}"))
                        # accelerate (DeepSpeed) divides by its accumulation count: each group's gradient is its mean
                        acc.backward(loss * acc.gradient_accumulation_steps / len(group))
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    sums["surrogate"] = sums.get("surrogate", 0.0) + float(loss.detach())
                    n_terms += 1
                gn = acc.clip_grad_norm_(model.parameters(), tr.max_grad_norm if tr.max_grad_norm else float("inf"))
                if self.deepspeed and gn is not None and not math.isfinite(float(gn)):  # the engine has stepped
                    raise TrainingError(self._deepspeed_stop(iteration, "a non-finite gradient norm"))
                gn = float(gn) if gn is not None else float("nan")  # DeepSpeed without clipping may not report it
                if cause == 0 and not math.isfinite(gn) and not (self.deepspeed and math.isnan(gn)):
                    cause = CAUSES.index("gradient")
                cause = self._max_over_ranks(cause)
                if cause == 0:
                    undo = StepUndo(self.optimizer)
                    self.optimizer.step()
                    if self._max_over_ranks(0 if undo.step_was_finite() else CAUSES.index("step")):
                        if self.deepspeed:  # its engine stepped (and holds the master weights): nothing to restore
                            raise TrainingError(self._deepspeed_stop(iteration, "an optimizer step that overflowed"))
                        cause = CAUSES.index("step")  # the step overflowed: as if it had not been taken
                        undo.restore()
                if cause == 0:
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
                    self.guard.skip(iteration, CAUSES[cause], " (the optimizer step overflowed: the weights and optimizer "
                                    "state from before it are restored; is train.lr too large?)"
                                    if CAUSES[cause] == "step" else "")
                self.optimizer.zero_grad(set_to_none=True)
        own = {k: v / max(n_terms, 1) for k, v in sums.items()}
        own["skipped_updates"] = skipped
        if subset is not None:
            own["trained_samples"] = len(subset)
        loop = {f"nonfinite/{k}": v for k, v in nonfinite.items()}
        loop["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        loop["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        return UpdateStats(own, loop)


@dataclass
class UpdateStats:
    """One iteration's update, as this rank measured it."""

    algorithm: dict[str, float]
    """The algorithm's own statistics, unprefixed: the means of its loss terms (``clip_frac``, ...),
    ``skipped_updates`` and, where it trains a subset, ``trained_samples``."""
    loop: dict[str, float]
    """The loop's: ``nonfinite/*``, ``train/grad_norm``, ``train/lr``."""


__all__ = ["CAUSES", "NonfiniteGuard", "TrainingError", "UpdateStats", "Updater", "adamw"]
