"""GenEval's rules engine, constant for constant with the official evaluator.

Mirrors ``evaluation/evaluate_images.py`` of djghosh13/geneval (``evaluate_image``'s
detection filtering, ``evaluate``, ``relative_position``, ``compute_iou``). It is shared by
real-image GenEval (Mask2Former + CLIP colours) and by the shapes world (exact detector,
``Detection.color`` set), so it knows nothing about any model.

Faithfulness notes (each checked against the official source):

* per class, detections are ordered by the official call itself, ``np.argsort(scores)[::-1]``
  (numpy's default sort, best first; the order of equal scores is numpy's: not stable in general,
  and it depends on the numpy version and CPU exactly as the official script's does), kept when
  ``score > threshold`` compared in float32 (the official ``bbox[..., 4] > confidence_threshold``
  compares mmdet's float32 scores with the threshold cast to float32, so a score of exactly
  ``float32(0.3)`` is dropped), with the threshold 0.9 for the ``counting`` tag and 0.3 otherwise
  (for every class, exclude clauses included), and capped at 16; NMS runs only when ``nms < 1``
  (official default 1.0: off);
* ``include`` clauses are ANDed; each looks at the top-``count`` detections of its class;
  colour is checked on those, then position (only when the clause is still matched)
  against every object of the target clause's matched group;
* ``exclude`` clauses fail when ``count`` or more detections (after the threshold) exist;
* reason strings are the official ones, joined by newlines. The one deviation: the
  relations inside "found ... target" are sorted (the official code joins a Python ``set``,
  whose order varies between runs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .detection import Detection, Detections

COLORS: list[str] = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
"""The official 10 colour names, in the official order (also the order of colour reasons)."""

POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""Relations ``relative_position`` can return."""

ColorFn = Callable[[Image.Image, Detection], str]
"""Colour of one detection: ``color_fn(image, det) -> colour name``."""


@dataclass
class Thresholds:
    """The official evaluator's options (``--options threshold=... counting_threshold=...``)."""

    detection: float = 0.3
    """``threshold``: minimum score (exclusive) for every tag but counting."""
    counting: float = 0.9
    """``counting_threshold``: minimum score (exclusive) for the ``counting`` tag."""
    max_objects: int = 16
    """``max_objects``: detections kept per class, best first."""
    nms: float = 1.0
    """``max_overlap``: IoU at or above which a lower-scored box of the same class is dropped; 1.0 = off."""
    position: float = 0.1
    """``position_threshold``: fraction of the summed box sizes ignored in position offsets."""

    def for_tag(self, tag: str | None) -> float:
        """Score threshold for a prompt of task ``tag``."""
        return self.counting if tag == "counting" else self.detection


@dataclass
class RuleResult:
    """Outcome of the rules on one image."""

    correct: bool
    """All clauses hold (the official ``correct``)."""
    reason: str
    """Official reason string: one line per failure, empty when correct."""
    clauses: list[bool] = field(default_factory=list)
    """One flag per ``include`` clause, then per ``exclude`` clause: whether it holds."""
    details: dict[str, Any] = field(default_factory=dict)
    """Official-style details: class -> list of ``[x0, y0, x1, y1, score]`` of the kept detections."""

    @property
    def clause_fraction(self) -> float:
        """The fraction of clauses (include and exclude) that hold (when there are none: 1.0 if correct, else 0.0)."""
        if not self.clauses:
            return 1.0 if self.correct else 0.0
        return float(sum(self.clauses)) / len(self.clauses)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------

def _box_of(obj: Any) -> np.ndarray:
    """The 4 box coordinates of a ``Detection``, a ``(box, mask)`` tuple or a plain box."""
    if isinstance(obj, Detection):
        box = obj.box
    elif isinstance(obj, tuple) and len(obj) == 2 and not np.isscalar(obj[0]):
        box = obj[0]  # official (box, mask) pair
    else:
        box = obj
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.size < 4:
        raise ValueError(f"a box needs 4 coordinates, got {arr.size}")
    return arr[:4]


def compute_iou(box_a: Any, box_b: Any) -> float:
    """Official IoU with the inclusive-pixel (+1) area convention."""
    a, b = _box_of(box_a), _box_of(box_b)

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    i_area = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    u_area = area(a) + area(b) - i_area
    return float(i_area / u_area) if u_area else 0.0


def relative_position(obj_a: Any, obj_b: Any, threshold: float = 0.1) -> set[str]:
    """Position of A relative to B, factoring in object dimensions (official geometry).

    The centre offset is shrunk, per axis, by ``threshold * (size_a + size_b)`` (towards 0);
    if both shrunk components are below 1e-3 in magnitude the result is the empty set.
    Otherwise the shrunk offset is divided by the norm of the raw offset and each component
    beyond +-0.5 names a relation (image y grows downwards: negative dy is "above").
    """
    boxes = np.stack([_box_of(obj_a), _box_of(obj_b)]).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations: set[str] = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


