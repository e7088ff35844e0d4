"""Reward server on loopback (uvicorn in a thread) and the remote client reward."""
from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image

from rewards.base import Reward, RewardError
from rewards.multi import MultiReward
from rewards.registry import build_reward
from rewards.remote import RemoteReward, encode_image
from rewards.server import create_app

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def serve(app: FastAPI, **uvicorn_options):
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def noise(seed: int, side: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side + seed % 7, 3), dtype=np.uint8))


def png_b64(im: Image.Image) -> str:
    return encode_image(im, "PNG")


@pytest.fixture(scope="module")
def jpeg_server():
    reward = build_reward("jpeg_incompressibility")
    app = create_app(reward, max_batch=8, max_image_side=256, max_request_mb=0.25)
    with serve(app) as url:
        yield url, reward


def test_health_and_round_trip_equals_in_process(jpeg_server):
    url, reward = jpeg_server
    assert httpx.get(f"{url}/health").json()["reward"] == "jpeg_incompressibility"
    ims = [noise(i) for i in range(11)]
    prompts = [f"p{i}" for i in range(11)]
    client = build_reward("remote", url=url, batch_size=4)  # 3 requests
    torch.testing.assert_close(client(ims, prompts), reward(ims, prompts), rtol=0, atol=0)
    jpeg_client = RemoteReward(url, image_format="JPEG")
    assert jpeg_client(ims[:2], prompts[:2]).shape == (2,)


def test_sixteen_concurrent_clients_get_their_own_scores(jpeg_server):
    url, reward = jpeg_server

    def one_client(k: int) -> bool:
        client = RemoteReward(url, timeout=30)
        ok = True
        for rep in range(3):
            ims = [noise(100 * k + 10 * rep + j, side=16 + k) for j in range(3)]
            got = client(ims, [f"c{k}"] * 3)
            ok &= torch.equal(got, reward(ims, ["x"] * 3))
        client.close()
        return ok

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one_client, range(16)))
    assert all(results)


def post(url: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}/score", timeout=10, **kw)


def test_oversize_and_malformed_requests_are_refused_and_server_keeps_serving(jpeg_server):
    url, _ = jpeg_server
    good = {"images": [png_b64(noise(1))], "prompts": ["a"], "metadata": [{}]}
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    gif = io.BytesIO()
    noise(2).save(gif, format="GIF")
    cases = {
        "body too large": (dict(content=b"{" + b" " * 400_000 + b"}"), 413),
        "chunked body too large": (dict(content=iter([b"{", b" " * 300_000, b"}"])), 413),
        "batch too large": (dict(json={"images": [png_b64(noise(1))] * 9, "prompts": ["a"] * 9}), 413),
        "image too large": (dict(json={"images": [png_b64(big)], "prompts": ["a"]}), 413),
        "not json": (dict(content=b"\x80\x04not json"), 400),
        "json list": (dict(json=[1, 2]), 422),
        "missing prompts": (dict(json={"images": []}), 422),
        "length mismatch": (dict(json={"images": [png_b64(noise(1))], "prompts": ["a", "b"]}), 422),
        "prompt not str": (dict(json={"images": [png_b64(noise(1))], "prompts": [3]}), 422),
        "metadata not dict": (dict(json={**good, "metadata": ["x"]}), 422),
        "bad base64": (dict(json={"images": ["@@@"], "prompts": ["a"]}), 422),
        "not an image": (dict(json={"images": [base64.b64encode(b"hello").decode()], "prompts": ["a"]}), 422),
        "gif": (dict(json={"images": [base64.b64encode(gif.getvalue()).decode()], "prompts": ["a"]}), 422),
        "truncated png": (dict(json={"images": [base64.b64encode(base64.b64decode(good["images"][0])[:200]).decode()],
                                     "prompts": ["a"]}), 422),
    }
    for what, (kw, code) in cases.items():
        r = post(url, **kw)
        assert r.status_code == code, (what, r.status_code, r.text)
        assert "detail" in r.json()
    r = post(url, json=good)
    assert r.status_code == 200 and len(r.json()["scores"]) == 1


