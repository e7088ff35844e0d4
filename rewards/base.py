"""The rewards contract (docs/architecture.md, "Checklist: add a reward").

A reward maps a batch of images, their prompts and their metadata to one float per image:
``Reward(images, prompts, metadata) -> Tensor[B]`` (float32, CPU). Heavy models load lazily,
once, on the rank's device, in eval mode.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from PIL import Image


class RewardError(RuntimeError):
    """A reward could not be computed; training must stop (never a silent zero)."""


class RewardConfigError(ValueError):
    """A reward name, weight or option given by the user is wrong (the CLI prints it as one line)."""


class UnknownRewardError(RewardConfigError, KeyError):
    """No reward of that name is registered."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class Reward:
    """Base class. Subclasses set ``name`` and ``range`` and implement ``score``."""

    name: str = ""
    """Registry name."""
    range: tuple[float, float] = (float("-inf"), float("inf"))
    """Documented range of the score."""
    batch_size: int = 32
    """Images per model call."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = None, **kwargs: Any):
        self.device = torch.device(device)
        if batch_size is not None:
            self.batch_size = int(batch_size)
        if kwargs:
            raise TypeError(f"reward {self.name!r} got unknown options: {sorted(kwargs)}")
        self._loaded = False
        self._load_lock = threading.Lock()

    @classmethod
    def check_metadata(cls, entry: dict, options: dict) -> str | None:
        """What is wrong with one prompt's metadata for this reward built with ``options``, or ``None``.

        Called for every training and evaluation prompt before anything loads (no instance is built), so a
        reward that reads metadata (GenEval classes, counts, tags) refuses a prompt it cannot score in one line
        instead of scoring it 0, or failing, after a rollout. The default: any metadata will do."""
        return None

    def load(self) -> None:
        """Load heavy models onto ``self.device``; runs once, lazily (see :meth:`ensure_loaded`)."""

    def ensure_loaded(self) -> None:
        """Run :meth:`load` exactly once, thread-safe (scoring may run in background threads)."""
        if self._loaded:
            return
        with self._load_lock:
            if not self._loaded:
                self.load()
                self._loaded = True

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        """Score one batch (at most ``batch_size`` images)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if metadata is None:
            metadata = [{} for _ in images]
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(f"reward {self.name!r}: {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        out = []
        for i in range(0, len(images), self.batch_size):
            s = slice(i, i + self.batch_size)
            out.append(torch.as_tensor(self.score(images[s], prompts[s], metadata[s]), dtype=torch.float32).reshape(-1).cpu())
        scores = torch.cat(out) if out else torch.zeros(0)
        if scores.numel() != len(images):
            raise RewardError(f"reward {self.name!r} returned {scores.numel()} scores for {len(images)} images")
        return scores
