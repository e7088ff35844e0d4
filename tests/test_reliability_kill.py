"""Kill anywhere, resume exactly (issue 8, part 1).

``launch/train.py`` runs as a subprocess and SIGKILLs itself (``fpo_diffusion/faults.py``,
``FPO_DIFFUSION_FAULT=<point>:<n>``) inside a rollout, inside an update, half way through
writing a checkpoint and just before a complete checkpoint is renamed into place. Each
kill is followed by ``--resume latest``; the run that finishes must hold LoRA weights,
checkpoints, metrics and samples bit-identical to an uninterrupted run, and a half-written
(or not yet renamed) checkpoint must never be what ``latest`` picks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpo_diffusion import faults
from fpo_diffusion.checkpoint import STATE_FILE, list_checkpoints, resolve_resume
from fpo_diffusion.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")

# 4 iterations; 3 prompts x 2 images = 6 samples a iteration, sampled in 2 chunks of 3
# (2 rollout hits per iteration) and updated in 2 epochs x 2 minibatches (4 optimizer steps
# per iteration); a checkpoint after every iteration. EMA and a cosine LR schedule make
# any state that a resume forgot visible in the weights.
SETTINGS = {
    "model.family": "sd", "model.path": "embedded:tiny-sd", "prompts.source": "embedded:tiny",
    "reward.weights": "{brightness: 1.0}", "train.iterations": 4, "sampling.steps": 3, "sampling.batch_size": 3,
    "train.prompts_per_iteration": 3, "train.group_size": 2, "fpo.n_mc": 2, "train.minibatch_size": 3,
    "train.epochs": 2, "train.lr": 3e-3, "train.lr_schedule": "cosine", "train.ema_decay": 0.9,
    "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false",
    "checkpoint.every": 1, "checkpoint.keep_last": 10,
}


def overrides(out: Path) -> list[str]:
    return [f"output_dir={out}", *(f"{k}={v}" for k, v in SETTINGS.items())]


def train_subprocess(out: Path, *, fault: str | None = None, resume: bool | str = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    cmd = [sys.executable, TRAIN, *(["--resume", "latest" if resume is True else resume] if resume else []),
           *overrides(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def killed(p: subprocess.CompletedProcess, point: str) -> None:
    assert p.returncode == -signal.SIGKILL, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert f"fault injection: SIGKILL at {point}" in p.stdout


def ckpt_names(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out / "checkpoints")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and len(ta) > 0, a
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.parent.name}/{a.name}: {k} differs"


def test_fault_spec_is_parsed_strictly():
    assert faults.parse("update:3,rollout:1") == {"update": 3, "rollout": 1}
    for bad in ("update", "update:0", "update:x", "nowhere:1", "update:-1"):
        with pytest.raises(ValueError, match=faults.ENV):
            faults.parse(bad)


def test_no_fault_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    for point in faults.POINTS:
        faults.hit(point)  # would SIGKILL pytest if it were armed


@pytest.mark.slow
def test_sigkill_in_rollout_update_and_checkpoint_writes_then_resume_is_bit_exact(tmp_path):
    # The uninterrupted reference, in-process (same seeds, one thread, CPU: bit-for-bit repeatable).
    from fpo_diffusion.trainer import Trainer

    ref = tmp_path / "ref"
    Trainer(load_config(None, overrides(ref))).train()
    out = tmp_path / "run"

    # 1. Killed in the middle of iteration 1's rollout (its 2nd chunk; chunk 1's reward was in flight).
    killed(train_subprocess(out, fault="rollout:4"), "rollout")
    assert ckpt_names(out) == ["checkpoint-000001"]
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0]

    # 2. Resumed at iteration 1 and killed after its 3rd optimizer step (before the LR/EMA steps).
    p = train_subprocess(out, fault="update:3", resume=True)
    killed(p, "update")
    assert "resumed from" in p.stdout and "checkpoint-000001" in p.stdout
    assert ckpt_names(out) == ["checkpoint-000001"]

    # 3. Killed while checkpoint 2 is half written: save_state done, trainer_state.json not yet.
    killed(train_subprocess(out, fault="checkpoint_write:1", resume=True), "checkpoint_write")
    half = out / "checkpoints" / ".tmp-checkpoint-000002"
    assert (half / "lora.safetensors").is_file() and not (half / STATE_FILE).exists()
    assert not (out / "checkpoints" / "checkpoint-000002").exists()
    assert resolve_resume("latest", out / "checkpoints").name == "checkpoint-000001"

    # 4. Checkpoint 2 written; killed with checkpoint 3 complete but not yet renamed into place.
    killed(train_subprocess(out, fault="checkpoint_rename:2", resume=True), "checkpoint_rename")
    pending = out / "checkpoints" / ".tmp-checkpoint-000003"
    assert (pending / STATE_FILE).is_file()
    assert ckpt_names(out) == ["checkpoint-000001", "checkpoint-000002"]
    assert resolve_resume("latest", out / "checkpoints").name == "checkpoint-000002"

    # 5. The last resume runs to the end without a fault.
    p = train_subprocess(out, resume=True)
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert ckpt_names(out) == [f"checkpoint-00000{i}" for i in range(1, 5)]
    assert not [q.name for q in (out / "checkpoints").iterdir() if q.name.startswith(".")], "leftover temp folders"

    # Every checkpoint, the exported (EMA) LoRA, the metrics and the samples match the reference bit for bit.
    for i in range(1, 5):
        name = f"checkpoint-00000{i}"
        for f in ("lora.safetensors", "ema.safetensors"):
            assert_same_tensors(ref / "checkpoints" / name / f, out / "checkpoints" / name / f)
        sa = json.loads((ref / "checkpoints" / name / STATE_FILE).read_text())
        sb = json.loads((out / "checkpoints" / name / STATE_FILE).read_text())
        ca, cb = sa.pop("config"), sb.pop("config")
        ca.pop("output_dir"), cb.pop("output_dir")
        assert ca == cb and sa == sb  # iteration, non-finite count, cfm_start, config
    exported = Path("lora") / "pytorch_lora_weights.safetensors"
    assert_same_tensors(ref / exported, out / exported)
    ma, mb = read_jsonl(ref / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in mb] == [0, 1, 2, 3]
    for a, b in zip(ma, mb):
        for k in a:
            if not k.startswith("perf/"):
                assert a[k] == b[k], (a["iteration"], k)
    assert read_jsonl(ref / "samples.jsonl") == read_jsonl(out / "samples.jsonl")

    # 6. Re-running iteration 3 from checkpoint 3 re-saves checkpoint 4; killed between moving the old
    # checkpoint-000004 aside and renaming the new one in: the old complete one is still found.
    ckpts = out / "checkpoints"
    killed(train_subprocess(out, fault="checkpoint_replace:1", resume=str(ckpts / "checkpoint-000003")),
           "checkpoint_replace")
    assert not (ckpts / "checkpoint-000004").exists()
    latest = resolve_resume("latest", ckpts)
    assert latest.name == ".old-checkpoint-000004"
    assert_same_tensors(ref / "checkpoints" / "checkpoint-000004" / "lora.safetensors", latest / "lora.safetensors")


def test_a_checkpoint_moved_aside_for_replacement_still_counts(tmp_path):
    def make(name: str, complete: bool = True) -> Path:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / STATE_FILE).write_text("{}")
        return tmp_path / name

    make("checkpoint-000001")
    make(".tmp-checkpoint-000003")
    make(".old-checkpoint-000002")
    make(".tmp-checkpoint-000004", complete=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000001", ".old-checkpoint-000002"]
    make("checkpoint-000002")  # the plain name wins over a leftover moved-aside folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000001", "checkpoint-000002"]
