"""DeepSpeed / FSDP launch configs (issue 16.3): the settings DeepSpeed needs come from the training config,
accumulation tells DeepSpeed's engine its boundary, and a CPU machine says when it runs such a config plainly."""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fpo_diffusion.config import TrainConfig
from fpo_diffusion.config_io import load_config
from fpo_diffusion.distributed import configure_deepspeed, cpu_fallback_note, requested_backend

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_fallback_note_names_the_backend(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert requested_backend() is None and cpu_fallback_note(True) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert cpu_fallback_note(False) is None  # a GPU machine runs FSDP for real
    note = cpu_fallback_note(True)
    assert "FSDP" in note and "plain CPU run" in note and "\n" not in note
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "DeepSpeed" in cpu_fallback_note(True) and "DS_ACCELERATOR=cpu" in cpu_fallback_note(True)


def _ds_accelerator(**plugin_kw):
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    acc = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=8,
                                gradient_accumulation_steps=1,
                                state=types.SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2, **plugin_kw)))
    return acc, acc.state.deepspeed_plugin.deepspeed_config


def test_configure_deepspeed_fills_what_prepare_needs_from_the_training_config():
    # the shipped launch/accelerate/deepspeed_zero2.yaml: gradient_accumulation_steps 1, gradient_clipping 1.0
    acc, ds = _ds_accelerator(gradient_accumulation_steps=1, gradient_clipping=1.0)
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # what made accelerate.prepare() refuse to start
    notes = configure_deepspeed(acc, TrainConfig(minibatch_size=2, grad_accum_steps=4, max_grad_norm=1.0))
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["gradient_clipping"] == 1.0
    assert acc.gradient_accumulation_steps == 4
    assert notes == ["note: DeepSpeed gradient_accumulation_steps 1 replaced by train.grad_accum_steps = 4"]
    acc, ds = _ds_accelerator()  # all "auto": filled silently
    assert configure_deepspeed(acc, TrainConfig(max_grad_norm=None)) == [] and ds["gradient_clipping"] == 0.0
    plain = types.SimpleNamespace(distributed_type="NO")
    assert configure_deepspeed(plain, TrainConfig()) == []


def _overrides(out, **extra):
    o = {"output_dir": str(out), "model.family": "sd3", "model.path": "embedded:tiny-sd3", "prompts.source": "embedded:tiny",
         "reward.weights": "{brightness: 1.0}", "train.iterations": 1, "sampling.steps": 2,
         "train.prompts_per_iteration": 2, "train.group_size": 4, "train.minibatch_size": 2,
         "train.grad_accum_steps": 3, "log.image_every": 0, "log.tensorboard": "false", "log.progress": "false",
         "checkpoint.every": 0, "train.lr": 1e-2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def test_fsdp_config_on_cpu_says_it_runs_plainly(tmp_path, monkeypatch, capsys):
    from fpo_diffusion.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    tr = Trainer(load_config(None, _overrides(tmp_path / "run")))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "FSDP" in line] == [cpu_fallback_note(True)]
    assert tr.accelerator.distributed_type == "NO"  # a str enum


def test_accumulation_steps_once_per_group_and_averages_it(tmp_path, monkeypatch):
    """8 samples, minibatch 2, accumulation 3: groups of 3 and 1 minibatches, two optimizer steps, each on the
    mean gradient of its group (the accumulate()-style sync flag is set on every minibatch)."""
    from fpo_diffusion.trainer import Trainer

    tr = Trainer(load_config(None, _overrides(tmp_path / "run")))
    acc = tr.accelerator
    seen, steps = [], []
    real_backward = acc.backward
    monkeypatch.setattr(acc, "backward", lambda loss, **kw: (seen.append(acc.sync_gradients), real_backward(loss, **kw)))
    real_step = tr.optimizer.step
    monkeypatch.setattr(tr.optimizer, "step", lambda *a, **k: (steps.append(1), real_step(*a, **k))[1])
    tr.train()
    assert seen == [False, False, True, True] and len(steps) == 2 == tr.steps_per_iteration


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_trains_on_cpu_like_a_plain_run(tmp_path):
    """DeepSpeed's CPU backend (DS_ACCELERATOR=cpu), one rank, ZeRO-2, accumulation over 3 minibatches: accelerate.prepare
    starts without a dataloader, the engine steps once per accumulation, and the LoRA ends where a plain run's does."""
    script = tmp_path / "run_ds.py"
    script.write_text(
        "import json, sys, torch\n"
        "from fpo_diffusion.config_io import load_config\n"
        "from fpo_diffusion.trainer import Trainer\n"
        "tr = Trainer(load_config(None, json.loads(sys.argv[1])))\n"
        "tr.train()\n"
        "engine = tr.model\n"
        "params = [p.detach().float().flatten() for p in tr.policy.trainable_parameters()]\n"
        "print(json.dumps({'type': str(tr.accelerator.distributed_type), 'steps': getattr(engine, 'global_steps', None),\n"
        "                  'weights': torch.cat(params).tolist()}))\n")
    env_plain = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DS_"))}
    env_ds = {**env_plain, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
              "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0",
              "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    results = []
    for name, env in (("plain", env_plain), ("ds", env_ds)):
        proc = subprocess.run([sys.executable, str(script), json.dumps(_overrides(tmp_path / name))], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    plain, ds = results
    assert plain["type"].endswith("NO") and ds["type"].endswith("DEEPSPEED")
    assert ds["steps"] == 2  # one engine step per accumulation group (groups of 3 and 1 minibatches)
    torch.testing.assert_close(torch.tensor(ds["weights"]), torch.tensor(plain["weights"]), rtol=1e-4, atol=1e-6)


def test_readme_command_starts_without_accelerate_guessing_defaults():
    """The README's main command names launch/accelerate/single.yaml: accelerate prints no "`--num_processes` was
    set to a value of `0`" list of guessed defaults before the run's own output."""
    readme = (ROOT / "README.md").read_text()
    cmd = "accelerate launch --config_file launch/accelerate/single.yaml launch/train.py"
    assert f"```bash\n{cmd}\n```" in readme
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        "launch/accelerate/single.yaml", "launch/train.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "was set to a value of" not in p.stdout + p.stderr and p.stdout.startswith("usage: train.py")
