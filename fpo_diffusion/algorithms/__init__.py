"""RL algorithms that plug into the shared loop (``config.algorithm``)."""
from __future__ import annotations

from .base import Algorithm
from .fpo import FPO

ALGORITHMS: dict[str, type[Algorithm]] = {"fpo": FPO}
"""Name -> algorithm class."""


def build_algorithm(name: str, trainer) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](trainer)


__all__ = ["ALGORITHMS", "Algorithm", "FPO", "build_algorithm"]
