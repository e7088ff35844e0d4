"""Cheap pixel-statistics rewards: smoke tests, demos and sanity checks of a training setup."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .base import Reward
from .registry import register_reward


@register_reward("brightness")
class Brightness(Reward):
    """Mean pixel intensity in ``[0, 1]`` (all channels). Trivially gameable: for smoke tests only."""

    range = (0.0, 1.0)

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return torch.tensor([np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255.0 for im in images])
