"""Human Preference Score v2 / v2.1 (Wu et al., 2023), without the ``hpsv2`` package.

Loading, as the authors publish it: an ``open_clip`` ViT-H-14 whose full state dict is
replaced by the HPS checkpoint, ``torch.load(ckpt)["state_dict"]``, from hub repo
``xswu/HPSv2``: ``HPS_v2_compressed.pt`` (v2.0) or ``HPS_v2.1_compressed.pt`` (v2.1).
The LAION base weights are not downloaded since the checkpoint overwrites every tensor.
Preprocessing follows HPSv2's validation transform (bicubic resize to 224, centre crop,
OpenAI mean/std).

Score, as ``hpsv2.score`` computes it: ``cos(image_embedding, text_embedding)``
(the diagonal of ``image_features @ text_features.T`` on normalised features).

Range: ``[-1, 1]`` (typically 0.2-0.35). Papers often report ``100 * score``: pass
``scale=100`` for that.
"""
from __future__ import annotations


import torch
from PIL import Image

from .base import Reward
from .clip_models import load_open_clip, open_clip_features, resolve_file
from .registry import register_reward

HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_REPO = "xswu/HPSv2"


def load_hps_state_dict(checkpoint: str) -> dict[str, torch.Tensor]:
    """Read an HPS checkpoint (``{"state_dict": ...}`` or a bare state dict), stripping ``module.``."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict):
        raise ValueError(f"{checkpoint}: not an HPS state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


@register_reward("hps")
class HPSv2(Reward):
    """HPSv2/v2.1 reward: cosine of open_clip embeddings. Range ``[-scale, scale]`` (typ. 0.2-0.35)."""

    range = (-1.0, 1.0)
    batch_size = 16

    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, model_name: str = "ViT-H-14",
                 scale: float = 1.0, device: str | torch.device = "cpu", batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"hps: version must be one of {sorted(HPS_CHECKPOINTS)}, got {version!r}")
        self.version, self.checkpoint, self.model_name, self.scale = version, checkpoint, model_name, float(scale)
        self.range = (-abs(self.scale), abs(self.scale))
        self._model = None

    def load(self) -> None:
        model, preprocess, tokenizer = load_open_clip(self.model_name, None, self.device, preprocess="hps")
        path = resolve_file(self.checkpoint or HPS_REPO, HPS_CHECKPOINTS[self.version])
        model.load_state_dict(load_hps_state_dict(path), strict=True)
        self._preprocess, self._tokenizer, self._model = preprocess, tokenizer, model.eval()

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        self.ensure_loaded()
        img, txt = open_clip_features(self._model, self._preprocess, self._tokenizer, images, prompts, self.device)
        return (self.scale * (img * txt).sum(-1)).cpu()
