"""The ``geneval`` reward: GenEval's rules as a training reward.

Options: ``detector`` (a Mask2Former folder for ``Mask2FormerDetector``, or any callable
``images -> list[Detections]`` such as the exact shapes detector), ``strict`` (True: 1/0
correctness; False: the clause fraction, the share of include/exclude clauses that hold),
``clip_model`` / ``clip_pretrained`` for the colour classifier (loaded only when a colour
clause meets a detection without ``Detection.color``), the official thresholds, and
``exact_counts`` (default ``False``: GenEval's rules). GenEval reads one detection per class
outside counting, so an image with extra copies of the asked objects passes two_object, colors,
color_attr and position; on the embedded shapes model RL learned to draw such copies where
position's rule looks (BENCHMARKS.md, "Position learns, by drawing extra copies").
``exact_counts: true`` adds counting's exclude clause (``count + 1``) to every asked class, so
every asked class must appear exactly as often as asked.
Every image needs its GenEval metadata (``include``/``exclude``/``tag``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from ..base import Reward, RewardError
from ..registry import register_reward
from .metadata import TASKS, validate_metadata, with_exact_counts
from .rules import Thresholds, evaluate


@register_reward("geneval")
class GenEvalReward(Reward):
    """GenEval correctness (``strict``) or the clause fraction (``RuleResult.clause_fraction``), in ``[0, 1]``."""

    range = (0.0, 1.0)
    batch_size = 8

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = None, *,
                 detector: str | Callable[[list[Image.Image]], list[dict]] | None = None, strict: bool = True,
                 clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                 thresholds: Thresholds | dict | None = None, color_fn: Callable | None = None,
                 exact_counts: bool = False, **kwargs: Any):
        super().__init__(device=device, batch_size=batch_size, **kwargs)
        if not isinstance(exact_counts, bool):
            raise ValueError(f"reward 'geneval': exact_counts must be true or false, got {exact_counts!r}")
        self.exact_counts = exact_counts
        if detector is None:
            raise ValueError("reward 'geneval' needs option 'detector' (a Mask2Former folder or a callable)")
        if isinstance(detector, str):
            from .mask2former import Mask2FormerDetector

            detector = Mask2FormerDetector(detector, device=self.device)
        elif not callable(detector):
            raise TypeError(f"reward 'geneval': detector must be a path or a callable, got {type(detector).__name__}")
        self.detector = detector
        self.strict = bool(strict)
        self.thresholds = Thresholds(**thresholds) if isinstance(thresholds, dict) else (thresholds or Thresholds())
        self._color_fn = color_fn
        self._clip = (clip_model, clip_pretrained)

    @classmethod
    def check_metadata(cls, entry: dict, options: dict) -> str | None:
        """GenEval metadata with one of the six task tags, positive integer counts and, for the Mask2Former
        detector (``detector`` a folder), classes among GenEval's 80 COCO names (a callable detector's classes
        are its own)."""
        names = None
        if isinstance(options.get("detector"), str):
            from .mask2former import COCO_CLASSES

            names = set(COCO_CLASSES)
        problem = validate_metadata(entry, names, TASKS)
        return f"needs GenEval metadata: {problem}" if problem else None

    @property
    def color_fn(self) -> Callable:
        if self._color_fn is None:
            from .color import ClipColorClassifier

            self._color_fn = ClipColorClassifier(self._clip[0], self._clip[1], device=self.device)
        return self._color_fn

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        for m in metadata:
            problem = validate_metadata(m)
            if problem:
                raise RewardError(f"reward 'geneval' needs GenEval metadata per image: {problem}")
        dets = self.detector(images)
        if len(dets) != len(images):
            raise RewardError(f"geneval detector returned {len(dets)} results for {len(images)} images")
        out = []
        for image, d, m in zip(images, dets, metadata):
            meta = with_exact_counts(m) if self.exact_counts else m
            r = evaluate(d, meta, image=image, color_fn=_Lazy(self), thresholds=self.thresholds)
            out.append(float(r.correct) if self.strict else r.clause_fraction)
        return torch.tensor(out, dtype=torch.float32)


class _Lazy:
    """A ``color_fn`` that builds the CLIP classifier only when first called (keeps ``classify_many``)."""

    def __init__(self, reward: GenEvalReward):
        self.reward = reward

    def __call__(self, image: Image.Image, det: Any) -> str:
        return self.reward.color_fn(image, det)

    def classify_many(self, image: Image.Image, dets: list) -> list[str]:
        fn = self.reward.color_fn
        many = getattr(fn, "classify_many", None)
        return many(image, dets) if many is not None else [fn(image, d) for d in dets]


__all__ = ["GenEvalReward"]
