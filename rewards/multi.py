"""Weighted sum of rewards, every component kept for logging.

``MultiReward({"pickscore": 1.0, "ocr": 0.5})(images, prompts, metadata)`` returns
``(total, components)`` with ``total = sum_k w_k * components[k]``. Components are built
lazily through the registry, once, on first use. A component named ``"remote:<url>"``
(or ``"remote"`` with ``options["remote"] = {"url": ...}``) is the HTTP client reward.

:meth:`MultiReward.submit` scores in a background thread and returns a
``concurrent.futures.Future`` so that the trainer can overlap scoring with the next
rollout chunk. Any failure (unknown name, non-finite score, remote failure) raises:
a failed reward is never a silent zero. With ``nonfinite="keep"`` (what the trainer uses)
NaN/Inf scores are returned as they are, for the caller to act on: the trainer skips that
iteration's update and counts it toward ``train.max_nonfinite_in_a_row``.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from .base import Reward, RewardConfigError, RewardError, UnknownRewardError
from .registry import available_rewards, build_reward, reward_class

REMOTE_PREFIX = "remote:"


class MultiReward:
    """Weighted multi-reward. Range: ``sum_k w_k * range_k`` (see each component)."""

    def __init__(self, weights: dict[str, float], options: dict[str, dict] | None = None,
                 device: str | torch.device = "cpu", max_workers: int = 1, nonfinite: str = "raise"):
        if not weights:
            raise RewardConfigError("MultiReward needs at least one {name: weight}")
        options = dict(options or {})
        known = set(available_rewards())
        for name, w in weights.items():
            base = "remote" if name.startswith(REMOTE_PREFIX) else name
            if base not in known:
                raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(sorted(known))}, remote:<url>")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise RewardConfigError(f"reward {name!r}: weight must be a finite number, got {w!r}")
        extra = sorted(set(options) - set(weights))
        if extra:
            raise RewardConfigError(f"options given for rewards without a weight: {extra}")
        if "remote" in weights and "url" not in options.get("remote", {}):
            raise RewardConfigError("reward 'remote' needs options {'remote': {'url': 'http://host:port'}}")
        if nonfinite not in ("raise", "keep"):
            raise ValueError(f"nonfinite must be 'raise' or 'keep', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.weights = {k: float(v) for k, v in weights.items()}
        self.options = options
        self.device = device
        self._components: dict[str, Reward] = {}
        self._classes: dict[str, type[Reward]] | None = None
        self._lock = threading.Lock()
        self._max_workers = int(max_workers)
        self._pool: ThreadPoolExecutor | None = None

    def component(self, name: str) -> Reward:
        """The reward for ``name``, built on first use."""
        with self._lock:
            if name not in self._components:
                opts = dict(self.options.get(name, {}))
                opts.setdefault("device", self.device)
                if name.startswith(REMOTE_PREFIX):
                    opts.setdefault("url", name[len(REMOTE_PREFIX):])
                    self._components[name] = build_reward("remote", **opts)
                else:
                    self._components[name] = build_reward(name, **opts)
            return self._components[name]

    def check_metadata(self, entry: dict) -> str | None:
        """What is wrong with one prompt's metadata for any component (``Reward.check_metadata``), or ``None``;
        builds nothing (a remote reward's server is not asked)."""
        if self._classes is None:
            self._classes = {name: reward_class(name) for name in self.weights
                             if not (name.startswith(REMOTE_PREFIX) or name == "remote")}
        for name, cls in self._classes.items():
            problem = cls.check_metadata(entry or {}, dict(self.options.get(name, {})))
            if problem:
                return f"reward {name!r}: {problem}"
        return None

    def __call__(self, images: list[Image.Image], prompts: list[str],
                 metadata: list[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if metadata is None:
            metadata = [{} for _ in images]
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(images), dtype=torch.float32)
        for name, w in self.weights.items():
            try:
                s = self.component(name)(images, prompts, metadata)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
            s = torch.as_tensor(s, dtype=torch.float32).reshape(-1)
            if s.numel() != len(images):
                raise RewardError(f"reward {name!r} returned {s.numel()} scores for {len(images)} images")
            bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
            if bad and self.nonfinite == "raise":
                raise RewardError(f"reward {name!r} returned non-finite scores at indices {bad[:10]}")
            components[name] = s
            total = total + w * s
        return total, components

    def submit(self, images: list[Image.Image], prompts: list[str],
               metadata: list[dict] | None = None) -> Future:
        """Score in a background thread; ``future.result()`` is ``(total, components)`` or raises."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="reward")
        return self._pool.submit(self.__call__, list(images), list(prompts),
                                 None if metadata is None else [dict(m) for m in metadata])

    def close(self) -> None:
        """Wait for pending scoring and stop the background thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"MultiReward({self.weights})"


def build_multi_reward(config: dict[str, Any], device: str | torch.device = "cpu") -> MultiReward:
    """From a config mapping ``{name: weight}`` or ``{name: {"weight": w, **options}}``."""
    weights, options = {}, {}
    for name, v in config.items():
        if isinstance(v, dict):
            v = dict(v)
            weights[name] = v.pop("weight", 1.0)
            if v:
                options[name] = v
        else:
            weights[name] = v
    return MultiReward(weights, options, device=device)
