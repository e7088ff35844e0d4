"""Image helpers: tensors to PIL, captioned grids for logs and reports."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` floats in ``[0, 1]`` -> RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(images: list[Image.Image], captions: list[str] | None = None, *, cols: int | None = None,
              min_side: int = 128, caption_height: int = 28) -> Image.Image:
    """A grid of images (upscaled with nearest neighbour to at least ``min_side``), each captioned."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    scale = max(1, math.ceil(min_side / max(w, h)))
    w, h = w * scale, h * scale
    cols = cols or min(len(images), 8)
    rows = math.ceil(len(images) / cols)
    cap_h = caption_height if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * w, r * (h + cap_h)
        grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        if captions:
            text = captions[i]
            max_chars = max(8, w // 6)
            lines = [text[j:j + max_chars] for j in range(0, min(len(text), 2 * max_chars), max_chars)]
            for k, line in enumerate(lines):
                draw.text((x + 2, y + h + 1 + 12 * k), line, fill="black", font=font)
    return grid


FOREGROUND_TOLERANCE = 40
"""A pixel is foreground when some RGB channel differs from the background by more than this (of 255)."""


def foreground_share(images: list[Image.Image], background: tuple[int, int, int] | None = None,
                     tol: int = FOREGROUND_TOLERANCE) -> float:
    """Mean over ``images`` of the share of pixels that are foreground: some RGB channel differs from
    the background colour (``background``, else each image's top-left pixel) by more than ``tol``
    (:data:`FOREGROUND_TOLERANCE`, 40 of 255: JPEG-like noise and soft edges stay background, any
    drawn colour on a plain canvas counts). 0 for no images.

    A cheap collapse signal: frame-filling paint drives it towards 1.
    """
    shares = []
    for im in images:
        a = np.asarray(im.convert("RGB")).astype(np.int16)
        bg = np.array(background if background is not None else a[0, 0], dtype=np.int16)
        shares.append(float((np.abs(a - bg).max(axis=-1) > tol).mean()))
    return float(np.mean(shares)) if shares else 0.0
