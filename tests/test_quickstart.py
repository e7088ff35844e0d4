"""The README's main command, end to end, on the shipped shapes model (shortened by overrides)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_main_command_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    # The README's `accelerate launch --config_file launch/accelerate/single.yaml launch/train.py`, cut to 2
    # small iterations.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "launch" / "accelerate" / "single.yaml"), str(ROOT / "launch" / "train.py"),
           f"output_dir={out}", "train.iterations=2", "train.prompts_per_iteration=2", "train.group_size=2",
           "train.minibatch_size=4", "sampling.steps=4", "fpo.n_mc=2", "log.image_every=1", "checkpoint.every=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-4000:]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["path"] == "embedded:shapes" and cfg["reward"]["weights"] == {"shapes": 1.0}
    assert cfg["fpo"]["kl_beta"] > 0  # the default run keeps the KL anchor on
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(-0.5 <= r["reward/mean"] <= 1.0 for r in rows)
    assert (out / "checkpoints" / "checkpoint-000002" / "trainer_state.json").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert sorted(x.name for x in (out / "images").iterdir()) == ["samples_000000.png", "samples_000001.png"]
    assert any((out / "tb").iterdir())
