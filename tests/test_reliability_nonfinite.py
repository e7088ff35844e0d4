"""Non-finite numbers never reach the weights (issue 8, part 2).

What the trainer does (``fpo_diffusion/trainer.py``, ``_CAUSES``):

* a NaN/Inf **reward** (any sample, any component) skips the whole iteration's update: no
  ``prepare``, no optimizer/LR/EMA step; the samples are still logged, the iteration is
  checkpointed with unchanged weights, and it counts as one skipped update;
* a NaN/Inf **loss**, **FPO ratio** or **gradient norm** skips that one optimizer step;
* each skip prints ``iteration <i>: skipped an update with a non-finite <cause>`` and is
  counted in the iteration's metrics (``nonfinite/<cause>``); ``train.max_nonfinite_in_a_row``
  skips in a row stop the run with one clear ``TrainingError`` line (exit 1 from
  ``launch/train.py``).

Faults are injected in-process: a test-only reward registered here, and wrappers around the
algorithm's loss.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fpo_diffusion.config_io import load_config
from rewards.base import Reward
from rewards.registry import register_reward

ROOT = Path(__file__).resolve().parents[1]


@register_reward("reliability_faulty")
class FaultyBrightness(Reward):
    """Brightness, except that on the listed calls (0-based) one sample is NaN and the last +Inf."""

    range = (0.0, 1.0)

    def __init__(self, bad_calls=(), device="cpu", batch_size=None):
        super().__init__(device=device, batch_size=batch_size)
        self.bad_calls, self.calls = set(bad_calls), 0

    def score(self, images, prompts, metadata):
        s = torch.tensor([np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255.0 for im in images])
        if self.calls in self.bad_calls:
            s[0], s[-1] = float("nan"), float("inf")
        self.calls += 1
        return s


def overrides(out, **extra):
    o = {  # 3 prompts x 2 = 6 samples, one rollout chunk (one reward call) per iteration
        "output_dir": str(out), "model.family": "sd", "model.path": "embedded:tiny-sd", "prompts.source": "embedded:tiny",
        "reward.weights": "{brightness: 1.0}", "train.iterations": 3, "sampling.steps": 2,
        "train.prompts_per_iteration": 3, "train.group_size": 2, "fpo.n_mc": 2, "train.minibatch_size": 6,
        "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false", "train.lr": 3e-3,
        "checkpoint.every": 1, "checkpoint.keep_last": 10, "train.ema_decay": 0.9,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def trainer(out, **extra):
    from fpo_diffusion.trainer import Trainer

    return Trainer(load_config(None, overrides(out, **extra)))


def faulty(bad_calls) -> dict:
    return {"reward.weights": "{brightness: 1.0, reliability_faulty: 0.5}",
            "reward.options": "{reliability_faulty: {bad_calls: %s}}" % list(bad_calls)}


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def ckpt(out, i, name="lora.safetensors"):
    return load_file(str(Path(out) / "checkpoints" / f"checkpoint-{i:06d}" / name))


def state(out, i):
    return json.loads((Path(out) / "checkpoints" / f"checkpoint-{i:06d}" / "trainer_state.json").read_text())


def all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


def lora_snapshot(tr):
    return [p.detach().clone() for p in tr.policy.trainable_parameters()]


def test_non_finite_reward_skips_that_iterations_update_and_training_goes_on(tmp_path, capsys):
    out = tmp_path / "run"
    tr = trainer(out, **faulty([1]))
    tr.train()
    lines = capsys.readouterr().out.splitlines()
    assert ("iteration 1: skipped an update with a non-finite reward from 'reliability_faulty' (2 of 6 samples)"
            in lines)
    assert sum("skipped an update" in l for l in lines) == 1
    m = read_jsonl(out / "metrics.jsonl")
    assert [r["iteration"] for r in m] == [0, 1, 2]
    assert m[1]["nonfinite/reward"] == 1 and m[1]["reward/nonfinite_samples"] == 2 and m[1]["reward/mean"] == "nan"
    assert m[1]["fpo/skipped_updates"] == tr.steps_per_iteration
    for r in (m[0], m[2]):
        assert r["nonfinite/reward"] == r["nonfinite/loss"] == r["nonfinite/ratio"] == r["nonfinite/gradient"] == 0
        assert math.isfinite(r["reward/mean"]) and r["fpo/skipped_updates"] == 0
    # the skipped iteration's samples are still logged, with the offending rewards
    s1 = [r for r in read_jsonl(out / "samples.jsonl") if r["iteration"] == 1]
    assert len(s1) == 6 and sum(not math.isfinite(r["reward"]) for r in s1) == 2
    # iteration 1 changed nothing: LoRA, EMA, the optimizer's step count and the LR schedule
    for name in ("lora.safetensors", "ema.safetensors"):
        a, b, c = ckpt(out, 1, name), ckpt(out, 2, name), ckpt(out, 3, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(b[k], c[k]) for k in b), f"{name}: training went on after the skip"
        assert all_finite(a) and all_finite(b) and all_finite(c)
    opt1 = torch.load(out / "checkpoints" / "checkpoint-000001" / "optimizer.bin", weights_only=False)
    opt2 = torch.load(out / "checkpoints" / "checkpoint-000002" / "optimizer.bin", weights_only=False)
    assert [v["step"] for v in opt1["state"].values()] == [v["step"] for v in opt2["state"].values()]
    assert [state(out, i)["nonfinite_in_a_row"] for i in (1, 2, 3)] == [0, 1, 0]
    assert all(math.isfinite(state(out, i)["cfm_start"]) for i in (1, 2, 3))
    exported = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert all_finite(exported)


def test_non_finite_rewards_in_a_row_stop_the_run_with_one_clear_line(tmp_path, capsys):
    from fpo_diffusion.cli import run_cli

    sys.path.insert(0, str(ROOT / "launch"))
    import train as train_script

    out = tmp_path / "run"
    argv = overrides(out, **faulty([1, 2]), **{"train.iterations": 4, "train.max_nonfinite_in_a_row": 2})
    rc = run_cli(train_script.main, argv, prog="train")
    cap = capsys.readouterr()
    assert rc == 1
    assert cap.err.strip().splitlines() == [
        "train: error: 2 updates in a row were skipped for non-finite numbers (train.max_nonfinite_in_a_row=2; "
        "the last: a non-finite reward at iteration 2); stopping"]
    assert [l for l in cap.out.splitlines() if "skipped" in l] == [
        f"iteration {i}: skipped an update with a non-finite reward from 'reliability_faulty' (2 of 6 samples)"
        for i in (1, 2)]
    # the stop leaves the last good checkpoint (after the first skip) as latest, finite, and no export
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    assert all_finite(ckpt(out, 2)) and all(torch.equal(ckpt(out, 1)[k], ckpt(out, 2)[k]) for k in ckpt(out, 1))
    assert not (out / "lora").exists()


def test_non_finite_loss_ratio_and_gradient_each_skip_one_step(tmp_path, capsys):
    # 1 iteration, 2 epochs x 2 minibatches = 4 optimizer steps: step 1 gets a NaN loss, step 2 NaN
    # ratios (old losses poisoned), step 3 an infinite gradient; step 4 is the only one applied.
    tr = trainer(tmp_path / "run", **{"train.iterations": 1, "train.epochs": 2, "train.minibatch_size": 3,
                                      "train.max_nonfinite_in_a_row": 4})
    assert tr.steps_per_iteration == 4
    start = lora_snapshot(tr)
    seen, calls, hooks = [], [0], []
    inner = tr.algorithm.loss

    def loss(ro, prep, idx, adv, **kw):
        calls[0] += 1
        for h in hooks:
            h.remove()
        seen.append(lora_snapshot(tr))
        if calls[0] == 2:
            prep = dict(prep, l_old=torch.full_like(prep["l_old"], float("nan")))
        out, stats = inner(ro, prep, idx, adv, **kw)
        if calls[0] == 1:
            out = out * float("nan")
        if calls[0] == 3:
            p = tr.policy.trainable_parameters()[0]
            hooks.append(p.register_hook(lambda g: torch.full_like(g, float("inf"))))
        return out, stats

    tr.algorithm.loss = loss
    steps = [0]
    inner_step = tr.optimizer.step

    def step(*a, **k):
        steps[0] += 1
        return inner_step(*a, **k)

    tr.optimizer.step = step
    tr.train()
    assert calls[0] == 4 and steps[0] == 1
    lines = [l for l in capsys.readouterr().out.splitlines() if "skipped" in l]
    assert lines == [f"iteration 0: skipped an update with a non-finite {c}" for c in ("loss", "ratio", "gradient")]
    for snap in seen:  # no skipped step moved a weight
        assert all(torch.equal(a, b) for a, b in zip(start, snap))
    end = lora_snapshot(tr)
    assert any(not torch.equal(a, b) for a, b in zip(start, end)) and all(torch.isfinite(p).all() for p in end)
    m = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert (m["nonfinite/loss"], m["nonfinite/ratio"], m["nonfinite/gradient"], m["nonfinite/reward"]) == (1, 1, 1, 0)
    assert m["fpo/skipped_updates"] == 3 and math.isfinite(m["train/grad_norm"])
    assert tr.lr_scheduler.last_epoch == 1 and tr.nonfinite_in_a_row == 0
    assert all_finite(ckpt(tmp_path / "run", 1)) and all_finite(ckpt(tmp_path / "run", 1, "ema.safetensors"))


def test_non_finite_losses_in_a_row_stop_before_anything_is_written(tmp_path):
    from fpo_diffusion.trainer import TrainingError

    tr = trainer(tmp_path / "run", **{"train.epochs": 2, "train.minibatch_size": 3})
    start = lora_snapshot(tr)
    inner = tr.algorithm.loss
    tr.algorithm.loss = lambda *a, **k: (lambda o: (o[0] * float("inf"), o[1]))(inner(*a, **k))
    with pytest.raises(TrainingError) as e:
        tr.train()
    assert str(e.value) == ("3 updates in a row were skipped for non-finite numbers (train.max_nonfinite_in_a_row=3; "
                            "the last: a non-finite loss at iteration 0); stopping")
    assert all(torch.equal(a, b) for a, b in zip(start, lora_snapshot(tr)))
    assert all(p.grad is None for p in tr.policy.trainable_parameters())
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "lora").exists()


def test_iterations_that_each_skip_their_later_steps_stop_the_run(tmp_path, capsys):
    """Issue 24: ``beta: auto`` drove the ratio to inf; every iteration's first step was finite and every later
    one skipped, so no run of skipped *steps* reached the limit and the run went on learning nothing. Skipped
    iterations count too."""
    from fpo_diffusion.trainer import TrainingError

    tr = trainer(tmp_path / "run", **{"train.iterations": 5, "train.minibatch_size": 3, "checkpoint.every": 0})
    assert tr.steps_per_iteration == 2
    inner, calls = tr.algorithm.loss, [0]

    def loss(*a, **k):  # the second step of every iteration overflows
        calls[0] += 1
        out, stats = inner(*a, **k)
        return (out * float("inf") if calls[0] % 2 == 0 else out), stats

    tr.algorithm.loss = loss
    with pytest.raises(TrainingError) as e:
        tr.train()
    assert str(e.value).startswith("3 iterations in a row skipped updates for non-finite numbers "
                                   "(train.max_nonfinite_in_a_row=3; the last: iteration 2;")
    assert calls[0] == 6 and tr.guard.in_a_row == 1  # never two steps in a row


def test_a_run_of_skipping_iterations_is_broken_by_a_clean_one():
    from fpo_diffusion.update import NonfiniteGuard

    g = NonfiniteGuard(2, verbose=False)
    g.skip(0, "loss"), g.ok(), g.end_iteration(0)
    g.ok(), g.end_iteration(1)  # a clean iteration resets the count
    g.skip(2, "loss"), g.ok(), g.end_iteration(2)
    assert g.iterations_in_a_row == 1
