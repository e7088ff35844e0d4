"""Client for a reward served by ``launch/reward_server.py`` (registered as ``"remote"``).

Protocol (see :mod:`rewards.server`): ``POST {url}/score`` with JSON
``{"images": [base64 PNG/JPEG], "prompts": [...], "metadata": [...]}`` answered by
``{"scores": [...]}``; optional ``Authorization: Bearer <token>``. Images travel as PNG
(lossless) by default, never as pickles.

The token is read from the environment variable ``$REWARD_SERVER_TOKEN`` (the one the server reads too;
another with the ``token_env`` option, e.g. one variable per server), so that it never sits in a config
file: a ``token`` option still works, but the trainer writes every option named like a secret as
``<redacted>`` (``fpo_diffusion.config_io.redacted``).

Failure policy: connection errors, timeouts, 5xx answers and malformed answers (not JSON,
wrong length, non-numbers, non-finite numbers) are retried ``retries`` times with
exponential backoff (``backoff * 2**attempt`` seconds); 4xx answers (other than 408/429)
are not retried since repeating them cannot help. Each retry prints one line to stderr (what
failed, which attempt, the wait). When nothing valid comes back, :class:`RewardError` says why.
A failed reward is never a zero.

Worst case before the error (a server that accepts connections and never answers):
``(retries + 1) * timeout + backoff * (2**retries - 1)`` seconds per batch
(:attr:`RemoteReward.worst_case_seconds`): 4 x 60 + 3.5 = 243.5 s, about 4 minutes, with the
defaults. Lower ``timeout`` / ``retries`` in ``reward.options`` for a faster stop.

Range: whatever the served reward's range is (unknown to the client).
"""
from __future__ import annotations

import base64
import io
import math
import os
import sys
import threading
import time
from typing import Any

import torch
from PIL import Image

from .base import Reward, RewardError
from .registry import register_reward


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    """Base64 of ``image`` saved as PNG (default, lossless) or JPEG (quality 95)."""
    buf = io.BytesIO()
    im = image if image.mode in ("RGB", "L", "RGBA") or fmt == "PNG" else image.convert("RGB")
    if fmt == "JPEG":
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_scores(payload: Any, n: int) -> list[float]:
    """Validate a server answer: ``{"scores": [n finite numbers]}``; raise ValueError otherwise."""
    if not isinstance(payload, dict) or "scores" not in payload:
        raise ValueError(f"answer is not {{'scores': [...]}}: {str(payload)[:200]}")
    scores = payload["scores"]
    if not isinstance(scores, list) or len(scores) != n:
        raise ValueError(f"expected {n} scores, got {len(scores) if isinstance(scores, list) else type(scores).__name__}")
    out = []
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"score {s!r} is not a finite number")
        out.append(float(s))
    return out


TOKEN_ENV = "REWARD_SERVER_TOKEN"
"""The environment variable the client reads its bearer token from (``launch/reward_server.py`` reads the same)."""


@register_reward("remote")
class RemoteReward(Reward):
    """HTTP client reward. Range: the served reward's."""

    batch_size = 32

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, image_format: str = "PNG", device: str | torch.device = "cpu",
                 batch_size: int | None = None, token_env: str = TOKEN_ENV):
        super().__init__(device=device, batch_size=batch_size)
        if image_format not in ("PNG", "JPEG"):
            raise ValueError(f"remote reward: image_format must be PNG or JPEG, got {image_format!r}")
        self.url = url.rstrip("/")
        if token is None and token_env:  # the documented way: the token stays out of every file the run writes
            token = os.environ.get(token_env) or None
        self.token, self.timeout, self.retries, self.backoff = token, float(timeout), int(retries), float(backoff)
        self.image_format = image_format
        self._client = None
        self._lock = threading.Lock()

    def _http(self):
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                self._client = httpx.Client(timeout=self.timeout, headers=headers)
        return self._client

    @property
    def worst_case_seconds(self) -> float:
        """The longest one batch can take before :class:`RewardError` (every attempt timing out)."""
        return (self.retries + 1) * self.timeout + self.backoff * (2 ** self.retries - 1)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def health(self) -> dict:
        """``GET /health`` (raises RewardError if the server does not answer)."""
        try:
            r = self._http().get(f"{self.url}/health")
            r.raise_for_status()
            return r.json()
        except Exception as e:
            raise RewardError(f"remote reward at {self.url}: health check failed: {e}") from e

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        import httpx

        body = {"images": [encode_image(im, self.image_format) for im in images],
                "prompts": list(prompts), "metadata": list(metadata)}
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff * 2 ** (attempt - 1)
                print(f"remote reward at {self.url}: attempt {attempt} of {self.retries + 1} failed ({last[:200]}); "
                      f"retrying in {wait:g} s", file=sys.stderr, flush=True)
                time.sleep(wait)
            try:
                r = self._http().post(f"{self.url}/score", json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                raise RewardError(f"remote reward at {self.url} refused the request: HTTP {r.status_code} {r.text[:300]}")
            if r.status_code != 200:
                last = f"HTTP {r.status_code} {r.text[:300]}"
                continue
            try:
                return torch.tensor(parse_scores(r.json(), len(images)), dtype=torch.float64)
            except ValueError as e:  # includes JSON decode errors
                last = f"malformed answer: {e}"
        raise RewardError(f"remote reward at {self.url} failed after {self.retries + 1} attempts: {last}")
