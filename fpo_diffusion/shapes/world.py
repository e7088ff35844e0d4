"""The shapes world's vocabulary and geometry (ShapesEval 2; docs/architecture.md, "The shapes world").

A 64x64 canvas on a plain grey background is cut into a 4x4 grid of 16x16 cells. Every
object is one of the 12 :data:`SHAPES`, painted in one of GenEval's ten :data:`COLORS`,
centred in a cell, at most one object per cell and at most :data:`MAX_OBJECTS` per image.
The autoencoder of the pretrained model downsamples by :data:`CELL` so that one latent
cell is exactly one grid cell: the decoder draws shapes, the transformer chooses them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

CANVAS = 64
"""Image side in pixels."""
CELL = 16
"""Grid cell side in pixels (= the VAE's downsampling factor)."""
GRID = CANVAS // CELL
"""Cells per side (4)."""
MAX_OBJECTS = 4
"""At most this many objects per image (GenEval counts 2-4)."""

BACKGROUND: tuple[int, int, int] = (128, 128, 128)
"""Plain background colour."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "heart", "diamond", "ring", "moon",
                           "arrow", "hourglass", "frame")
"""Shape classes (the world's detector labels). Largest pairwise template IoU under the detector's
alignment: 0.79 (circle/ring), then circle/square and cross/diamond (0.78); tests pin <= 0.80."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 200),
    "pink": (255, 120, 200),
    "brown": (130, 70, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
"""Object colours: GenEval's ten colour names, far apart in RGB and from the background."""
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


def _polygon(px: np.ndarray, py: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres ``(px, py)``."""
    inside = np.zeros(px.shape, dtype=bool)
    for i in range(len(pts)):
        (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % len(pts)]
        if y1 == y2:
            continue
        inside ^= ((y1 > py) != (y2 > py)) & (px < (x2 - x1) * (py - y1) / (y2 - y1) + x1)
    return inside


@lru_cache(maxsize=None)
def shape_mask(shape: str) -> np.ndarray:
    """Boolean ``[CELL, CELL]`` mask of ``shape`` centred in a cell (pixel-centre sampling, no antialiasing)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    h = OBJECT_SIZE / 2.0
    c = (CELL - 1) / 2.0
    y, x = np.mgrid[0:CELL, 0:CELL].astype(np.float64)
    u, v = x - c, y - c  # pixel centres at +-0.5, +-1.5, ...
    au, av = np.abs(u), np.abs(v)
    box = (au < h) & (av < h)
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        m = r <= h
    elif shape == "square":
        m = box
    elif shape == "triangle":  # apex up, base at the bottom
        m = (v < h) & (au <= (v + h) / 2.0 + 0.25)
    elif shape == "cross":  # upright plus, arms 4 px thick
        m = ((au < 2.1) | (av < 2.1)) & box
    elif shape == "star":  # five points, apex up
        pts = [((6.9 if i % 2 == 0 else 2.9) * np.cos(-np.pi / 2 + i * np.pi / 5),
                (6.9 if i % 2 == 0 else 2.9) * np.sin(-np.pi / 2 + i * np.pi / 5) + 0.6) for i in range(10)]
        m = _polygon(u, v, pts) & box
    elif shape == "heart":  # two lobes over a downward point
        lobes = ((u + 2.9) ** 2 + (v + 2.6) ** 2 <= 3.3 ** 2) | ((u - 2.9) ** 2 + (v + 2.6) ** 2 <= 3.3 ** 2)
        m = (lobes | ((v >= -2.8) & (v < h) & (au <= (h - v) * 6.2 / 8.8))) & box
    elif shape == "diamond":
        m = au + av <= h + 0.3
    elif shape == "ring":  # a circle with a hole, 3 px thick
        m = (r <= h) & (r >= h - 3.2)
    elif shape == "moon":  # a crescent opening to the right
        m = (r <= h) & (np.sqrt((u - 4.0) ** 2 + v * v) > h - 1.0)
    elif shape == "arrow":  # pointing right
        m = ((au < h) & (av < 2.1) & (u < 1)) | ((u >= 0) & (u < h) & (av <= (h - u) + 0.2))
    elif shape == "hourglass":  # two triangles meeting at their apexes
        m = (av < h) & (au <= av * 0.9 + 0.6)
    else:  # frame: a hollow square, 3 px thick
        m = box & ~((au < h - 3) & (av < h - 3))
    m = m.copy()
    m.setflags(write=False)
    return m


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS[shape]


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` (by sound: "an arrow", "an hourglass", "an orange star")."""
    return "an" if word[0] in "aeiou" or word.startswith("hour") else "a"