def test_bearer_token():
    app = create_app(build_reward("jpeg_compressibility"), token="s3cret")
    body = {"images": [png_b64(noise(3))], "prompts": ["a"]}
    with serve(app) as url:
        assert post(url, json=body).status_code == 401
        assert post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert post(url, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert RemoteReward(url, token="s3cret")([noise(3)], ["a"]).item() < 0
        t0 = time.time()
        with pytest.raises(RewardError, match="refused the request: HTTP 403"):
            RemoteReward(url, token="nope", retries=3, backoff=5.0)([noise(3)], ["a"])
        assert time.time() - t0 < 4  # 4xx is not retried


def test_stopped_server_fails_clearly_after_retries():
    with serve(create_app(build_reward("jpeg_compressibility"))) as url:
        client = RemoteReward(url, timeout=1.0, retries=2, backoff=0.05)
        assert client([noise(1)], ["a"]).shape == (1,)
    with pytest.raises(RewardError, match=r"failed after 3 attempts: (ConnectError|.*Connect)"):
        client([noise(1)], ["a"])
    multi = MultiReward({f"remote:{url}": 1.0}, options={f"remote:{url}": {"retries": 0, "timeout": 0.5}})
    with pytest.raises(RewardError, match=f"remote reward at {url} failed after 1 attempts"):
        multi.submit([noise(1)], ["a"]).result(timeout=30)
    multi.close()


def garbage_app(answer, hits: list[int], status: int = 200) -> FastAPI:
    app = FastAPI()

    @app.post("/score")
    async def score():
        hits.append(1)
        from fastapi.responses import JSONResponse
        return JSONResponse(answer, status_code=status)

    return app


@pytest.mark.parametrize("answer,status,msg", [
    ({"scores": [1.0, 2.0]}, 200, "expected 1 scores"),
    ({"scores": ["1.0"]}, 200, "not a finite number"),
    ({"scores": [None]}, 200, "not a finite number"),
    ({"oops": 1}, 200, "answer is not"),
    ({"detail": "boom"}, 500, "HTTP 500"),
])
def test_garbage_answers_fail_loudly_after_retries(answer, status, msg):
    hits: list[int] = []
    with serve(garbage_app(answer, hits, status)) as url:
        with pytest.raises(RewardError, match=f"failed after 3 attempts: .*{msg}"):
            RemoteReward(url, retries=2, backoff=0.01, timeout=5)([noise(1)], ["a"])
    assert len(hits) == 3


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_server_refuses_to_send_non_finite_scores(value):
    class Bad(Reward):
        name = "bad"

        def score(self, images, prompts, metadata):
            return torch.full((len(images),), float(value))

    with serve(create_app(Bad())) as url:
        r = post(url, json={"images": [png_b64(noise(1))], "prompts": ["a"]})
        assert r.status_code == 500 and "invalid scores" in r.text
        with pytest.raises(RewardError, match="HTTP 500"):
            RemoteReward(url, retries=1, backoff=0.01)([noise(1)], ["a"])


def test_multi_reward_remote_component_equals_local(jpeg_server):
    url, reward = jpeg_server
    ims = [noise(i) for i in range(4)]
    multi = MultiReward({f"remote:{url}": 2.0, "jpeg_compressibility": 1.0})
    total, comps = multi(ims, ["a"] * 4)
    local = reward(ims, ["a"] * 4)
    torch.testing.assert_close(comps[f"remote:{url}"], local, rtol=0, atol=0)
    torch.testing.assert_close(total, 2.0 * local - local)
    named = MultiReward({"remote": 1.0}, options={"remote": {"url": url}})
    torch.testing.assert_close(named(ims, ["a"] * 4)[0], local, rtol=0, atol=0)


def test_launcher_rejects_unknown_reward_with_one_line():
    r = subprocess.run([sys.executable, str(REPO / "launch" / "reward_server.py"), "--reward", "nope"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown reward 'nope'" in r.stderr


def test_launcher_serves_a_reward_over_loopback():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "reward_server.py"), "--reward",
                             "jpeg_incompressibility", "--port", str(port), "--token", "t", "--max-batch", "4"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        client = RemoteReward(url, token="t", retries=0, timeout=2)
        deadline = time.time() + 60
        while True:
            try:
                assert client.health()["reward"] == "jpeg_incompressibility"
                break
            except RewardError:
                assert proc.poll() is None and time.time() < deadline, "server did not come up"
                time.sleep(0.2)
        ims = [noise(i) for i in range(3)]
        torch.testing.assert_close(client(ims, ["a"] * 3), build_reward("jpeg_incompressibility")(ims, ["a"] * 3))
        r = post(url, json={"images": [png_b64(noise(1))] * 5, "prompts": ["a"] * 5},
                 headers={"Authorization": "Bearer t"})
        assert r.status_code == 413
    finally:
        proc.terminate()
        proc.wait(timeout=20)
