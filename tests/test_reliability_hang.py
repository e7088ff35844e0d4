"""A hung rank ends the run with one line (issue 17, item 10).

Two gloo ranks of ``launch/train.py`` are started by hand (the environment ``torchrun`` would set).
Rank 1 stops itself with SIGSTOP in its first rollout (``FPO_DIFFUSION_FAULT=rollout:1:stop``,
``FPO_DIFFUSION_FAULT_RANK=1``): alive, holding its sockets, never answering. Rank 0 waits in the
next collective for ``train.collective_timeout_s`` (here 10 s instead of torch's 30 minutes) and
stops with one line and exit status 1; the test then kills the stopped rank.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fpo_diffusion import faults
from helpers_net import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_stopped_rank_ends_the_run_with_one_line_after_the_collective_timeout(tmp_path):
    args = [f"output_dir={tmp_path / 'run'}", "model.family=sd", "model.path=embedded:tiny-sd",
            "prompts.source=embedded:tiny", "reward.weights={brightness: 1.0}", "train.iterations=2",
            "sampling.steps=2", "train.prompts_per_iteration=2", "train.group_size=2", "fpo.n_mc=2",
            "train.minibatch_size=2", "log.image_every=0", "log.tensorboard=false", "log.progress=false",
            "train.collective_timeout_s=10"]
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env[faults.ENV], env[faults.RANK_ENV] = "rollout:1:stop", "1"
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out0, err0 = procs[0].communicate(timeout=600)
    finally:
        procs[1].kill()  # SIGKILL ends a stopped process too
        out1, _ = procs[1].communicate(timeout=60)
    assert "fault injection: SIGSTOP at rollout:1" in out1
    assert procs[0].returncode == 1, err0[-3000:]
    lines = [l for l in err0.strip().splitlines() if not l.startswith("[")]  # gloo's own log lines start with [
    assert lines[-1] == ("train: error: rank 0: waited longer than train.collective_timeout_s for the other ranks "
                         "(one is stuck or too slow); stopping (the last checkpoint is intact: --resume latest)"), err0
    assert "Traceback" not in err0
