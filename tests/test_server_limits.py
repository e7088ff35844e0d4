"""The reward server's bounds (issue 17, item 9): decoded pixels per request, requests in progress and
waiting, slow clients, and no open API docs.

Each bound is exercised with events, not timing: a reward that blocks until released holds a
slot, and the slowloris clients wait for the server to close their connection.
"""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from rewards.base import Reward
from rewards.server import create_app, deadline_protocol
from test_reward_server import noise, png_b64, post, serve


class Gate(Reward):
    """Mean brightness, but each call waits until ``release`` is set (and says when it started)."""

    range = (0.0, 1.0)

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def score(self, images, prompts, metadata):
        self.entered.set()
        assert self.release.wait(60)
        import torch

        return torch.tensor([float(np.asarray(im).mean()) / 255 for im in images])


def solid_png(side: int) -> str:
    return png_b64(Image.new("RGB", (side, side), (200, 30, 30)))


def test_decoded_pixels_per_request_are_bounded_before_decoding():
    gate = Gate()
    gate.release.set()
    app = create_app(gate, max_batch=64, max_image_side=4096, max_request_pixels=3 * 64 * 64)
    with serve(app) as url:
        ok = post(url, json={"images": [solid_png(64)] * 3, "prompts": ["a"] * 3})
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 3
        # 4 solid images: a few hundred bytes compressed, over the pixel bound decoded -> 413, nothing decoded
        r = post(url, json={"images": [solid_png(64)] * 4, "prompts": ["a"] * 4})
        assert r.status_code == 413
        assert r.json()["detail"] == "the 4 images hold 16384 pixels, more than max_request_pixels=12288; send " \
                                     "smaller batches"
        big = post(url, json={"images": [solid_png(2048)], "prompts": ["a"]})  # 30 kB of PNG, 4 M pixels
        assert big.status_code == 413 and len(big.request.content) < 100_000
        assert post(url, json={"images": [solid_png(64)], "prompts": ["a"]}).status_code == 200


def test_past_the_requests_in_progress_and_waiting_a_client_gets_429():
    gate = Gate()
    app = create_app(gate, max_concurrent=1, max_queued=1)
    body = {"images": [png_b64(noise(1))], "prompts": ["a"]}
    with serve(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, json=body)  # takes the one slot and blocks in the reward
        assert gate.entered.wait(60)
        second = pool.submit(post, url, json=body)  # waits in line
        for _ in range(600):  # until the server has queued it (it answers /health meanwhile)
            if app.state.waiting() == 1:
                break
            threading.Event().wait(0.05)
        assert app.state.waiting() == 1
        third = post(url, json=body)  # the line is full
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert third.json()["detail"] == "busy: 1 requests in progress and 1 waiting; retry"
        gate.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert post(url, json=body).status_code == 200


def _recv_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_slow_clients_are_closed_and_do_not_lock_others_out():
    gate = Gate()
    gate.release.set()
    app = create_app(gate, body_timeout=2)  # short, but long enough for a starved client thread
    with serve(app, http=deadline_protocol(header_timeout=2)) as url:
        u = urlparse(url)
        slow = []
        for i in range(20):  # slowloris: a partial request line / headers, then nothing
            s = socket.create_connection((u.hostname, u.port), timeout=60)
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"PO")
            slow.append(s)
        idle = socket.create_connection((u.hostname, u.port), timeout=60)  # connects, never sends
        for s in [*slow, idle]:
            assert _recv_until_closed(s) == b""  # closed by the server, no answer
            s.close()
        # headers complete but the body never arrives in time: 408
        s = socket.create_connection((u.hostname, u.port), timeout=60)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        answer = _recv_until_closed(s)
        s.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received within 2 s" in answer
        # a normal client still gets its scores, also twice on one keep-alive connection
        with httpx.Client(timeout=30) as c:
            for _ in range(2):
                r = c.post(f"{url}/score", json={"images": [png_b64(noise(2))], "prompts": ["a"]})
                assert r.status_code == 200


def test_no_open_api_docs():
    app = create_app(Gate(), token="secret")
    with serve(app) as url:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert httpx.get(f"{url}{path}", timeout=10).status_code == 404, path
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_the_remote_client_prints_each_retry_and_knows_its_worst_case(capsys):
    """Item 11: a reward server that fails makes the run wait; each retry says so, and the wait is bounded."""
    import pytest

    from rewards.base import RewardError
    from rewards.remote import RemoteReward
    from test_reward_server import garbage_app

    assert RemoteReward("http://127.0.0.1:1").worst_case_seconds == 4 * 60 + 0.5 + 1 + 2  # the defaults: ~4 min
    assert RemoteReward("http://127.0.0.1:1", timeout=5, retries=1, backoff=1).worst_case_seconds == 11
    hits: list[int] = []
    with serve(garbage_app({"detail": "warming up"}, hits, 503)) as url:
        with pytest.raises(RewardError, match="failed after 3 attempts: HTTP 503"):
            RemoteReward(url, retries=2, backoff=0.01, timeout=5)([noise(1)], ["a"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"remote reward at {url}: attempt 1 of 3 failed (HTTP 503 {{\"detail\":\"warming up\"}}); retrying in 0.01 s",
                   f"remote reward at {url}: attempt 2 of 3 failed (HTTP 503 {{\"detail\":\"warming up\"}}); retrying in 0.02 s"]
    assert len(hits) == 3
