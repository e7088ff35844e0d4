"""OCR text-rendering reward, as Flow-GRPO (``flow_grpo/ocr.py``, ``OcrScorer``) defines it.

Target text: ``metadata["text"]`` if given, else the first double-quoted span of the prompt
(``prompt.split('"')[1]``, as Flow-GRPO). Recognised text: the concatenation of every
OCR line with confidence > 0. Both are lower-cased with spaces removed. Then::

    dist = 0 if target in recognised else levenshtein(recognised, target)
    dist = min(dist, len(target))
    reward = 1 - dist / len(target)

Range: ``[0, 1]``; 1 when the target text appears in the image.

OCR engine: ``rapidocr-onnxruntime`` (PaddleOCR's PP-OCR models in ONNX, weights shipped
inside the wheel) instead of Flow-GRPO's ``paddleocr``. Unlike Flow-GRPO, an OCR engine
failure raises :class:`RewardError` (never a silent zero); "no text found" is a legitimate 0.
"""
from __future__ import annotations


import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardError
from .registry import register_reward


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def target_text(prompt: str, metadata: dict) -> str:
    """The text the image should show: ``metadata["text"]`` or the prompt's first quoted span."""
    if metadata.get("text"):
        return str(metadata["text"])
    parts = prompt.split('"')
    if len(parts) < 3:
        raise RewardError(f"ocr reward: prompt has no double-quoted text and metadata has no 'text': {prompt!r}")
    return parts[1]


def ocr_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's normalised edit-distance reward (see module docstring)."""
    rec = recognised.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        raise RewardError(f"ocr reward: empty target text {target!r}")
    dist = 0 if tgt in rec else levenshtein(rec, tgt)
    return 1.0 - min(dist, len(tgt)) / len(tgt)


@register_reward("ocr")
class OCRReward(Reward):
    """Text-rendering accuracy from RapidOCR. Range ``[0, 1]``."""

    range = (0.0, 1.0)
    batch_size = 8

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = None):
        super().__init__(device=device, batch_size=batch_size)
        self._engine = None

    def load(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:  # pragma: no cover - dependency is declared
            raise RewardError("ocr reward needs rapidocr-onnxruntime: pip install rapidocr-onnxruntime") from e
        self._engine = RapidOCR()

    def recognise(self, image: Image.Image) -> str:
        """All text lines RapidOCR finds with confidence > 0, concatenated."""
        self.ensure_loaded()
        engine = self._engine
        try:
            result, _ = engine(np.asarray(image.convert("RGB")))
        except Exception as e:
            raise RewardError(f"ocr reward: RapidOCR failed: {e}") from e
        return "".join(text for _, text, conf in (result or []) if float(conf) > 0)

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        targets = [target_text(p, m) for p, m in zip(prompts, metadata)]
        return torch.tensor([ocr_reward(self.recognise(im), t) for im, t in zip(images, targets)], dtype=torch.float32)
