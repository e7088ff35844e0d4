"""What a GenEval detector returns, shared by Mask2Former and the exact shapes detector."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass
class Detection:
    """One detected object."""

    label: str
    """Class name (GenEval's 80 COCO names, or the shapes world's names)."""
    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in pixels, official convention (mmdet boxes, +1 on the far edge)."""
    score: float
    """Detection confidence in ``[0, 1]``."""
    mask: np.ndarray | None = None
    """Boolean ``[H, W]`` instance mask, or ``None``."""
    color: str | None = None
    """Colour name when the detector knows it exactly (shapes world); ``None``: classify with CLIP."""


Detections = dict[str, list[Detection]]
"""Per image: class name -> detections of that class, highest score first."""


class Detector(Protocol):
    def __call__(self, images: list[Image.Image]) -> list[Detections]:
        ...
