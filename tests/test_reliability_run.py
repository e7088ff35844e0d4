"""Whole runs under failure (issue 17, items 1, 3, 5, 7, 8; issue 16, defect 2), tiny SD on CPU.

* ``train.lr=1e39`` (finite, so valid) overflows in the optimizer step itself: the step is undone
  (weights and optimizer state restored), counted as skipped, and nothing non-finite reaches a
  checkpoint or the exported LoRA;
* a second process on a run folder is refused with one line and writes nothing;
* ``--resume latest`` falls back over a damaged checkpoint, says so, and continues exactly;
* a copied run folder resumes (``output_dir`` differs); a checkpoint of another world size says
  what changes;
* a run that failed before its first checkpoint can be started again (or ``--resume latest``-ed),
  its earlier files kept under ``unfinished-1/``;
* a size that cannot fit in memory is refused before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpo_diffusion.config_io import load_config
from rewards.base import Reward, RewardError
from rewards.registry import register_reward

ROOT = Path(__file__).resolve().parents[1]


def overrides(out, **extra):
    o = {"output_dir": str(out), "model.family": "sd", "model.path": "embedded:tiny-sd",
         "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}", "train.iterations": 2,
         "sampling.steps": 2, "train.prompts_per_iteration": 3, "train.group_size": 2, "fpo.n_mc": 2,
         "train.minibatch_size": 3, "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false",
         "train.lr": 3e-3, "checkpoint.every": 1, "checkpoint.keep_last": 5, "train.ema_decay": 0.9}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture
def cli(capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    import train as train_script

    from fpo_diffusion.cli import run_cli

    def call(argv):
        rc = run_cli(train_script.main, argv, prog="train")
        cap = capsys.readouterr()
        return rc, cap.err.strip().splitlines(), cap.out

    return call


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def finite(tensors: dict) -> bool:
    return len(tensors) > 0 and all(bool(torch.isfinite(t).all()) for t in tensors.values())


# ---------------------------------------------------------------- item 1: a step that overflows is undone

@pytest.mark.parametrize("settings", [{"train.lr": 1e39}, {"train.lr": 1e20, "train.weight_decay": 1e20}])
def test_an_overflowing_optimizer_step_is_undone_and_nothing_non_finite_is_saved(tmp_path, cli, settings):
    from fpo_diffusion.trainer import Trainer

    out = tmp_path / "run"
    tr = Trainer(load_config(None, overrides(out, **settings, **{"train.max_nonfinite_in_a_row": 100})))
    before = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    tr.train()
    # every step overflowed: each was undone, so the weights are the initial ones (and finite)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.trainable_parameters()))
    assert all(not tr.optimizer.optimizer.state.get(p) for p in tr.policy.trainable_parameters())
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["nonfinite/step"] for r in rows] == [2, 2] and [r["fpo/skipped_updates"] for r in rows] == [2, 2]
    for c in ("checkpoint-000001", "checkpoint-000002"):
        assert finite(load_file(str(out / "checkpoints" / c / "lora.safetensors")))
        assert finite(load_file(str(out / "checkpoints" / c / "ema.safetensors")))
        opt = torch.load(out / "checkpoints" / c / "optimizer.bin", weights_only=False)
        assert all(bool(torch.isfinite(v).all()) for st in opt["state"].values() for v in st.values() if torch.is_tensor(v))
    assert finite(load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")))
    if "train.weight_decay" in settings:
        return
    # and with the default limit the run stops with one line (exit 1) instead of carrying on
    rc, err, stdout = cli(overrides(tmp_path / "run2", **settings))
    assert rc == 1 and len(err) == 1 and err[0].startswith("train: error: 3 updates in a row were skipped for "
                                                           "non-finite numbers") and "non-finite step" in err[0]
    assert "skipped an update with a non-finite step (the optimizer step overflowed" in stdout
    assert not (tmp_path / "run2" / "lora").exists()


def test_export_refuses_non_finite_weights(tmp_path):
    from fpo_diffusion.checkpoint import NonfiniteStateError
    from fpo_diffusion.trainer import Trainer

    tr = Trainer(load_config(None, overrides(tmp_path / "run", **{"train.ema_decay": "null"})))
    with torch.no_grad():
        tr.policy.trainable_parameters()[0].view(-1)[0] = float("nan")
    with pytest.raises(NonfiniteStateError, match="refusing to export the LoRA to .* non-finite values"):
        tr.export(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(NonfiniteStateError, match="refusing to write checkpoint checkpoint-000001: the LoRA weights"):
        tr._save(1)
    assert not any((tmp_path / "run" / "checkpoints").iterdir())
    tr.close()


# ---------------------------------------------------------------- items 3, 5, 8 on one run

HOLD = """
import sys
from fpo_diffusion.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_one_writer_damaged_checkpoint_fallback_copied_folder_and_world_size(tmp_path, cli):
    from fpo_diffusion.trainer import Trainer

    ref = tmp_path / "ref"
    Trainer(load_config(None, overrides(ref))).train()
    out = tmp_path / "run"
    Trainer(load_config(None, overrides(out))).train(stop_after=1)
    Trainer(load_config(None, overrides(out)), resume="latest").train()  # checkpoints 1 and 2, finished
    metrics = (out / "metrics.jsonl").read_text()

    # item 3: another live process holds the folder -> one line, exit 2, nothing touched
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline().strip() == "locked"
        rc, err, _ = cli(["--resume", "latest", *overrides(out)])
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"train: error: run folder {out} is in use by another training process (pid {p.pid} ")
    finally:
        p.kill()
        p.wait()
    assert (out / "metrics.jsonl").read_text() == metrics

    # item 5: the newest checkpoint's optimizer state is truncated -> latest falls back to checkpoint 1 with a
    # line saying so, re-runs iteration 1 and ends where the uninterrupted run ended
    opt = out / "checkpoints" / "checkpoint-000002" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:100])
    rc, err, stdout = cli(["--resume", "latest", *overrides(out)])
    assert rc == 0, err
    assert "taking it over" in err[0]  # the killed holder's stale lock
    assert err[1].startswith("warning: skipping damaged checkpoint checkpoint-000002: optimizer.bin is truncated")
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-000001'} at iteration 1" in stdout
    for name in ("lora.safetensors", "ema.safetensors"):
        a = load_file(str(ref / "checkpoints" / "checkpoint-000002" / name))
        b = load_file(str(out / "checkpoints" / "checkpoint-000002" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    # a damaged checkpoint named explicitly: one line naming the file
    lora = out / "checkpoints" / "checkpoint-000001" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:-8])
    rc, err, _ = cli(["--resume", str(lora.parent), *overrides(out)])
    assert rc == 2 and len(err) == 1 and f"checkpoint {lora.parent} is damaged: lora.safetensors is truncated" in err[0]

    # item 8: a copied run folder resumes (its output_dir differs from the saved one)
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    state_file = copy / "checkpoints" / "checkpoint-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["world_size"] = 2  # as if written by 2 ranks
    state_file.write_text(json.dumps(state))
    rc, err, stdout = cli(["--resume", "latest", *overrides(copy), "--allow-change", "train.iterations=3"])
    assert rc == 0, err
    assert "resumed from" in stdout and [r["iteration"] for r in read_jsonl(copy / "metrics.jsonl")] == [0, 1, 2]
    assert err[0] == (f"note: resuming {copy} with train.iterations 2 -> 3 (--allow-change); {copy / 'config.yaml'} "
                      f"records the new config")
    assert err[1:] == ["warning: checkpoint checkpoint-000002 was written by 2 process(es), this run has 1: the samples, "
                   "rewards and noise of every iteration stay the same, but an optimizer step now averages 1 x "
                   "train.minibatch_size samples (was 2 x), 2 steps per iteration (was 1), so the run will not be "
                   "bit-identical to one continued on 2"]


