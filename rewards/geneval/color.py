"""GenEval's zero-shot CLIP colour classifier (official ``color_classification``).

open_clip ViT-L-14 with the ``openai`` weights; for each object class a zero-shot head over the
10 official colours built as ``clip_benchmark.zero_shot_classifier`` does (per colour: encode
the three templates, L2-normalise each, average, renormalise); each object is the image
composited onto a ``#999`` background through its mask (``Image.composite``), cropped to its
box (PIL ``crop``), passed through the model's eval transform; the colour is the argmax of
``100 * normalize(image_features) @ head``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .detection import Detection
from .rules import COLORS

TEMPLATES: tuple[str, ...] = (
    "a photo of a {{c}} {classname}",
    "a photo of a {{c}}-colored {classname}",
    "a photo of a {{c}} object",
)
"""The official templates: ``{classname}`` filled first, ``{c}`` (the colour) second."""


def templates_for(classname: str) -> list[str]:
    """The three official templates for ``classname``, each still holding ``{c}``."""
    return [t.format(classname=classname) for t in TEMPLATES]


def object_crop(image: Image.Image, det: Detection, bgcolor: str = "#999", crop: bool = True) -> Image.Image:
    """The official crop: ``image`` composited on ``bgcolor`` through the mask, cropped to the box."""
    image = image.convert("RGB")
    if det.mask is not None:
        mask = np.asarray(det.mask).astype(bool)
        if tuple(mask.shape) != tuple(image.size[::-1]):
            raise ValueError(f"mask shape {mask.shape} does not match image size {image.size[::-1]}")
        blank = Image.new("RGB", image.size, color=bgcolor)
        image = Image.composite(image, blank, Image.fromarray(mask))
    if crop:
        image = image.crop(tuple(det.box[:4]))
    return image


class ClipColorClassifier:
    """``color_fn`` for :func:`rewards.geneval.rules.evaluate`, backed by open_clip.

    ``ClipColorClassifier()`` loads ``ViT-L-14`` / ``openai`` lazily (``pretrained`` may also be a
    local checkpoint file; then use the ``ViT-L-14-quickgelu`` model name for the OpenAI
    weights). ``from_model(model, transform, tokenizer)`` wraps an in-memory model.
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", device: str | torch.device = "cpu",
                 batch_size: int = 16, bgcolor: str = "#999", crop: bool = True, colors: list[str] | None = None):
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.bgcolor = bgcolor
        self.crop = crop
        self.colors = list(colors) if colors is not None else list(COLORS)
        self._model: Any = None
        self._transform: Callable[[Image.Image], torch.Tensor] | None = None
        self._tokenizer: Any = None
        self._heads: dict[str, torch.Tensor] = {}

    @classmethod
    def from_model(cls, model: Any, transform: Callable, tokenizer: Any, **kwargs: Any) -> "ClipColorClassifier":
        clf = cls(**kwargs)
        clf._model, clf._transform, clf._tokenizer = model.eval(), transform, tokenizer
        return clf

    def _load(self) -> None:
        if self._model is not None:
            return
        import open_clip

        try:
            model, _, transform = open_clip.create_model_and_transforms(self.model_name, pretrained=self.pretrained,
                                                                        device=self.device)
        except Exception as e:  # network / missing file: say which model
            raise RuntimeError(f"cannot load CLIP {self.model_name!r} ({self.pretrained!r}): {e}") from e
        self._model, self._transform = model.eval(), transform
        self._tokenizer = open_clip.get_tokenizer(self.model_name)

    @torch.no_grad()
    def head(self, classname: str) -> torch.Tensor:
        """Zero-shot weights ``[D, n_colors]`` for ``classname`` (cached)."""
        if classname not in self._heads:
            self._load()
            weights = []
            for c in self.colors:
                texts = self._tokenizer([t.format(c=c) for t in templates_for(classname)]).to(self.device)
                emb = F.normalize(self._model.encode_text(texts).float(), dim=-1).mean(dim=0)
                weights.append(emb / emb.norm())
            self._heads[classname] = torch.stack(weights, dim=1)
        return self._heads[classname]

    @torch.no_grad()
    def logits(self, image: Image.Image, dets: list[Detection], classname: str | None = None) -> torch.Tensor:
        """``[N, n_colors]`` logits (``100 * cos``) of the detections' crops."""
        self._load()
        if not dets:
            return torch.zeros(0, len(self.colors))
        head = self.head(classname or dets[0].label)
        out = []
        for i in range(0, len(dets), self.batch_size):
            batch = torch.stack([self._transform(object_crop(image, d, self.bgcolor, self.crop)) for d in dets[i: i + self.batch_size]])
            feats = F.normalize(self._model.encode_image(batch.to(self.device)).float(), dim=-1)
            out.append((100.0 * feats @ head).cpu())
        return torch.cat(out)

    def classify_many(self, image: Image.Image, dets: list[Detection], classname: str | None = None) -> list[str]:
        """Colour names of several detections of one class (batched, as the official code)."""
        return [self.colors[int(i)] for i in self.logits(image, dets, classname).argmax(1)]

    def __call__(self, image: Image.Image, det: Detection) -> str:
        return self.classify_many(image, [det])[0]


__all__ = ["TEMPLATES", "templates_for", "object_crop", "ClipColorClassifier"]
