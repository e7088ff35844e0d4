"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022).

Loading, as DDPO and Flow-GRPO do it: ``transformers`` CLIP ViT-L/14
(``openai/clip-vit-large-patch14``); the MLP head's state dict
``sac+logos+ava1-l14-linearMSE.pth`` (keys ``layers.{0,2,4,6,7}.{weight,bias}``) from
github.com/christophschuhmann/improved-aesthetic-predictor, a local file, or a hub repo
holding that file.

Score: ``MLP(e / |e|)`` with ``e`` the CLIP image embedding and the MLP
``Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16)
Linear(16,1)`` (no activations, dropout off at eval). The prompt is not used.

Range: unbounded in principle, ratings on a 1-10 scale in practice (typically 4-7).
"""
from __future__ import annotations


import torch
from PIL import Image
from torch import nn

from .base import Reward
from .clip_models import hf_clip_features, load_hf_clip, resolve_file
from .registry import register_reward

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (same module layout, so the released state dict loads)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def load_aesthetic_mlp(path: str) -> AestheticMLP:
    """Load the head; its input size is read from ``layers.0.weight``."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(int(sd["layers.0.weight"].shape[1]))
    mlp.load_state_dict(sd, strict=True)
    return mlp.eval()


@register_reward("aesthetic")
class AestheticScore(Reward):
    """LAION aesthetic v2 score. Range: roughly ``[1, 10]`` (typ. 4-7)."""

    range = (1.0, 10.0)
    batch_size = 32

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", processor: str | None = None,
                 head: str | None = None, device: str | torch.device = "cpu", batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self.clip_model, self.processor_id, self.head = clip_model, processor, head
        self._model = None

    def load(self) -> None:
        model, self._processor = load_hf_clip(self.clip_model, self.processor_id, self.device)
        path = resolve_file(self.head, AESTHETIC_FILE) if self.head else resolve_file(
            AESTHETIC_FILE, AESTHETIC_FILE, url=AESTHETIC_URL)
        self._mlp = load_aesthetic_mlp(path).to(self.device)
        self._model = model

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        self.ensure_loaded()
        img, _ = hf_clip_features(self._model, self._processor, images, None, self.device)
        return self._mlp(img).squeeze(-1).cpu()
