"""Opt-in fault injection for the reliability tests (never active unless asked for).

``FPO_DIFFUSION_FAULT=<point>:<n>[:stop][,...]`` makes the process kill itself with
SIGKILL (no cleanup, no ``finally``, no flushed buffers other than stdout/stderr) the
``n``-th time execution reaches the named point; with ``:stop`` it stops itself with SIGSTOP
instead (a hung process: alive, holding its sockets, never answering). With
``FPO_DIFFUSION_FAULT_RANK=<r>`` only the process whose ``RANK`` is ``r`` is hit. Points:

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
RANK_ENV = "FPO_DIFFUSION_FAULT_RANK"
POINTS = ("rollout", "update", "checkpoint_write", "checkpoint_rename", "checkpoint_replace")

_hits: dict[str, int] = {}


def parse_actions(spec: str) -> dict[str, tuple[int, str]]:
    """``"update:3,rollout:1:stop"`` -> ``{"update": (3, "kill"), "rollout": (1, "stop")}``; ValueError otherwise."""
    out: dict[str, tuple[int, str]] = {}
    for part in spec.split(","):
        point, sep, rest = part.strip().partition(":")
        n, _, action = rest.partition(":")
        if not sep or point not in POINTS or not n.isdigit() or int(n) < 1 or action not in ("", "stop"):
            raise ValueError(f"{ENV}={spec!r}: expected <point>:<n>[:stop] with point in {', '.join(POINTS)} "
                             f"and n >= 1")
        out[point] = (int(n), action or "kill")
    return out


def parse(spec: str) -> dict[str, int]:
    """``"update:3,rollout:1"`` -> ``{"update": 3, "rollout": 1}``; ValueError on anything else."""
    return {point: n for point, (n, _) in parse_actions(spec).items()}


def hit(point: str) -> None:
    """Count one pass through ``point``; SIGKILL this process when the configured count is reached."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if os.environ.get(RANK_ENV) not in (None, os.environ.get("RANK", "0")):
        return
    n, action = parse_actions(spec).get(point, (None, None))
    if n is None:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == n:
        sig = signal.SIGSTOP if action == "stop" else signal.SIGKILL
        print(f"fault injection: {sig.name} at {point}:{n}", flush=True)
        sys.stderr.flush()
        os.kill(os.getpid(), sig)


__all__ = ["ENV", "POINTS", "RANK_ENV", "hit", "parse", "parse_actions"]
