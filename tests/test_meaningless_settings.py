"""Settings that are accepted but mean nothing are refused or said in one line before anything loads
(issue 24, defects 4 and 5)."""
from __future__ import annotations

import pytest

from fpo_diffusion.config import ConfigError, load_config
from test_trainer import cli  # noqa: F401  (launch/train.py in-process -> (exit status, stderr lines))

TINY = ["model.family=sd", "model.path=embedded:tiny-sd", "prompts.source=embedded:tiny",
        "reward.weights={brightness: 1.0}", "sampling.steps=2", "train.prompts_per_iteration=2", "train.group_size=2",
        "fpo.n_mc=2", "train.minibatch_size=4", "log.image_every=0", "log.tensorboard=false", "log.progress=false",
        "train.iterations=1"]


def loaded(monkeypatch):
    """Fail the test if a pipeline starts loading."""
    import fpo_diffusion.policies as P

    def no_load(*a, **k):
        raise AssertionError("a pipeline was loaded")

    monkeypatch.setattr(P, "load_policy", no_load)


@pytest.mark.parametrize("family,path", [("sd", "embedded:shapes"), ("flux", "embedded:shapes"),
                                         ("sd", "ASSET"), ("flux", "ASSET"), ("sd3", "embedded:tiny-sd")])
def test_a_model_family_that_contradicts_the_model_is_one_line_before_loading(family, path, tmp_path, cli,
                                                                               monkeypatch):
    from fpo_diffusion.shapes.pretrain import DEFAULT_ASSET

    path = str(DEFAULT_ASSET) if path == "ASSET" else path
    loaded(monkeypatch)
    extra = TINY[2:] if "tiny" in path else []
    rc, err = cli([f"output_dir={tmp_path / 'run'}", *extra, f"model.family={family}", f"model.path={path}"])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"train: error: model.family={family} contradicts model.path={path}") and "set model.family=" in err[0]
    assert not (tmp_path / "run").exists()


def test_an_uncached_hub_id_offline_is_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    loaded(monkeypatch)
    rc, err = cli([f"output_dir={tmp_path / 'run'}", "model.family=sd3", "model.path=nobody/not-cached-model"])
    assert rc == 2 and len(err) == 1, err
    assert "nobody/not-cached-model is a hub id that is not in the local Hugging Face cache" in err[0]


def test_a_lora_rank_above_the_layers_width_is_refused(tmp_path, cli):
    rc, err = cli([f"output_dir={tmp_path / 'run'}", *TINY, "lora.rank=100000"])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("train: error: lora.rank=100000 is above the width of the layers it adapts (")


def test_awm_train_timesteps_above_the_sampler_steps_is_refused():
    with pytest.raises(ConfigError, match=r"^awm.train_timesteps=20 is more than the 8 sampler steps"):
        load_config(None, ["algorithm=awm", "sampling.steps=10", "awm.train_timesteps=20"])
    with pytest.raises(ConfigError, match=r"^algorithm awm needs int\(sampling.steps x awm.timestep_fraction\) >= 2"):
        load_config(None, ["algorithm=awm", "sampling.steps=2", "awm.train_timesteps=1"])
    load_config(None, ["algorithm=awm", "sampling.steps=10", "awm.train_timesteps=8"])
    load_config(None, ["sampling.steps=2", "awm.train_timesteps=20"])  # not AWM: not its business


def test_eval_prompts_without_eval_every_or_equal_to_the_training_prompts_are_said(tmp_path, capsys):
    from fpo_diffusion.config import config_warnings

    assert config_warnings(load_config(None, [])) == []
    (w,) = config_warnings(load_config(None, ["eval.prompts=embedded:shapes-validation"]))
    assert w.startswith("warning: eval.prompts=embedded:shapes-validation is set but eval.every=0: no held-out")
    (w,) = config_warnings(load_config(None, ["eval.prompts=embedded:shapes", "eval.every=5"]))
    assert w.startswith("warning: eval.prompts is the training prompt source (embedded:shapes): its eval/* "
                        "scores are not held-out")
    assert config_warnings(load_config(None, ["eval.prompts=embedded:shapes-validation", "eval.every=5"])) == []
    from fpo_diffusion.trainer import Trainer

    Trainer(load_config(None, [f"output_dir={tmp_path / 'run'}", *TINY, "eval.prompts=embedded:tiny"])).close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: eval.prompts=embedded:tiny is set but eval.every=0")
