"""HTTP reward server: serves any registered reward (FastAPI app factory).

Endpoints:

* ``GET /health`` -> ``{"reward": name, "range": [lo, hi], "max_batch": N}``
* ``POST /score`` with JSON ``{"images": [base64 PNG/JPEG], "prompts": [str], "metadata": [dict]}``
  (``metadata`` optional) -> ``{"scores": [float]}``

Safety: binds 127.0.0.1 by default (see ``launch/reward_server.py``); optional bearer token
(no header 401, wrong token 403) on ``/score`` (``/health`` stays open: it only names the reward);
no ``/docs``, ``/redoc`` or ``/openapi.json``. Limits, each answered with one line:

* request bytes, batch size, image side and **decoded pixels per request** (413; the pixel count
  is read from the image headers before anything is decoded, so a request of 64 solid 2048x2048
  PNGs, 1.4 MB compressed, is refused instead of costing 1 GB);
* **requests in progress** (``max_concurrent``: reading, decoding and scoring; at most that many
  requests' images are decoded at once) and **requests waiting** for a slot (``max_queued``):
  past both, 429 with ``Retry-After`` (the client retries 429);
* **slow clients**: a connection whose request headers are not complete within
  ``header_timeout`` seconds is closed (``deadline_protocol``, passed to uvicorn as its HTTP
  protocol), and a body not received within ``body_timeout`` seconds is a 408.

Worst case memory is about ``max_concurrent * (max_request_mb + 4 bytes * max_request_pixels)``.
Anything malformed (not JSON, wrong types or lengths, not a PNG/JPEG) is a 400/422 and the
server keeps serving. Images are decoded with PIL from PNG/JPEG only; nothing is ever
unpickled. Scoring runs in a worker thread, one batch at a time (models are not thread-safe),
so the event loop keeps answering. A reward that fails or returns non-finite scores answers
500 with the reason (the client retries, then fails loudly).
"""
from __future__ import annotations

import asyncio
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


def open_image(data: Any, index: int, max_side: int) -> Image.Image:
    """Base64 PNG/JPEG -> PIL image with only its header read; HTTPException 422 (malformed) or 413 (too large)."""
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
    return im


def decode_image(data: Any, index: int, max_side: int) -> Image.Image:
    """Base64 PNG/JPEG -> loaded PIL image; HTTPException 422 (malformed) or 413 (too large)."""
    return _load(open_image(data, index, max_side), index)


def _load(im: Image.Image, index: int) -> Image.Image:
    try:
        im.load()
    except Exception:
        raise HTTPException(422, f"images[{index}] is truncated or corrupt")
    return im


def parse_request(body: bytes, max_batch: int, max_side: int,
                  max_pixels: int | None = None) -> tuple[list[Image.Image], list[str], list[dict]]:
    """Validate a ``/score`` body; raise HTTPException 400/413/422 with one clear line. Every image's
    header is read (format, size) before any is decoded, and the total pixel count is held to
    ``max_pixels``."""
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
    opened = [open_image(d, i, max_side) for i, d in enumerate(images)]
    pixels = sum(im.size[0] * im.size[1] for im in opened)
    if max_pixels is not None and pixels > max_pixels:
        raise HTTPException(413, f"the {len(opened)} images hold {pixels} pixels, more than max_request_pixels="
                                 f"{max_pixels}; send smaller batches")
    return [_load(im, i) for i, im in enumerate(opened)], prompts, metadata


DEFAULT_MAX_REQUEST_PIXELS = 2**25
"""33.5 M pixels per request (32 images of 1024 x 1024, 128 MB decoded as RGBA)."""


def create_app(reward: Reward, token: str | None = None, max_batch: int = 64,
               max_image_side: int = 2048, max_request_mb: float = 64.0,
               max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, max_concurrent: int = 4, max_queued: int = 64,
               body_timeout: float = 60.0) -> FastAPI:
    """A FastAPI app serving ``reward``. Run it with uvicorn (``launch/reward_server.py``), with
    ``http=deadline_protocol(header_timeout)`` for the header timeout."""
    if max_concurrent < 1 or max_queued < 0 or max_request_pixels < 1 or not body_timeout > 0:
        raise ValueError("max_concurrent must be >= 1, max_queued >= 0, max_request_pixels >= 1, body_timeout > 0")
    max_bytes = int(max_request_mb * 1024 * 1024)
    lock = threading.Lock()
    slots = asyncio.Semaphore(max_concurrent)
    waiting = 0
    app = FastAPI(title=f"fpo-diffusion reward server ({reward.name})", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.waiting = lambda: waiting  # requests waiting for a slot (for tests and monitoring)

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

        async def receive() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(413, f"request exceeds {max_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), body_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"request body not received within {body_timeout:g} s",
                                headers={"Connection": "close"}) from None
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
        nonlocal waiting
        check_auth(request)
        if slots.locked():  # every slot busy: wait in line, if the line is not full
            if waiting >= max_queued:
                raise HTTPException(429, f"busy: {max_concurrent} requests in progress and {waiting} waiting; retry",
                                    headers={"Retry-After": "1"})
            waiting += 1
            try:
                await slots.acquire()
            finally:
                waiting -= 1
        else:
            await slots.acquire()
        try:
            body = await read_body(request)
            images, prompts, metadata = await run_in_threadpool(parse_request, body, max_batch, max_image_side,
                                                                max_request_pixels)
            del body
            return {"scores": await run_in_threadpool(run_reward, images, prompts, metadata)}
        finally:
            slots.release()

    return app


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def deadline_protocol(header_timeout: float = 10.0):
    """uvicorn's h11 HTTP protocol with a deadline for request headers: a connection that has not sent
    complete headers ``header_timeout`` seconds after it opened (or after its previous response) is
    closed, so slow or idle clients (slowloris) cannot hold connections open. Pass the returned class
    as ``uvicorn.run(..., http=deadline_protocol(10))``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # headers still incomplete
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers on this keep-alive connection

    DeadlineH11Protocol.__name__ = f"DeadlineH11Protocol_{header_timeout:g}s"
    return DeadlineH11Protocol
