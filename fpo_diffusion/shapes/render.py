"""Scenes -> images, deterministic (no randomness, no antialiasing)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import BACKGROUND, CANVAS, CELL, COLORS, PALETTE, SHAPES, cell_box, shape_mask


@dataclass(frozen=True)
class Obj:
    """One object: a shape of a colour, centred in grid cell ``(row, col)``."""

    shape: str
    color: str
    cell: tuple[int, int]

    def box(self) -> tuple[int, int, int, int]:
        """Tight pixel box ``(x0, y0, x1, y1)``, far edge exclusive (the official +1 convention)."""
        m = shape_mask(self.shape)
        ys, xs = np.nonzero(m)
        x0, y0, _, _ = cell_box(self.cell)
        return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


Scene = list[Obj]


def validate(scene: Scene) -> None:
    seen = set()
    for o in scene:
        if o.shape not in SHAPES:
            raise ValueError(f"unknown shape {o.shape!r}")
        if o.color not in PALETTE:
            raise ValueError(f"unknown colour {o.color!r}; known: {', '.join(COLORS)}")
        if o.cell in seen:
            raise ValueError(f"two objects in cell {o.cell}")
        seen.add(o.cell)


def render_array(scene: Scene) -> np.ndarray:
    """``uint8 [CANVAS, CANVAS, 3]`` image of ``scene``."""
    validate(scene)
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in scene:
        x0, y0, x1, y1 = cell_box(o.cell)
        patch = img[y0:y1, x0:x1]
        patch[shape_mask(o.shape)] = PALETTE[o.color]
    return img


def render(scene: Scene) -> Image.Image:
    """PIL RGB image of ``scene``."""
    return Image.fromarray(render_array(scene), "RGB")


def to_tensor_batch(arrays: list[np.ndarray]):
    """uint8 HWC arrays -> float tensor ``[B, 3, H, W]`` in ``[-1, 1]`` (the VAE's range)."""
    import torch

    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


__all__ = ["Obj", "Scene", "render", "render_array", "validate", "to_tensor_batch", "CELL"]
