"""The exact geometric detector of the shapes world (plugs into GenEval's rules).

Per image:

1. **Foreground**: pixels farther than :data:`FG_DIST` (RGB L2) from the background colour.
2. **Components**: 8-connected components of the foreground. Specks smaller than
   :data:`MIN_AREA` pixels are ignored. A component whose box is wider or taller than
   :data:`MAX_SIDE` pixels, or whose area exceeds :data:`MAX_AREA`, is paint, not an object
   (a frame-filling blob, or touching objects that merged).
3. **Shape**: the component mask is compared with every shape template (the renderer's own
   masks), aligned on the box centre and searched over +-1 px shifts; ``iou`` is the best
   template IoU and ``margin`` its lead over the best *other* shape. The detection score is
   ``clip((iou - 0.6) / 0.3) * clip(margin / 0.1)``: 1.0 for a clean render, above GenEval's
   0.3 detection threshold from IoU 0.69 and above its 0.9 counting threshold from IoU 0.87.
   A blob that matches no template well (or two equally well) scores 0 and is not reported.
4. **Colour**: the nearest palette colour to the component's per-channel median, provided
   the median is within :data:`COLOR_TOL` of it and at least :data:`COLOR_PURITY` of the
   component's pixels are nearest to that same colour; otherwise ``"mixed"`` (which never
   matches a colour clause). ``Detection.color`` is set, so the rules need no CLIP.
   :func:`color_confidence` grades it: how near the median is to the asked colour against the next one.

Exact on clean renders (tests), tolerant of generation noise in colour and edges (median
colour, IoU rather than equality), never fooled by wrong shapes or paint.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from rewards.geneval.detection import Detection, Detections

from .world import BACKGROUND, CANVAS, CELL, OBJECT_SIZE, PALETTE, SHAPES, shape_mask

FG_DIST = 60.0
MIN_AREA = 8
MAX_SIDE = OBJECT_SIZE + 3
MAX_AREA = int(1.25 * OBJECT_SIZE * OBJECT_SIZE)
COLOR_TOL = 90.0
COLOR_PURITY = 0.6

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float64)
_BG = np.array(BACKGROUND, dtype=np.float64)


@dataclass
class Component:
    """One foreground component and what the detector made of it."""

    mask: np.ndarray
    box: tuple[int, int, int, int]
    area: int
    shape: str | None
    iou: float
    margin: float
    score: float
    color: str
    median_rgb: np.ndarray
    """Per-channel median colour of the component's pixels (what ``color`` and :func:`color_confidence` read)."""
    is_paint: bool


def _templates() -> dict[str, tuple[np.ndarray, tuple[float, float]]]:
    out = {}
    for s in SHAPES:
        m = shape_mask(s)
        ys, xs = np.nonzero(m)
        out[s] = (m, ((ys.min() + ys.max()) / 2.0, (xs.min() + xs.max()) / 2.0))
    return out


_TEMPLATES = _templates()


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.shape[:2] != (CANVAS, CANVAS):
        a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((CANVAS, CANVAS), Image.NEAREST))
    return a.astype(np.float64)


def foreground(image) -> np.ndarray:
    """Boolean ``[H, W]`` mask of non-background pixels."""
    a = _to_array(image)
    return np.linalg.norm(a - _BG, axis=-1) > FG_DIST


def _match(comp: np.ndarray, box: tuple[int, int, int, int]) -> dict[str, float]:
    x0, y0, x1, y1 = box
    cy, cx = (y0 + y1 - 1) / 2.0, (x0 + x1 - 1) / 2.0
    best = {}
    H, W = comp.shape
    for s, (tm, (ty, tx)) in _TEMPLATES.items():
        b = 0.0
        oy0, ox0 = int(round(cy - ty)), int(round(cx - tx))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                oy, ox = oy0 + dy, ox0 + dx
                canvas = np.zeros((H, W), dtype=bool)
                ys, ye = max(oy, 0), min(oy + CELL, H)
                xs, xe = max(ox, 0), min(ox + CELL, W)
                if ye <= ys or xe <= xs:
                    continue
                canvas[ys:ye, xs:xe] = tm[ys - oy:ye - oy, xs - ox:xe - ox]
                inter = np.logical_and(canvas, comp).sum()
                union = tm.sum() + comp.sum() - inter  # template pixels cut by the frame count as missed
                b = max(b, inter / union if union else 0.0)
        best[s] = float(b)
    return best


