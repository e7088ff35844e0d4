"""Mask2Former (Swin-S, COCO instance) through ``transformers``, post-processed as mmdet does.

The official GenEval evaluator runs mmdet 2.x's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``.
This module loads the same architecture with
``transformers.Mask2FormerForUniversalSegmentation.from_pretrained(path)`` and replaces the
``transformers`` post-processing (which works at the 384x384 processor size) by a
re-implementation of mmdet's path:

1. preprocessing as mmdet's test pipeline: keep-ratio rescale to fit (1333, 800)
   (``scale = min(1333 / long, 800 / short)``, new size ``int(side * scale + 0.5)``,
   bilinear), normalise with the ImageNet mean/std in 0-255 units, zero-pad to a multiple of 32;
2. ``Mask2FormerHead``: query mask logits (1/4 resolution) upsampled bilinearly
   (``align_corners=False``) to the padded input size;
3. ``MaskFormerFusionHead.predict``: crop away the padding, upsample bilinearly to the
   original image size;
4. ``instance_postprocess``: softmax over classes, drop the no-object column, top-100 over
   queries x classes, binary masks ``logit > 0``, score = class score x mean sigmoid inside
   the mask (``/ (area + 1e-6)``), boxes from masks as ``mask2bbox`` (``x_max + 1``,
   ``y_max + 1``; all zeros for an empty mask).

Classes map by index to the official 80 GenEval/COCO names (:data:`COCO_CLASSES`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .detection import Detection, Detections

COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote", "computer keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]
"""The official ``object_names.txt`` (COCO's 80 thing classes in COCO order, GenEval spelling)."""

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class PostprocessConfig:
    """mmdet's test-time settings for this model."""

    max_per_image: int = 100
    """``test_cfg.max_per_image``: top-k over queries x classes."""
    scale: tuple[int, int] = (1333, 800)
    """``img_scale`` of the test pipeline: (long edge, short edge) bounds."""
    size_divisor: int = 32
    """Padding multiple."""


def rescale_size(width: int, height: int, scale: tuple[int, int] = (1333, 800)) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep-ratio: the ``(width, height)`` an image is resized to."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def preprocess(images: list[Image.Image], config: PostprocessConfig = PostprocessConfig()) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """mmdet-style test preprocessing: pixel values ``[B, 3, Hp, Wp]`` and each image's resized ``(h, w)``."""
    arrays, sizes = [], []
    for img in images:
        img = img.convert("RGB")
        w, h = rescale_size(*img.size, config.scale)
        arr = np.asarray(img, dtype=np.uint8)
        try:  # mmcv.imresize is cv2 INTER_LINEAR
            import cv2

            arr = cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)
        except ImportError:  # pragma: no cover - cv2 ships with the env
            arr = np.asarray(img.resize((w, h), Image.BILINEAR))
        arr = (arr.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
        arrays.append(arr)
        sizes.append((h, w))
    d = config.size_divisor
    hp = max(-(-h // d) * d for h, _ in sizes)
    wp = max(-(-w // d) * d for _, w in sizes)
    batch = torch.zeros(len(images), 3, hp, wp)
    for i, arr in enumerate(arrays):
        batch[i, :, : arr.shape[0], : arr.shape[1]] = torch.from_numpy(arr).permute(2, 0, 1)
    return batch, sizes


def mask2bbox(masks: torch.Tensor) -> torch.Tensor:
    """mmdet ``mask2bbox``: ``[N, H, W]`` bool -> ``[N, 4]`` float ``(x0, y0, x1 + 1, y1 + 1)``; empty -> zeros."""
    n = masks.shape[0]
    boxes = torch.zeros(n, 4, dtype=torch.float32)
    x_any = masks.any(dim=1)
    y_any = masks.any(dim=2)
    for i in range(n):
        xs = torch.where(x_any[i])[0]
        ys = torch.where(y_any[i])[0]
        if len(xs) > 0 and len(ys) > 0:
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def upsample_masks(mask_logits: torch.Tensor, input_size: tuple[int, int], valid_size: tuple[int, int],
                   out_size: tuple[int, int]) -> torch.Tensor:
    """Query mask logits ``[Q, h, w]`` -> ``[Q, H, W]`` at the original size, as mmdet (two bilinear steps)."""
    x = mask_logits[:, None].float()
    if tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    x = x[..., : valid_size[0], : valid_size[1]]
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    return x[:, 0]


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, *, max_per_image: int = 100,
                         num_things: int | None = None, mask_rows: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet ``instance_postprocess`` on one image.

    ``class_logits [Q, C + 1]`` (last column: no object), ``mask_logits [Q, H, W]`` already at
    the output size. Returns ``labels [K]``, ``boxes [K, 4]``, ``scores [K]``, ``masks [K, H, W]``
    (bool), ``K = min(max_per_image, Q * C)`` restricted to thing classes, ordered by class score.
    ``mask_rows [Q]`` optionally maps each query to its row of ``mask_logits`` (when only the
    queries that can reach the top-k were upsampled).
    """
    num_queries, c1 = class_logits.shape
    num_classes = c1 - 1
    num_things = num_classes if num_things is None else num_things
    scores = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    k = min(max_per_image, scores.numel())
    scores_per_image, top = scores.flatten(0, 1).topk(k, sorted=True)
    labels_per_image = labels[top]
    query_idx = top // num_classes
    is_thing = labels_per_image < num_things
    scores_per_image, labels_per_image, query_idx = scores_per_image[is_thing], labels_per_image[is_thing], query_idx[is_thing]
    masks = mask_logits[query_idx if mask_rows is None else mask_rows[query_idx]].float()
    binary = (masks > 0).float()
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    det_scores = scores_per_image * mask_scores
    binary_b = binary.bool()
    return labels_per_image, mask2bbox(binary_b), det_scores, binary_b


def to_detections(labels: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor,
                  classnames: list[str]) -> Detections:
    """Group by class name, highest score first (stable on ties)."""
    out: Detections = {}
    order = torch.argsort(scores, descending=True, stable=True)
    for i in order.tolist():
        name = classnames[int(labels[i])]
        out.setdefault(name, []).append(Detection(
            label=name, box=tuple(float(v) for v in boxes[i].tolist()), score=float(scores[i]),
            mask=masks[i].cpu().numpy(),
        ))
    return out


def postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, out_size: tuple[int, int], *,
                input_size: tuple[int, int] | None = None, valid_size: tuple[int, int] | None = None,
                classnames: list[str] = COCO_CLASSES, config: PostprocessConfig = PostprocessConfig()) -> Detections:
    """One image: raw query logits -> :data:`Detections` at ``out_size = (H, W)`` of the original image.

    ``input_size`` is the padded network input ``(Hp, Wp)`` and ``valid_size`` the resized image
    inside it; both default to ``out_size`` (no resize, no padding). Only the queries that reach the
    top-k are upsampled (upsampling is per query, so the result equals upsampling all of them).
    """
    input_size = tuple(out_size) if input_size is None else tuple(input_size)
    valid_size = tuple(input_size) if valid_size is None else tuple(valid_size)
    num_classes = class_logits.shape[-1] - 1
    if len(classnames) < num_classes:
        raise ValueError(f"model has {num_classes} classes but only {len(classnames)} class names were given")
    scores = F.softmax(class_logits.float(), dim=-1)[:, :-1]
    k = min(config.max_per_image, scores.numel())
    needed = torch.unique(scores.flatten().topk(k).indices // num_classes)
    rows = torch.full((mask_logits.shape[0],), -1, dtype=torch.long)
    rows[needed] = torch.arange(len(needed))
    upsampled = upsample_masks(mask_logits[needed], input_size, valid_size, out_size)
    labels, boxes, det_scores, masks = instance_postprocess(class_logits, upsampled, max_per_image=config.max_per_image,
                                                            mask_rows=rows)
    return to_detections(labels, boxes, det_scores, masks, classnames)


class Mask2FormerDetector:
    """GenEval's detector: a ``Mask2FormerForUniversalSegmentation`` folder, mmdet post-processing.

    ``Mask2FormerDetector(path)`` loads lazily on first call; ``Mask2FormerDetector.from_model(model)``
    wraps an in-memory model (tests). Call with a list of PIL images -> list of :data:`Detections`.
    """

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 4, classnames: list[str] | None = None, config: PostprocessConfig = PostprocessConfig()):
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.classnames = list(classnames) if classnames is not None else COCO_CLASSES
        self.config = config
        self._model: Any = None

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "Mask2FormerDetector":
        det = cls(None, **kwargs)
        det._model = model.eval()
        return det

    @property
    def model(self) -> Any:
        if self._model is None:
            if self.path is None:
                raise ValueError("Mask2FormerDetector needs a model path")
            from transformers import Mask2FormerForUniversalSegmentation

            try:
                model = Mask2FormerForUniversalSegmentation.from_pretrained(self.path, dtype=self.dtype)
            except (OSError, ValueError) as e:
                raise RuntimeError(f"cannot load Mask2Former from {self.path!r}: {e}") from e
            self._model = model.to(self.device).eval()
        return self._model

    @torch.no_grad()
    def forward_logits(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], list[tuple[int, int]]]:
        """Run the network: ``class_queries_logits [B, Q, C+1]``, ``masks_queries_logits [B, Q, h, w]``, padded size, resized sizes."""
        pixel_values, sizes = preprocess(images, self.config)
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        return out.class_queries_logits.float().cpu(), out.masks_queries_logits.float().cpu(), tuple(pixel_values.shape[-2:]), sizes

    def __call__(self, images: list[Image.Image]) -> list[Detections]:
        results: list[Detections] = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i: i + self.batch_size]
            cls_logits, mask_logits, input_size, sizes = self.forward_logits(chunk)
            for j, img in enumerate(chunk):
                results.append(postprocess(cls_logits[j], mask_logits[j], (img.size[1], img.size[0]),
                                           input_size=input_size, valid_size=sizes[j],
                                           classnames=self.classnames, config=self.config))
        return results


__all__ = [
    "COCO_CLASSES", "PostprocessConfig", "Mask2FormerDetector", "rescale_size", "preprocess", "mask2bbox",
    "upsample_masks", "instance_postprocess", "to_detections", "postprocess",
]
