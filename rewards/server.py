"""HTTP reward server: serves any registered reward (FastAPI app factory).

Endpoints:

* ``GET /health`` -> ``{"reward": name, "range": [lo, hi], "max_batch": N}``
* ``POST /score`` with JSON ``{"images": [base64 PNG/JPEG], "prompts": [str], "metadata": [dict]}``
  (``metadata`` optional) -> ``{"scores": [float]}``

Safety: binds 127.0.0.1 by default (see ``launch/reward_server.py``); optional bearer token
(no header 401, wrong token 403) on ``/score`` (``/health`` stays open: it only names the reward); limits on request bytes (413), batch size (413) and image
side (413); anything malformed (not JSON, wrong types or lengths, not a PNG/JPEG) is a 400/422
and the server keeps serving. Images are decoded with PIL from PNG/JPEG only; nothing is
ever unpickled. Scoring runs in a worker thread, one batch at a time (models are not
thread-safe), so the event loop keeps answering. A reward that fails or returns non-finite
scores answers 500 with the reason (the client retries, then fails loudly).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import secrets
import threading
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from .base import Reward

ALLOWED_FORMATS = ("PNG", "JPEG")


def decode_image(data: Any, index: int, max_side: int) -> Image.Image:
    """Base64 PNG/JPEG -> loaded PIL image; HTTPException 422 (malformed) or 413 (too large)."""
    if not isinstance(data, str):
        raise HTTPException(422, f"images[{index}] must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"images[{index}] is not valid base64")
    try:
        im = Image.open(io.BytesIO(raw))
    except Exception:
        raise HTTPException(422, f"images[{index}] is not a readable image")
    if im.format not in ALLOWED_FORMATS:
        raise HTTPException(422, f"images[{index}] is {im.format}, only PNG and JPEG are accepted")
    if max(im.size) > max_side:
        raise HTTPException(413, f"images[{index}] is {im.size[0]}x{im.size[1]}, larger than {max_side} px")
    try:
        im.load()
    except Exception:
        raise HTTPException(422, f"images[{index}] is truncated or corrupt")
    return im


def parse_request(body: bytes, max_batch: int, max_side: int) -> tuple[list[Image.Image], list[str], list[dict]]:
    """Validate a ``/score`` body; raise HTTPException 400/413/422 with one clear line."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "body is not JSON")
    except RecursionError:
        raise HTTPException(400, "body is JSON nested too deeply")
    if not isinstance(payload, dict):
        raise HTTPException(422, "body must be a JSON object with 'images' and 'prompts'")
    images, prompts = payload.get("images"), payload.get("prompts")
    metadata = payload.get("metadata")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise HTTPException(422, "'images' and 'prompts' must be lists")
    if metadata is None:
        metadata = [{} for _ in images]
    if not isinstance(metadata, list):
        raise HTTPException(422, "'metadata' must be a list of objects")
    if not (len(images) == len(prompts) == len(metadata)):
        raise HTTPException(422, f"{len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata: lengths differ")
    if len(images) > max_batch:
        raise HTTPException(413, f"batch of {len(images)} exceeds max_batch={max_batch}")
    if not all(isinstance(p, str) for p in prompts):
        raise HTTPException(422, "'prompts' must be strings")
    if not all(isinstance(m, dict) for m in metadata):
        raise HTTPException(422, "'metadata' must be a list of objects")
    return [decode_image(d, i, max_side) for i, d in enumerate(images)], prompts, metadata


def create_app(reward: Reward, token: str | None = None, max_batch: int = 64,
               max_image_side: int = 2048, max_request_mb: float = 64.0) -> FastAPI:
    """A FastAPI app serving ``reward``. Run it with uvicorn (``launch/reward_server.py``)."""
    max_bytes = int(max_request_mb * 1024 * 1024)
    lock = threading.Lock()
    app = FastAPI(title=f"fpo-diffusion reward server ({reward.name})")

    def check_auth(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(header[7:].strip().encode(), token.encode()):
            raise HTTPException(403, "invalid token")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > max_bytes:
                    raise HTTPException(413, f"request of {declared} bytes exceeds {max_bytes}")
            except ValueError:
                raise HTTPException(400, "bad Content-Length")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise HTTPException(413, f"request exceeds {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def run_reward(images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> list[float]:
        with lock:
            try:
                scores = reward(images, prompts, metadata)
            except Exception as e:
                raise HTTPException(500, f"reward {reward.name!r} failed: {type(e).__name__}: {e}")
        out = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist()
        if len(out) != len(images) or not all(math.isfinite(s) for s in out):
            raise HTTPException(500, f"reward {reward.name!r} returned invalid scores")
        return out

    @app.get("/health")
    async def health() -> dict:
        lo, hi = reward.range
        return {"reward": reward.name, "range": [_json_float(lo), _json_float(hi)], "max_batch": max_batch}

    @app.post("/score")
    async def score(request: Request) -> dict:
        check_auth(request)
        body = await read_body(request)
        images, prompts, metadata = await run_in_threadpool(parse_request, body, max_batch, max_image_side)
        return {"scores": await run_in_threadpool(run_reward, images, prompts, metadata)}

    return app


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")