# --------------------------------------------------------------------------------------------
# filtering
# --------------------------------------------------------------------------------------------

def filter_detections(detections: Detections, tag: str | None, thresholds: Thresholds = Thresholds()) -> Detections:
    """Official per-class filtering: best first, score > threshold (in float32), at most ``max_objects``, NMS.

    The order is the official ``np.argsort(scores)[::-1]`` on the class's detections as the detector
    listed them, the same call (numpy's default sort), so equal scores come out in the order the
    official script gives them with the same numpy: a stable sort would differ where many scores tie.
    Classes left without detections are dropped (as the official ``del detected[classname]``).
    """
    threshold = np.float32(thresholds.for_tag(tag))
    out: Detections = {}
    for classname, dets in detections.items():
        scores = np.asarray([d.score for d in dets], dtype=np.float32).reshape(-1)
        order = np.argsort(scores)[::-1]  # the official call: numpy's default sort, not kind="stable"
        order = order[scores[order] > threshold][: thresholds.max_objects]
        ordering = [dets[i] for i in order.tolist()]
        kept: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            kept.append(best)
            if thresholds.nms != 1:
                ordering = [d for d in ordering if compute_iou(best, d) < thresholds.nms]
        if kept:
            out[classname] = kept
    return out


def official_details(detections: Detections) -> dict[str, list[list[float]]]:
    """``details`` as the official JSON: class -> ``[[x0, y0, x1, y1, score], ...]``."""
    return {
        k: [[float(c) for c in d.box[:4]] + [float(d.score)] for d in v]
        for k, v in detections.items()
    }


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------

def _colors_of(found: list[Detection], image: Image.Image | None, color_fn: ColorFn | None) -> list[str]:
    """Colours of ``found``: ``det.color`` where set, else ``color_fn``.

    A ``color_fn`` with a ``classify_many(image, dets)`` method gets the unknown ones in one
    batch (the official code classifies one class's objects in batches of 16).
    """
    many = getattr(color_fn, "classify_many", None)
    unknown = [d for d in found if d.color is None]
    if unknown and many is not None and image is not None:
        predicted = iter(many(image, unknown))
        return [d.color if d.color is not None else next(predicted) for d in found]
    colors = []
    for det in found:
        if det.color is not None:
            colors.append(det.color)
        elif color_fn is None or image is None:
            raise ValueError(
                f"colour of a {det.label!r} detection is unknown: pass image and color_fn, "
                "or a detector that sets Detection.color"
            )
        else:
            colors.append(color_fn(image, det))
    return colors


def _color_reason(classname: str, req: dict, colors: list[str]) -> str:
    want = req["color"]
    present = [c for c in COLORS if c in colors] + sorted({c for c in colors if c not in COLORS})
    return (
        f"expected {want} {classname}>={req['count']}, found "
        f"{colors.count(want)} {want}; and "
        + ", ".join(f"{colors.count(c)} {c}" for c in present)
    )


def evaluate(
    detections: Detections,
    metadata: dict,
    image: Image.Image | None = None,
    color_fn: ColorFn | None = None,
    thresholds: Thresholds = Thresholds(),
) -> RuleResult:
    """Apply GenEval's rules to one image's raw detections.

    ``detections`` are the detector's output (any score); the official filtering is applied
    here. Colour comes from ``Detection.color`` when set, else from ``color_fn(image, det)``
    (which sees the detection's mask and box, as the official crop does).
    """
    objects = filter_detections(detections, metadata.get("tag"), thresholds)
    correct = True
    reasons: list[str] = []
    clauses: list[bool] = []
    matched_groups: list[list[Detection] | None] = []

    for req in metadata.get("include", []):
        classname, count = req["class"], int(req["count"])
        matched = True
        found = objects.get(classname, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors_of(found, image, color_fn)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(_color_reason(classname, req, colors))
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if not 0 <= int(target_group) < len(matched_groups):
                    raise ValueError(f"position target {target_group} does not name an earlier include clause")
                targets = matched_groups[int(target_group)]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in targets:
                            rels = relative_position(obj, target, thresholds.position)
                            if expected_rel not in rels:
                                correct = matched = False
                                reasons.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    f"{' and '.join(sorted(rels))} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
        clauses.append(matched)

    for req in metadata.get("exclude", []):
        classname, count = req["class"], int(req["count"])
        n = len(objects.get(classname, []))
        ok = n < count
        if not ok:
            correct = False
            reasons.append(f"expected {classname}<{count}, found {n}")
        clauses.append(ok)

    return RuleResult(correct=correct, reason="\n".join(reasons), clauses=clauses, details=official_details(objects))


__all__ = [
    "COLORS", "POSITIONS", "ColorFn", "Thresholds", "RuleResult", "compute_iou", "relative_position",
    "filter_detections", "official_details", "evaluate",
]