def test_a_sharded_checkpoint_of_another_world_size_is_refused(tmp_path):
    from fpo_diffusion.checkpoint import CheckpointError
    from fpo_diffusion.run_state import check_resume

    ck = tmp_path / "run" / "checkpoints" / "checkpoint-000001"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"iteration": 1, "world_size": 4}))
    cfg = load_config(None, overrides(tmp_path / "run"))
    assert check_resume(cfg, tmp_path / "run", "latest", world_size=4, distributed_type="DEEPSPEED") == ck
    with pytest.raises(CheckpointError, match="written by 4 processes and this run has 2: its DEEPSPEED optimizer"):
        check_resume(cfg, tmp_path / "run", "latest", world_size=2, distributed_type="DEEPSPEED")


# ---------------------------------------------------------------- issue 16, defect 2

@register_reward("reliability_down")
class Down(Reward):
    """Always fails, as a remote reward whose server is down does after its retries."""

    range = (0.0, 1.0)

    def score(self, images, prompts, metadata):
        raise RewardError("remote reward at http://127.0.0.1:9 failed after 1 attempts: ConnectError")


def test_a_run_that_failed_before_its_first_checkpoint_can_start_again_and_loses_nothing(tmp_path, cli):
    out = tmp_path / "run"
    down = overrides(out, **{"reward.weights": "{reliability_down: 1.0}"})
    rc, err, _ = cli(down)
    assert rc == 1 and err == ["train: error: iteration 0: remote reward at http://127.0.0.1:9 failed after 1 "
                               "attempts: ConnectError"]
    first = (out / "config.yaml").read_text()
    # the same command again: starts over; the first attempt's files are kept
    rc, err, stdout = cli(down)
    assert rc == 1
    assert f"note: {out} held a run that stopped before its first checkpoint; its files are kept in " \
           f"{out / 'unfinished-1'}; starting the run over" in stdout
    assert (out / "unfinished-1" / "config.yaml").read_text() == first
    # the server is back (here: another reward), resumed as the user would after a failure
    rc, err, stdout = cli(["--resume", "latest", *overrides(out)])
    assert rc == 0, err
    assert f"its files are kept in {out / 'unfinished-2'}; starting the run over (there was nothing to resume)" in stdout
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.yaml", "lora", "metrics.jsonl",
                                                     "samples.jsonl", "unfinished-1", "unfinished-2"]
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    # once a checkpoint exists, the folder holds a run again: never overwritten
    rc, err, _ = cli(overrides(out))
    assert rc == 2 and len(err) == 1 and "already holds a run; resume it with --resume latest" in err[0]


