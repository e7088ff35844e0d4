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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def wrap_text(text: str, width: int, font, max_lines: int | None = None) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a word longer than a line is cut);
    beyond ``max_lines`` the last line ends with an ellipsis.

    Linear in the text's length (up to a log factor): a word is measured only as far as a line can hold,
    by doubling then bisecting the prefix, and with ``max_lines`` the text is read no further than the lines
    it fills (a 100 000-character URL, base64 string or CJK prompt is cut, never measured whole)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fits = lambda t: draw.textlength(t, font=font) <= width  # noqa: E731

    def longest_prefix(word: str, start: int) -> int:
        """The largest ``n >= 1`` with ``word[start:start + n]`` fitting (1 if not even one character fits)."""
        left = len(word) - start
        lo, hi = 0, 1  # fits(lo chars) (0 chars always), hi: the next to try
        while hi <= left and fits(word[start:start + hi]):
            lo, hi = hi, hi * 2
        hi = min(hi, left + 1)  # hi chars do not fit (or run past the word)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(word[start:start + mid]):
                lo = mid
            else:
                hi = mid
        return max(1, lo)

    lines: list[str] = []
    full = None if max_lines is None else max_lines + 1  # one line more than shown says "truncated"
    for word in text.split():
        if full is not None and len(lines) >= full:
            break
        start = 0
        while start < len(word):
            if full is not None and len(lines) >= full:
                break
            n = longest_prefix(word, start)
            piece = word[start:start + n]
            start += n
            if start < len(word):  # a word wider than the line: cut it
                if lines and fits(lines[-1] + " " + piece):
                    lines[-1] += " " + piece
                else:
                    lines.append(piece)
                continue
            if lines and fits(lines[-1] + " " + piece):
                lines[-1] += " " + piece
            else:
                lines.append(piece)
    if max_lines is not None and len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "\u2026"):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "\u2026"]
    return lines


def labelled_grid(rows: list[list[Image.Image]], row_captions: list[str] | None = None,
                  tile_labels: list[list[str]] | None = None, *, tile_captions: list[list[str]] | None = None,
                  title: str | None = None, min_side: int = 128, caption_width: int = 220, font_size: int = 13,
                  pad: int = 4) -> Image.Image:
    """One grid for every image table of the project: a row per group (e.g. one prompt's samples).

    ``row_captions[r]`` is drawn, word-wrapped, in a column left of row ``r``; ``tile_labels[r][c]``
    (e.g. the reward, ``"0.75"``) in a strip above the tile, never over it (a label on the image hid the
    top-left corner's objects, which then looked cut by the frame); ``tile_captions[r][c]``
    (optional) wrapped under the tile. Tiles are upscaled with nearest neighbour to at least
    ``min_side`` pixels (small models' pixels stay visible); rows may differ in length.
    """
    if not rows or not any(rows):
        raise ValueError("labelled_grid needs at least one image")
    for name, table in (("row_captions", row_captions), ("tile_labels", tile_labels), ("tile_captions", tile_captions)):
        if table is not None and len(table) != len(rows):
            raise ValueError(f"labelled_grid: {name} has {len(table)} entries for {len(rows)} rows")
    first = next(im for row in rows for im in row)
    w, h = first.size
    scale = max(1, math.ceil(min_side / max(w, h)))
    w, h = w * scale, h * scale
    font, small = _font(font_size), _font(max(9, font_size - 2))
    line_h = font_size + 3
    cap_w = caption_width if row_captions is not None else 0
    under_lines = 3 if tile_captions is not None else 0
    under_h = under_lines * (font_size + 1) + (pad if under_lines else 0)
    label_h = font_size + 2 if tile_labels is not None else 0
    cols = max(len(r) for r in rows)
    title_h = line_h + pad if title else 0
    row_h = label_h + h + under_h + pad
    grid = Image.new("RGB", (pad + cap_w + cols * (w + pad), title_h + pad + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), wrap_text(title, grid.width - 2 * pad, font, max_lines=1)[0], fill="black", font=font)
    for r, row in enumerate(rows):
        y = title_h + pad + r * row_h
        if row_captions is not None:
            lines = wrap_text(row_captions[r], cap_w - 2 * pad, font, max_lines=max(1, h // line_h))
            for k, line in enumerate(lines):
                draw.text((pad, y + k * line_h), line, fill="black", font=font)
        for c, im in enumerate(row):
            x = pad + cap_w + c * (w + pad)
            if tile_labels is not None and c < len(tile_labels[r]) and tile_labels[r][c]:
                draw.text((x, y), wrap_text(tile_labels[r][c], w, small, max_lines=1)[0], fill="black", font=small)
            grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y + label_h))
            if tile_captions is not None and c < len(tile_captions[r]):
                for k, line in enumerate(wrap_text(tile_captions[r][c], w, small, max_lines=under_lines)):
                    draw.text((x, y + label_h + h + 1 + k * (font_size + 1)), line, fill="black", font=small)
    return grid


def group_rows(keys: list, per_row: int | None = None, max_rows: int | None = None) -> list[list[int]]:
    """Positions of ``keys`` grouped by key in order of first appearance: one row per key, at most
    ``per_row`` positions a row and ``max_rows`` rows."""
    order: dict = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    rows = [v[:per_row] if per_row else v for v in order.values()]
    return rows[:max_rows] if max_rows else rows


def grid_positions(keys: list, n_images: int) -> list[int]:
    """Which of a batch's samples a grid of about ``n_images`` tiles shows: as many groups (keys) as fit,
    the same number of samples from each (at least one), in the batch's order."""
    n_groups = len(dict.fromkeys(keys))
    if not keys or n_images < 1:
        return []
    per_row = max(1, n_images // max(n_groups, 1))
    return sorted(i for row in group_rows(keys, per_row, max(1, n_images // per_row)) for i in row)


def make_grid(images: list[Image.Image], captions: list[str] | None = None, *, cols: int | None = None,
              min_side: int = 128) -> Image.Image:
    """A plain grid of ``images`` in rows of ``cols`` (default: up to 8), each with its (wrapped) caption
    under it; a thin front for :func:`labelled_grid`."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or min(len(images), 8)
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    caps = [captions[i:i + cols] for i in range(0, len(images), cols)] if captions else None
    return labelled_grid(rows, tile_captions=caps, min_side=min_side)


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
