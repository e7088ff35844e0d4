"""Under a launcher the user sees the script's one line and exit status (issue 17, item 7).

``accelerate launch`` follows a failed script's one-line error with its own traceback
(``CalledProcessError``; for several processes torch elastic's ``ChildFailedError`` box) and exits 1.
``python -m fpo_diffusion.launcher`` takes the same arguments and ends with the script's line and
status.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = "train: error: unknown config field train.nope (in override 'train.nope=1')"


def launch(module: str, nproc: int, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, "--num_processes", str(nproc), *(["--multi_gpu"] if nproc > 1 else []),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "launch" / "train.py"), "train.nope=1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_launcher_ends_with_the_scripts_line_and_status(tmp_path, nproc):
    p = launch("fpo_diffusion.launcher", nproc, tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [LINE] * nproc  # every rank says it; nothing else