# ---------------------------------------------------------------- item 7: sizes that cannot fit

def test_an_iteration_that_cannot_fit_in_memory_is_refused_before_anything_is_written(tmp_path, cli, monkeypatch):
    import fpo_diffusion.budget as budget

    monkeypatch.setattr(budget, "physical_memory", lambda: 64 * 2**30)
    out = tmp_path / "run"
    rc, err, _ = cli(overrides(out, **{"train.group_size": 1000000000}))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("train: error: train.prompts_per_iteration x train.group_size = 3 x 1000000000 samples "
                             "per iteration need about ") and err[0].endswith("more than this machine's 64.0 GiB; lower them")
    assert not out.exists()
    # the default job is far below it
    cfg = load_config(None, [])
    assert budget.iteration_bytes(cfg, 16 * 4 * 4, 77 * 32 * 4, 64 * 64, 1) < 2**30


def test_a_checkpoint_from_before_a_field_existed_resumes_and_the_collective_timeout_may_change(tmp_path):
    from fpo_diffusion.config import ConfigError
    from fpo_diffusion.config_io import config_to_dict
    from fpo_diffusion.run_state import check_resume

    run = tmp_path / "run"
    cfg = load_config(None, overrides(run))
    saved = config_to_dict(cfg)
    del saved["train"]["collective_timeout_s"]  # written by a version without the field
    ck = run / "checkpoints" / "checkpoint-000001"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"iteration": 1, "world_size": 1, "config": saved}))
    assert check_resume(cfg, run, "latest", world_size=1) == ck
    assert check_resume(load_config(None, overrides(run, **{"train.collective_timeout_s": 60})), run, "latest") == ck
    # a periodic evaluation may be added to (or changed in) a run being resumed: it never touches training
    assert check_resume(load_config(None, overrides(run, **{"eval.every": 5, "eval.prompts": "embedded:tiny"})),
                        run, "latest") == ck
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in train.lr;"):
        check_resume(load_config(None, overrides(run, **{"train.lr": 1e-3})), run, "latest")


def test_an_image_size_the_pipeline_cannot_take_is_one_line(tmp_path, cli):
    out = tmp_path / "run"
    rc, err, _ = cli(overrides(out, **{"model.family": "sd3", "model.path": "embedded:tiny-sd3", "sampling.height": 5}))
    assert rc == 2 and err == ["train: error: sampling.height=5 is not a multiple of 2 (this model's latent cell in "
                               "pixels); use 4 or 6"]
    assert not out.exists()
