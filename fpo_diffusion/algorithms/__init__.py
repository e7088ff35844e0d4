"""RL algorithms that plug into the shared loop (``config.algorithm``)."""
from __future__ import annotations

from .. import config
from .awm import AWM
from .base import Algorithm
from .context import AlgorithmContext
from .ddpo import DDPO
from .diffusion_nft import DiffusionNFT
from .flow_grpo import FlowGRPO
from .fpo import FPO

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FPO, FlowGRPO, DDPO, DiffusionNFT, AWM)}
"""Name (each class's ``name``, also its metric prefix) -> algorithm class: the registry of algorithms."""

if tuple(ALGORITHMS) != config.ALGORITHMS:  # the config sits below this registry and cannot import it
    raise ImportError(f"the algorithm registry ({', '.join(ALGORITHMS)}) and config.ALGORITHMS "
                      f"({', '.join(config.ALGORITHMS)}) differ: a new algorithm is added to both, in the same order")


def build_algorithm(name: str, ctx: AlgorithmContext) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](ctx)


__all__ = ["ALGORITHMS", "AWM", "Algorithm", "AlgorithmContext", "DDPO", "DiffusionNFT", "FPO", "FlowGRPO",
           "build_algorithm"]
