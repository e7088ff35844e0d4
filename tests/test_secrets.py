"""Secrets are never written (issue 24, defect 3): the remote reward's token comes from ``$REWARD_SERVER_TOKEN``,
and any option named like a secret is redacted in ``config.yaml``, every ``trainer_state.json`` and the
TensorBoard config text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpo_diffusion.config_io import REDACTED, config_for_writing, load_config, redacted, secrets_in
from rewards.registry import build_reward
from rewards.remote import TOKEN_ENV, RemoteReward
from rewards.server import create_app

from helpers_net import served

TOKEN = "s3cr3t-T0KEN-do-not-write-4f9a"


@pytest.fixture
def server():
    with served(create_app(build_reward("brightness"), token=TOKEN, max_batch=64)) as url:
        yield url


def overrides(out, name: str, options: dict) -> list[str]:
    o = {"output_dir": str(out), "model.family": "sd", "model.path": "embedded:tiny-sd",
         "prompts.source": "embedded:tiny", "reward.weights": json.dumps({name: 1.0}),
         "reward.options": json.dumps({name: {"retries": 0, "timeout": 30, **options}}),
         "train.iterations": 1, "sampling.steps": 2, "train.prompts_per_iteration": 2, "train.group_size": 2,
         "fpo.n_mc": 2, "train.minibatch_size": 4, "log.image_every": 0, "log.tensorboard": "true",
         "log.progress": "false", "checkpoint.every": 1}
    return [f"{k}={v}" for k, v in o.items()]


def no_file_holds_the_token(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in files) and any("tfevents" in p.name for p in files)
    for p in files:
        assert TOKEN.encode() not in p.read_bytes(), f"{p} holds the token"


def test_the_token_is_read_from_the_environment_and_written_nowhere(server, tmp_path, monkeypatch):
    from fpo_diffusion.trainer import run

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert RemoteReward(server).token == TOKEN and RemoteReward(server, token_env="").token is None
    run(load_config(None, overrides(tmp_path / "env", f"remote:{server}", {})))
    no_file_holds_the_token(tmp_path / "env")
    monkeypatch.delenv(TOKEN_ENV)  # without it the server refuses: the token really travelled from the environment
    from fpo_diffusion.trainer import TrainingError

    with pytest.raises(TrainingError, match="refused the request: HTTP 401"):
        run(load_config(None, overrides(tmp_path / "none", f"remote:{server}", {})))


def test_a_token_put_in_the_config_is_redacted_everywhere_and_the_run_resumes(server, tmp_path):
    from fpo_diffusion.trainer import run

    name = f"remote:{server}"
    cfg = load_config(None, overrides(tmp_path / "opt", name, {"token": TOKEN}))
    assert secrets_in(cfg) == [f"reward.options.{name}.token"]
    run(cfg)
    out = tmp_path / "opt"
    no_file_holds_the_token(out)
    assert f"token: {REDACTED}\n" in (out / "config.yaml").read_text()
    state = json.loads(next(out.glob("checkpoints/checkpoint-*/trainer_state.json")).read_text())
    assert state["config"]["reward"]["options"][name]["token"] == REDACTED
    # the same config resumes (the checkpoint's redacted token is not a difference), with more iterations
    cfg2 = load_config(None, overrides(out, name, {"token": TOKEN}) + ["train.iterations=2"])
    run(cfg2, resume="latest")
    no_file_holds_the_token(out)


def test_every_option_named_like_a_secret_is_redacted():
    d = {"reward": {"options": {"x": {"password": "p", "api_key": "k", "hf_token": "t", "Authorization": "a",
                                      "secret_value": 3, "timeout": 5, "token": None}}}, "train": {"lr": 1.0}}
    r = redacted(d)["reward"]["options"]["x"]
    assert r == {"password": REDACTED, "api_key": REDACTED, "hf_token": REDACTED, "Authorization": REDACTED,
                 "secret_value": REDACTED, "timeout": 5, "token": None}
    assert d["reward"]["options"]["x"]["password"] == "p"  # a copy
    assert config_for_writing(load_config(None, [])) == redacted(config_for_writing(load_config(None, [])))
