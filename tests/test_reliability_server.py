"""Reward server under load and faults (issue 8, part 4), on loopback.

* Bounded load: many concurrent clients sending batches up to the server's ``max_batch``;
  every score comes back, in its own slot, equal to the reward computed in-process.
* The server is SIGKILLed during training and restarted on the same port: the remote client
  retries, the iteration gets its real scores (no skip, no zero) and the trained LoRA is
  bit-identical to a run with the same reward computed locally.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rewards.registry import build_reward
from rewards.remote import RemoteReward
from rewards.server import create_app
from helpers_net import free_port, served

ROOT = Path(__file__).resolve().parents[1]


def image(seed: int, side: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_many_concurrent_clients_and_full_batches_get_every_score_in_its_slot():
    reward = build_reward("brightness")
    app = create_app(reward, max_batch=64, max_image_side=256, max_request_mb=32)
    with served(app, limit_concurrency=1000) as url:
        _concurrent_clients(url, reward)


def _concurrent_clients(url: str, reward) -> None:
    shared = RemoteReward(url, batch_size=64, retries=2, backoff=0.05)  # one client object used by many threads
    try:
        def job(c: int) -> list[tuple[list[float], list[float]]]:
            own = RemoteReward(url, batch_size=37, retries=2, backoff=0.05)
            results = []
            for r in range(3):
                n = 1 + (c * 7 + r * 13) % 64  # 1..64 images per call, split by batch_size into requests
                ims = [image(100_000 * c + 1000 * r + i) for i in range(n)]
                prompts = [f"client {c} call {r} image {i}" for i in range(n)]
                client = shared if r == 1 else own
                results.append((client(ims, prompts).tolist(), reward(ims, prompts).tolist()))
            own.close()
            return results

        with ThreadPoolExecutor(max_workers=24) as pool:
            all_results = list(pool.map(job, range(24)))
        n_scores = 0
        for results in all_results:
            for got, want in results:
                assert got == want  # same values, same order: nothing lost, nothing swapped
                n_scores += len(got)
        assert n_scores > 2000
        # the largest allowed request: 64 images of 256 px in one body
        big = [image(7_000_000 + i, side=256) for i in range(64)]
        assert shared(big, ["x"] * 64).tolist() == reward(big, ["x"] * 64).tolist()
        over = httpx.post(f"{url}/score", json={"images": [""] * 65, "prompts": [""] * 65}, timeout=30)
        assert over.status_code == 413 and "max_batch=64" in over.json()["detail"]
    finally:
        shared.close()


def start_server(port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, str(ROOT / "launch" / "reward_server.py"), "--reward", "brightness",
                                 "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "reward server exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("reward server did not come up")


def overrides(out, weights: str, options: str = "{}"):
    o = {"output_dir": str(out), "model.family": "sd", "model.path": "embedded:tiny-sd",
         "prompts.source": "embedded:tiny", "reward.weights": weights, "reward.options": options,
         "train.iterations": 3, "sampling.steps": 2, "train.prompts_per_iteration": 3, "train.group_size": 2,
         "fpo.n_mc": 2, "train.minibatch_size": 6, "log.image_every": 0, "log.tensorboard": "false",
         "log.progress": "false", "train.lr": 3e-3, "checkpoint.every": 0}
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.slow
def test_server_killed_and_restarted_during_training_loses_no_reward(tmp_path):
    from fpo_diffusion.config_io import load_config
    from fpo_diffusion.trainer import Trainer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"remote:{url}"
    log = tmp_path / "server.log"
    procs = [start_server(port, log)]
    try:
        wait_healthy(url, procs[0])
        cfg = load_config(None, overrides(tmp_path / "remote", json.dumps({name: 1.0}),
                                          json.dumps({name: {"retries": 10, "backoff": 0.2, "timeout": 30}})))
        tr = Trainer(cfg)
        comp = tr.reward.component(name)
        attempts: list[str] = []
        inner_http, inner_score = comp._http, comp.score

        class Spy:  # records every POST attempt of the client and how it ended
            def __init__(self, client):
                self.client = client

            def post(self, *a, **k):
                try:
                    r = self.client.post(*a, **k)
                except httpx.HTTPError as e:
                    attempts.append(type(e).__name__)
                    raise
                attempts.append(str(r.status_code))
                return r

        comp._http = lambda: Spy(inner_http())
        calls = [0]

        def score(images, prompts, metadata):
            calls[0] += 1
            if calls[0] == 2:  # iteration 1: the server dies just before its request; a new one is started
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait(timeout=30)
                procs.append(start_server(port, log))
            return inner_score(images, prompts, metadata)

        comp.score = score
        tr.train()
        assert calls[0] == 3
        assert attempts[0] == "200" and attempts[-1] == "200"
        failed = [a for a in attempts if a != "200"]
        assert failed and all(a == "ConnectError" for a in failed), attempts
        assert attempts.count("200") == 3  # one successful request per iteration
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    # The same run with the reward computed in-process: identical rewards, samples and weights.
    Trainer(load_config(None, overrides(tmp_path / "local", "{brightness: 1.0}"))).train()
    read = lambda run, f: [json.loads(l) for l in (tmp_path / run / f).read_text().splitlines()]  # noqa: E731
    remote, local = read("remote", "samples.jsonl"), read("local", "samples.jsonl")
    assert len(remote) == 18 and [r["reward"] for r in remote] == [r["reward"] for r in local]
    assert all(r["reward"] > 0 for r in remote)
    assert all(m["nonfinite/reward"] == 0 and m["fpo/skipped_updates"] == 0 for m in read("remote", "metrics.jsonl"))
    a = load_file(str(tmp_path / "remote" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "local" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_reward_server_that_stays_down_stops_training_with_one_line(tmp_path, capsys):
    from fpo_diffusion.cli import run_cli

    sys.path.insert(0, str(ROOT / "launch"))
    import train as train_script

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    name = f"remote:{url}"
    argv = overrides(tmp_path / "run", json.dumps({name: 1.0}), json.dumps({name: {"retries": 1, "backoff": 0.01}}))
    rc = run_cli(train_script.main, argv, prog="train")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 2, err  # the retry says so, then the run stops with one line
    assert err[0].startswith(f"remote reward at {url}: attempt 1 of 2 failed (ConnectError") and "retrying in" in err[0]
    assert err[1].startswith(f"train: error: iteration 0: remote reward at {url} failed after 2 attempts: ConnectError")
    assert not (tmp_path / "run" / "checkpoints").exists()
