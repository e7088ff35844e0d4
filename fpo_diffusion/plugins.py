"""Names other packages plug in (Python entry points), looked up lazily by name.

* ``fpo_diffusion.models``: ``model.path: embedded:<name>``; the entry point is a function
  returning ``{"family": ..., "path": ...}``.
* ``fpo_diffusion.prompts``: ``prompts.source: embedded:<name>``; a function returning a list
  of GenEval-format metadata dicts (each with its ``prompt``).
* rewards register themselves through the ``fpo_diffusion.rewards`` group of ``rewards.registry``.

The shipped shapes world (``fpo_diffusion.shapes``) is such a plug-in (``pyproject.toml``): the
core never imports it.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

MODELS = "fpo_diffusion.models"
PROMPTS = "fpo_diffusion.prompts"


def _group(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    """The plug-in names installed in ``group``."""
    return sorted(_group(group))


def lookup(group: str, name: str) -> Callable | None:
    """The plug-in function ``name`` of ``group``, or ``None`` when none is installed."""
    ep = _group(group).get(name)
    return ep.load() if ep is not None else None
