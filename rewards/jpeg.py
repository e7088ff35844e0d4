"""JPEG (in)compressibility, as DDPO (Black et al., 2023) defines them.

Each image is saved as JPEG at quality 95 with PIL; ``size_kb = bytes / 1000``.

* ``jpeg_compressibility`` = ``-size_kb``   range ``(-inf, 0]``
* ``jpeg_incompressibility`` = ``+size_kb`` range ``[0, inf)``

Deterministic and cheap: also the reward the server tests use.
"""
from __future__ import annotations

import io

import torch
from PIL import Image

from .base import Reward
from .registry import register_reward


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of ``image`` saved as RGB JPEG at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """``+size_kb`` of the quality-95 JPEG. Range ``[0, inf)``."""

    range = (0.0, float("inf"))
    sign = 1.0

    def __init__(self, quality: int = 95, device: str | torch.device = "cpu", batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self.quality = int(quality)

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return torch.tensor([self.sign * jpeg_size_kb(im, self.quality) for im in images], dtype=torch.float64)


@register_reward("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """``-size_kb`` of the quality-95 JPEG. Range ``(-inf, 0]``."""

    range = (float("-inf"), 0.0)
    sign = -1.0
