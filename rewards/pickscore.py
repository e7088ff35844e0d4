"""PickScore (Kirstain et al., 2023): a CLIP-H model fine-tuned on Pick-a-Pic preferences.

Loading, as the authors publish it: processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
model ``yuvalkirstain/PickScore_v1`` (``transformers.CLIPModel``).

Score, as in the authors' README::

    score = model.logit_scale.exp() * cos(image_embedding, text_embedding)

Range: ``[-s, s]`` with ``s = logit_scale.exp()`` (100 for PickScore_v1), so
``[-100, 100]``; real images typically score about 18-24. Flow-GRPO trains on
``score / 26``: pass ``scale=1/26`` to reproduce that (the result is multiplied by ``scale``).
"""
from __future__ import annotations


import torch
from PIL import Image

from .base import Reward
from .clip_models import hf_clip_features, load_hf_clip
from .registry import register_reward


@register_reward("pickscore")
class PickScore(Reward):
    """PickScore preference reward. Range ``[-100 * scale, 100 * scale]`` (typ. 18-24 at scale 1)."""

    range = (-100.0, 100.0)
    batch_size = 16

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", scale: float = 1.0,
                 device: str | torch.device = "cpu", batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self.model_id, self.processor_id, self.scale = model, processor, float(scale)
        self.range = (-100.0 * abs(self.scale), 100.0 * abs(self.scale))
        self._model = self._processor = None

    def load(self) -> None:
        self._model, self._processor = load_hf_clip(self.model_id, self.processor_id, self.device)

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        self.ensure_loaded()
        img, txt = hf_clip_features(self._model, self._processor, images, prompts, self.device)
        logit_scale = self._model.logit_scale.exp().float()
        return (self.scale * logit_scale * (img * txt).sum(-1)).cpu()
