"""Opt-in fault injection for the reliability tests (never active unless asked for).

``FPO_DIFFUSION_FAULT=<point>:<n>[,<point>:<n>...]`` makes the process kill itself with
SIGKILL (no cleanup, no ``finally``, no flushed buffers other than stdout/stderr) the
``n``-th time execution reaches the named point. Points:

* ``rollout``: after a rollout chunk has been sampled, before its reward is submitted;
* ``update``: right after an optimizer step, before the LR scheduler and EMA step;
* ``checkpoint_write``: inside a checkpoint write, after ``accelerator.save_state`` and
  the extra files, before ``trainer_state.json`` (the temporary folder is half written);
* ``checkpoint_rename``: the temporary folder is complete, just before it is renamed;
* ``checkpoint_replace``: re-saving an existing iteration, between moving the old folder aside
  (``.old-checkpoint-N``) and renaming the new one into place.

Counts are per process. Without the variable :func:`hit` does nothing but read it.
"""
from __future__ import annotations

import os
import signal
import sys

ENV = "FPO_DIFFUSION_FAULT"
POINTS = ("rollout", "update", "checkpoint_write", "checkpoint_rename", "checkpoint_replace")

_hits: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """``"update:3,rollout:1"`` -> ``{"update": 3, "rollout": 1}``; ValueError on anything else."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        point, sep, n = part.strip().partition(":")
        if not sep or point not in POINTS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{ENV}={spec!r}: expected <point>:<n> with point in {', '.join(POINTS)} and n >= 1")
        out[point] = int(n)
    return out


def hit(point: str) -> None:
    """Count one pass through ``point``; SIGKILL this process when the configured count is reached."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    n = parse(spec).get(point)
    if n is None:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == n:
        print(f"fault injection: SIGKILL at {point}:{n}", flush=True)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "POINTS", "hit", "parse"]
