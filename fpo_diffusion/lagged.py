"""A lagged copy of the trainable (LoRA) weights: ``copy <- decay * copy + (1 - decay) * weights``.

One piece for three uses: the run's EMA of the LoRA weights (``train.ema_decay``,
``run_state.EMA``), DiffusionNFT's old (sampling) policy and AWM's EMA anchor, whose decay grows
with the number of updates (:func:`lag_decay`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def lag_decay(step: int, *, flat: int = 0, rate: float = 0.001, maximum: float = 0.5) -> float:
    """``0`` for ``step < flat``, else ``min((step - flat) * rate, maximum)``: a decay that grows linearly
    with the number of updates ``step`` up to ``maximum``.

    DiffusionNFT's ``return_decay`` (NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` lines 169-189:
    ``decay_type`` 1, the default: ``flat=0, rate=0.001, maximum=0.5``; 2: ``75, 0.0075, 0.999``; 0:
    always 0) and AWM's ``kl_ema_decay_type = "linear"`` (scxue/advantage_weighted_matching
    ``scripts/train_sd3_awm.py`` lines 1410-1413: ``min(kl_ema_decay, 0.001 * step)``, i.e. ``flat=0,
    rate=0.001, maximum=0.3``).
    """
    if step < flat:
        return 0.0
    return min((step - flat) * rate, maximum)


class LaggedWeights:
    """A copy of ``params`` that trails them (``shadow``), to blend, swap in and checkpoint."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        """``shadow <- decay * shadow + (1 - decay) * params`` (``decay = 0``: a copy of the weights)."""
        for e, p in zip(self.shadow, self.params):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): e for i, e in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, e in enumerate(self.shadow):
            e.copy_(state[str(i)])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily copy the lagged weights into the parameters (restored on exit)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


__all__ = ["LaggedWeights", "lag_decay"]
