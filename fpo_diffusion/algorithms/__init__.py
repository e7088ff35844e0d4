"""RL algorithms that plug into the shared loop (``config.algorithm``)."""
from __future__ import annotations

from .awm import AWM
from .base import Algorithm
from .context import AlgorithmContext
from .ddpo import DDPO
from .diffusion_nft import DiffusionNFT
from .flow_grpo import FlowGRPO
from .fpo import FPO

ALGORITHMS: dict[str, type[Algorithm]] = {"fpo": FPO, "flow_grpo": FlowGRPO, "ddpo": DDPO,
                                          "diffusion_nft": DiffusionNFT, "awm": AWM}
"""Name -> algorithm class."""


def build_algorithm(name: str, ctx: AlgorithmContext) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name](ctx)


__all__ = ["ALGORITHMS", "AWM", "Algorithm", "AlgorithmContext", "DDPO", "DiffusionNFT", "FPO", "FlowGRPO",
           "build_algorithm"]
