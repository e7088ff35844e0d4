"""CLIP score: image-text alignment with any ``open_clip`` model / pretrained tag.

Score (Hessel et al., 2021, "CLIPScore"): ``w * max(cos(image, text), 0)`` with ``w = 2.5``.
``scale`` sets ``w`` (``scale=100`` gives torchmetrics' convention), ``clamp=False`` drops
the ``max(., 0)``.

Range: ``[0, scale]`` (``[-scale, scale]`` without clamping).
``model_name`` may be a built-in name, ``hf-hub:org/repo`` or ``local-dir:/path``.
"""
from __future__ import annotations


import torch
from PIL import Image

from .base import Reward
from .clip_models import load_open_clip, open_clip_features
from .registry import register_reward


@register_reward("clipscore")
class CLIPScore(Reward):
    """CLIPScore. Range ``[0, scale]`` (default ``[0, 2.5]``)."""

    range = (0.0, 2.5)
    batch_size = 32

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", scale: float = 2.5,
                 clamp: bool = True, device: str | torch.device = "cpu", batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self.model_name, self.pretrained = model_name, pretrained
        self.scale, self.clamp = float(scale), bool(clamp)
        self.range = (0.0, self.scale) if self.clamp else (-self.scale, self.scale)
        self._model = None

    def load(self) -> None:
        pretrained = None if self.model_name.startswith(("hf-hub:", "local-dir:")) else self.pretrained
        self._model, self._preprocess, self._tokenizer = load_open_clip(self.model_name, pretrained, self.device)

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        self.ensure_loaded()
        img, txt = open_clip_features(self._model, self._preprocess, self._tokenizer, images, prompts, self.device)
        cos = (img * txt).sum(-1)
        if self.clamp:
            cos = cos.clamp_min(0.0)
        return (self.scale * cos).cpu()
