"""Settings that are accepted but mean nothing are refused or said in one line before anything loads
(issue 24, defects 4 and 5)."""
from __future__ import annotations

import pytest

from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config
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
    from fpo_diffusion.shapes.plugin import DEFAULT_ASSET

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
    from fpo_diffusion.config_io import config_warnings

    assert config_warnings(load_config(None, [])) == []
    (w,) = config_warnings(load_config(None, ["eval.prompts=embedded:shapes-validation"]))
    assert w.startswith("warning: eval.prompts=embedded:shapes-validation is set but eval.every=0: no periodic")
    (w,) = config_warnings(load_config(None, ["eval.prompts=embedded:shapes", "eval.every=5"]))
    assert w.startswith("warning: eval.prompts is the training prompt source (embedded:shapes): its eval/* "
                        "scores are not held-out")
    assert config_warnings(load_config(None, ["eval.prompts=embedded:shapes-validation", "eval.every=5"])) == []
    from fpo_diffusion.trainer import Trainer

    Trainer(load_config(None, [f"output_dir={tmp_path / 'run'}", *TINY, "eval.prompts=embedded:tiny"])).close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: eval.prompts=embedded:tiny is set but eval.every=0")


# --- prompt metadata a reward cannot score, and rollouts too large to wait for (issue 24, defect 5) ---------------

COUNTING = {"tag": "counting", "prompt": "three circles", "include": [{"class": "circle", "count": 3}],
            "exclude": [{"class": "circle", "count": 4}]}
SHAPES_RUN = [x for x in TINY if not x.startswith("reward.")] + ["reward.weights={shapes: 1.0}"]


@pytest.mark.parametrize("change,problem", [
    ({"include": [{"class": "dragon", "count": 1}]}, "include[0] class 'dragon' is not a known object name (known: "),
    ({"tag": "countng"}, "tag 'countng' is not a GenEval task (one of single_object, "),
    ({"include": [{"class": "circle", "count": "three"}]},
     "include[0] 'count' must be a positive integer, got 'three'"),
])
@pytest.mark.parametrize("setting", ["prompts.source", "eval.prompts"])
def test_prompt_metadata_the_reward_cannot_score_is_one_line_naming_the_line_before_loading(change, problem, setting,
                                                                                            tmp_path, cli, monkeypatch):
    import json

    loaded(monkeypatch)
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(COUNTING) + "\n")
    bad.write_text(json.dumps(COUNTING) + "\n\n" + json.dumps({**COUNTING, **change}) + "\n")  # the bad entry: line 3
    given = ([f"prompts.source={bad}"] if setting == "prompts.source"
             else [f"prompts.source={good}", f"eval.prompts={bad}", "eval.every=1"])
    rc, err = cli([f"output_dir={tmp_path / 'run'}", *SHAPES_RUN, *given])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"train: error: {setting}: prompt file {bad}, line 3: reward 'shapes': invalid GenEval "
                             f"metadata: {problem}"), err
    assert not (tmp_path / "run").exists()


def test_prompts_without_metadata_for_a_metadata_reward_are_one_line_before_loading(tmp_path, cli, monkeypatch):
    loaded(monkeypatch)
    txt = tmp_path / "p.txt"
    txt.write_text("\na red circle\n")
    rc, err = cli([f"output_dir={tmp_path / 'run'}", *SHAPES_RUN, f"prompts.source={txt}"])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"train: error: prompts.source: prompt file {txt}, line 2: reward 'shapes': needs GenEval "
                             f"metadata per prompt"), err


def test_reward_metadata_checks_build_nothing_and_pass_the_shipped_prompts():
    from fpo_diffusion.config import PromptConfig
    from fpo_diffusion.prompts import check_metadata, load_prompts
    from rewards.multi import MultiReward

    shapes = MultiReward({"shapes": 1.0}).check_metadata
    for src in ("embedded:shapes", "embedded:shapes-counting", "embedded:shapes-validation", "embedded:shapes-test"):
        check_metadata(load_prompts(PromptConfig(source=src)), shapes)
    # GenEval with its Mask2Former (a folder, never opened here): GenEval's 80 COCO names
    m2f = MultiReward({"geneval": 1.0}, {"geneval": {"detector": "/nowhere/mask2former"}}).check_metadata
    dog = {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]}
    assert m2f(dog) is None
    dragon = {**dog, "include": [{"class": "dragon", "count": 1}]}
    assert m2f(dragon) == ("reward 'geneval': needs GenEval metadata: include[0] class 'dragon' is not a known object "
                           "name (not one of the detector's 80 class names)")
    # a callable detector's classes are its own; counts and tags are still GenEval's
    own = MultiReward({"geneval": 1.0}, {"geneval": {"detector": lambda images: []}}).check_metadata
    assert own(dragon) is None
    three = {**dog, "include": [{"class": "dog", "count": "three"}]}
    assert "'count' must be a positive integer, got 'three'" in own(three)
    assert MultiReward({"brightness": 1.0, "remote:http://127.0.0.1:9": 1.0}).check_metadata({"count": "three"}) is None


def test_an_iteration_of_more_than_ten_thousand_images_per_rank_is_said_before_loading(tmp_path, cli, monkeypatch,
                                                                                        capsys):
    from fpo_diffusion.budget import rollout_size_warning

    loaded(monkeypatch)
    with pytest.raises(AssertionError, match="a pipeline was loaded"):
        cli([f"output_dir={tmp_path / 'run'}", *TINY, "train.group_size=100000"])
    (w,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert w.startswith("warning: an iteration samples train.prompts_per_iteration x train.group_size = 2 x 100000 = "
                        "200,000 images (200,000 on each of 1 rank(s), 400,000 denoiser steps at sampling.steps=2): "
                        "the first rollout alone may take hours"), w
    assert rollout_size_warning(load_config(None, []), 1) is None
    assert rollout_size_warning(load_config(None, ["train.group_size=5001", "train.prompts_per_iteration=2"]),
                                2) is None  # 5001 images on each of 2 ranks
