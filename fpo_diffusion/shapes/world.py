"""The shapes world's vocabulary and geometry (DESIGN.md, "The embedded world").

A 48x48 canvas on a plain grey background is cut into a 3x3 grid of 16x16 cells. Every
object is one of :data:`SHAPES`, painted in one of :data:`COLORS` (GenEval colour names),
centred in a cell, at most one object per cell and at most :data:`MAX_OBJECTS` per image.
The autoencoder of the pretrained model downsamples by :data:`CELL` so that one latent
cell is exactly one grid cell: the decoder draws shapes, the transformer chooses them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

CANVAS = 48
"""Image side in pixels."""
CELL = 16
"""Grid cell side in pixels (= the VAE's downsampling factor)."""
GRID = CANVAS // CELL
"""Cells per side (3)."""
MAX_OBJECTS = 4
"""At most this many objects per image."""

BACKGROUND: tuple[int, int, int] = (128, 128, 128)
"""Plain background colour."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Shape classes (the world's detector labels). Pairwise template IoU <= 0.78 (circle/square)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 200),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
"""Object colours: a subset of GenEval's ten colour names, far apart in RGB and from the background."""
COLORS: tuple[str, ...] = tuple(PALETTE)

OBJECT_SIZE = 12
"""Side of an object's bounding box in pixels (2 px margin inside its cell)."""

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}


def cells() -> list[tuple[int, int]]:
    """All grid cells as ``(row, col)``, row-major."""
    return [(r, c) for r in range(GRID) for c in range(GRID)]


def cell_box(cell: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a cell."""
    r, c = cell
    return c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL


@lru_cache(maxsize=None)
def shape_mask(shape: str) -> np.ndarray:
    """Boolean ``[CELL, CELL]`` mask of ``shape`` centred in a cell (pixel-centre sampling, no antialiasing)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    h = OBJECT_SIZE / 2.0
    c = (CELL - 1) / 2.0
    y, x = np.mgrid[0:CELL, 0:CELL].astype(np.float64)
    u, v = x - c, y - c  # pixel centres at +-0.5, +-1.5, ...
    if shape == "circle":
        m = u * u + v * v <= h * h
    elif shape == "square":
        m = (np.abs(u) < h) & (np.abs(v) < h)
    elif shape == "triangle":  # apex up, base at the bottom
        m = (v < h) & (np.abs(u) <= (v + h) / 2.0 + 0.25)
    elif shape == "cross":  # upright plus, arms 4 px thick
        m = ((np.abs(u) < 2.1) | (np.abs(v) < 2.1)) & (np.abs(u) < h) & (np.abs(v) < h)
    m = m.copy()
    m.setflags(write=False)
    return m


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS[shape]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