def _color(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """``(colour name or "mixed", per-channel median)`` of ``pixels``."""
    med = np.median(pixels, axis=0)
    d = np.linalg.norm(_RGB - med, axis=-1)
    k = int(d.argmin())
    if d[k] > COLOR_TOL:
        return "mixed", med
    nearest = np.linalg.norm(pixels[:, None, :] - _RGB[None], axis=-1).argmin(-1)
    if (nearest == k).mean() < COLOR_PURITY:
        return "mixed", med
    return _NAMES[k], med


def color_confidence(pixels: np.ndarray, name: str) -> float:
    """How surely ``pixels`` (``[N, 3]`` RGB) are palette colour ``name``, in ``[0, 1]``: with ``d`` the distance of
    their per-channel median to ``name`` and ``o`` its distance to the nearest *other* palette colour,
    ``0.5 + 0.5 * (o - d) / (o + d)``. 1.0 for a clean render, 0.5 half way to another colour, 0 on it. The
    dense counterpart of :func:`_color`'s verdict (as a real detector's colour probability is of its label). A
    component's ``median_rgb`` is such a median already (one row)."""
    med = np.median(np.asarray(pixels, dtype=np.float64).reshape(-1, 3), axis=0)
    d = np.linalg.norm(_RGB - med, axis=-1)
    k = _NAMES.index(name)
    mine, other = d[k], np.delete(d, k).min()
    return float(0.5 + 0.5 * (other - mine) / max(other + mine, 1e-9))


def analyse(image) -> list[Component]:
    """Every foreground component of ``image`` with the detector's verdict."""
    a = _to_array(image)
    fg = np.linalg.norm(a - _BG, axis=-1) > FG_DIST
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=int))
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        m = lab == i
        area = int(m.sum())
        if area < MIN_AREA:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        box = (x0, y0, x1, y1)
        color, med = _color(a[m])
        if (x1 - x0) > MAX_SIDE or (y1 - y0) > MAX_SIDE or area > MAX_AREA:
            out.append(Component(m, box, area, None, 0.0, 0.0, 0.0, color, med, True))
            continue
        ious = _match(m, box)
        order = sorted(ious, key=ious.get, reverse=True)
        iou, margin = ious[order[0]], ious[order[0]] - ious[order[1]]
        score = float(np.clip((iou - 0.6) / 0.3, 0, 1) * np.clip(margin / 0.1, 0, 1))
        out.append(Component(m, box, area, order[0] if score > 0 else None, iou, margin, score, color, med, score <= 0))
    return out


def detections(components: list[Component]) -> Detections:
    """GenEval ``Detections`` of the recognised components (by label, best score first)."""
    dets: Detections = {}
    for c in components:
        if c.shape is None:
            continue
        dets.setdefault(c.shape, []).append(
            Detection(label=c.shape, box=tuple(float(v) for v in c.box), score=c.score, mask=c.mask, color=c.color))
    for v in dets.values():
        v.sort(key=lambda d: -d.score)
    return dets


class ShapesDetector:
    """``Detector`` of the shapes world: ``detector(images) -> list[Detections]``."""

    def __call__(self, images) -> list[Detections]:
        return [self.detect(im) for im in images]

    def detect(self, image) -> Detections:
        return detections(analyse(image))


def painted_share(image) -> float:
    """Fraction of pixels off the shapes world's grey canvas (the detector's :func:`foreground` mask), as
    ShapesEval reports it (``painted_share``, ``mean_painted_share``). Not the training loop's
    ``policy/foreground_share`` (``fpo_diffusion.images.foreground_share``: pixels off each image's
    corner colour, for any model)."""
    return float(foreground(image).mean())


__all__ = ["ShapesDetector", "Component", "analyse", "color_confidence", "detections", "foreground", "painted_share"]
