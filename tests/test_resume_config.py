"""``--resume`` continues the run's own saved config (issue 24, defect 1).

``launch/train.py output_dir=X --resume latest`` after a run with ``train.iterations=2 eval.every=1
checkpoint.every=1`` used to rebuild the run from the defaults (20 iterations, no evaluation, checkpoints every
10, ``config.yaml`` left saying 2). Now the saved config is the run; a setting given again must be the saved
one or is refused with one line; ``--allow-change KEY=VALUE`` changes one deliberately and is recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_trainer import cli  # noqa: F401  (launch/train.py in-process -> (exit status, stderr lines))


def run_args(out: Path) -> list[str]:
    return [f"output_dir={out}", "model.family=sd", "model.path=embedded:tiny-sd", "prompts.source=embedded:tiny",
            "reward.weights={brightness: 1.0}", "sampling.steps=2", "train.prompts_per_iteration=2",
            "train.group_size=2", "fpo.n_mc=2", "train.minibatch_size=4", "log.image_every=0", "log.tensorboard=false",
            "log.progress=false", "train.iterations=2", "checkpoint.every=1", "checkpoint.keep_last=5",
            "eval.every=1", "eval.prompts=embedded:tiny", "eval.max_prompts=2", "eval.images_per_prompt=1",
            "eval.at_start=false"]


def rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_latest_continues_the_saved_run_not_the_defaults(tmp_path, cli):
    out = tmp_path / "run"
    rc, err = cli(run_args(out) + ["--stop-after", "1"])
    assert rc == 0, err
    assert [r["iteration"] for r in rows(out)] == [0]
    rc, err = cli([f"output_dir={out}", "--resume", "latest"])  # nothing repeated
    assert rc == 0, err
    m = rows(out)
    assert [r["iteration"] for r in m] == [0, 1]  # 2 iterations, not the default 20
    assert all("eval/reward/mean" in r for r in m)  # the evaluation of the run goes on
    assert (out / "checkpoints" / "checkpoint-000001").is_dir()  # checkpoint.every=1, not 10
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["iterations"] == 2
    assert (out / "lora").is_dir()


def test_settings_given_on_resume_must_be_the_saved_ones(tmp_path, cli):
    out = tmp_path / "run"
    assert cli(run_args(out) + ["--stop-after", "1"])[0] == 0
    before = (out / "config.yaml").read_text(), (out / "metrics.jsonl").read_text()
    assert cli(run_args(out) + ["--resume", "latest", "--stop-after", "1"])[0] == 0  # the same settings: fine
    for change in ("train.iterations=5", "eval.every=0", "train.lr=0.1"):
        rc, err = cli([f"output_dir={out}", change, "--resume", "latest"])
        assert rc == 2 and len(err) == 1, err
        key = change.split("=")[0]
        assert err[0].startswith("train: error: --resume continues the run's own config") and key in err[0]
        assert "--allow-change" in err[0]
    assert (out / "config.yaml").read_text() == before[0]


def test_allow_change_changes_a_setting_deliberately_and_records_it(tmp_path, cli, capsys):
    out = tmp_path / "run"
    assert cli(run_args(out))[0] == 0
    rc, err = cli([f"output_dir={out}", "--resume", "latest", "--allow-change", "train.iterations=3"])
    assert rc == 0, err
    assert any("train.iterations 2 -> 3 (--allow-change)" in l for l in err), err
    assert [r["iteration"] for r in rows(out)] == [0, 1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["iterations"] == 3 and saved["eval"]["every"] == 1
    state = json.loads((out / "checkpoints" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["config"]["train"]["iterations"] == 3
    # what would make it another run cannot change, and --allow-change needs --resume
    rc, err = cli([f"output_dir={out}", "--resume", "latest", "--allow-change", "train.lr=0.1"])
    assert rc == 2 and len(err) == 1 and "train.lr cannot change on resume" in err[0]
    rc, err = cli([f"output_dir={tmp_path / 'new'}", "--allow-change", "train.iterations=3"])
    assert rc == 2 and len(err) == 1 and "use it with --resume" in err[0]
