"""Disk full while checkpointing (issue 8, part 5), simulated.

The writer of one checkpoint file (the LoRA weights through safetensors, the optimizer
state through ``torch.save`` inside ``accelerator.save_state``, or ``trainer_state.json``)
writes a few bytes and then fails with ``OSError(ENOSPC)``. The run must stop with one
clear line, leave no partial checkpoint folder behind, keep the previous checkpoint
byte-for-byte intact (and still ``latest``), and resume from it once space is back.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpo_diffusion.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def overrides(out):
    o = {"output_dir": str(out), "model.family": "sd", "model.path": "embedded:tiny-sd",
         "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}", "train.iterations": 2,
         "sampling.steps": 2, "train.prompts_per_iteration": 3, "train.group_size": 2, "fpo.n_mc": 2,
         "train.minibatch_size": 6, "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false",
         "train.lr": 3e-3, "checkpoint.every": 1, "checkpoint.keep_last": 1, "train.ema_decay": 0.9}
    return [f"{k}={v}" for k, v in o.items()]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _full(path) -> None:
    """Write a partial file where the real one would go, then fail as a full disk does."""
    with open(path, "wb") as f:
        f.write(b"\x00" * 17)
    raise ENOSPC


def patch_writer(monkeypatch, which: str) -> None:
    """Make the writer of ``which`` fail, for files inside the temporary folder of checkpoint 2 only."""
    def hit(path) -> bool:
        return ".tmp-checkpoint-000002" in str(path)

    if which == "lora":
        import fpo_diffusion.checkpoint as ck

        inner = ck.save_file
        monkeypatch.setattr(ck, "save_file",
                            lambda t, path, *a, **k: _full(path) if hit(path) else inner(t, path, *a, **k))
    elif which == "optimizer":
        inner = torch.save

        def save(obj, f, *a, **k):
            if hit(f) and "optimizer" in str(f):
                _full(f)
            return inner(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    else:
        inner = json.dump

        def dump(obj, fp, *a, **k):
            if hit(getattr(fp, "name", "")):
                fp.write('{"iteration": ')
                fp.flush()
                raise ENOSPC
            return inner(obj, fp, *a, **k)

        monkeypatch.setattr(json, "dump", dump)


@pytest.mark.parametrize("which", ["lora", "optimizer", "trainer_state"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, which):
    from fpo_diffusion.checkpoint import list_checkpoints, resolve_resume
    from fpo_diffusion.cli import run_cli
    from fpo_diffusion.trainer import Trainer

    out = tmp_path / "run"
    Trainer(load_config(None, overrides(out))).train(stop_after=1)
    ckpts = out / "checkpoints"
    first = ckpts / "checkpoint-000001"
    before = digest(first)
    metrics_before = (out / "metrics.jsonl").read_text()

    sys.path.insert(0, str(ROOT / "launch"))
    import train as train_script

    with monkeypatch.context() as m:
        patch_writer(m, which)
        rc = run_cli(train_script.main, ["--resume", "latest", *overrides(out)], prog="train")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["train: error: could not write checkpoint checkpoint-000002: No space left on device; "
                   "earlier checkpoints are intact"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-000001"]  # no temporary or partial folder
    assert digest(first) == before
    assert resolve_resume("latest", ckpts) == first
    assert not (out / "lora").exists()
    # the iteration whose checkpoint failed is logged; a resume re-runs it (metrics truncated back)
    assert (out / "metrics.jsonl").read_text().startswith(metrics_before)

    if which != "lora":
        return
    # Space is back: the resume from checkpoint 1 finishes the run, identical to an uninterrupted run.
    Trainer(load_config(None, overrides(out)), resume="latest").train()
    ref = tmp_path / "ref"
    Trainer(load_config(None, overrides(ref))).train()
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-000002"]
    a = load_file(str(ref / "checkpoints" / "checkpoint-000002" / "lora.safetensors"))
    b = load_file(str(ckpts / "checkpoint-000002" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["iteration"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
