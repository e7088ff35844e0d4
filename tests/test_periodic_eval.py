"""Periodic evaluation during training (eval.*), the progress line and the run's last line."""
import json

import pytest

from fpo_diffusion.config import ConfigError
from fpo_diffusion.config_io import load_config
from fpo_diffusion.tracking import progress_line, where_line

EVAL_ROWS = [{"prompt": "a red circle", "tag": "colors"}, {"prompt": "two blue squares", "tag": "counting"},
             {"prompt": "a green triangle", "tag": "colors"}]


def _cfg(tmp_path, **extra):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    o = {"output_dir": str(tmp_path / "run"), "model.family": "sd3", "model.path": "embedded:tiny-sd3",
         "prompts.source": "embedded:tiny", "reward.weights": "{brightness: 1.0}", "sampling.steps": 2,
         "train.iterations": 3, "train.prompts_per_iteration": 2, "train.group_size": 2, "train.lr": 3e-2,
         "log.image_every": 0, "log.progress": "false", "checkpoint.every": 0,
         "eval.every": 2, "eval.prompts": str(tmp_path / "eval.jsonl"), "eval.images_per_prompt": 2}
    o.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def test_eval_config_is_checked(tmp_path):
    assert load_config().eval.every == 0  # off by default
    with pytest.raises(ConfigError, match="eval.every=5 needs eval.prompts"):
        load_config(None, ["eval.every=5"])
    with pytest.raises(ConfigError, match="eval.images_per_prompt must be >= 1"):
        load_config(None, ["eval.images_per_prompt=0"])


def test_periodic_eval_logs_reward_per_task_and_a_grid_with_fixed_seeds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fpo_diffusion.trainer import Trainer

    tr = Trainer(_cfg(tmp_path))
    before = tr.periodic_eval.run(tr.model, 0)[0]
    assert tr.periodic_eval.run(tr.model, 5)[0] == before  # the same prompts and noise at every evaluation
    tr.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [-1, 0, 1, 2]  # the start (eval.at_start), then one row per iteration
    assert rows[0] == {"iteration": -1, **before}  # the starting policy, under the same noise
    evaluated = [r["iteration"] for r in rows if "eval/reward/mean" in r]
    assert evaluated == [-1, 1, 2]  # before training, after every 2 iterations and after the last
    last = rows[-1]
    assert set(k for k in last if k.startswith("eval/task/")) == {"eval/task/colors", "eval/task/counting"}
    # each task's standard error over its images (counting: one prompt x 2 images)
    assert set(k for k in last if k.startswith("eval/task_se/")) == {"eval/task_se/colors", "eval/task_se/counting"}
    assert last["eval/task_se/counting"] > 0
    assert last["eval/reward/mean"] != before["eval/reward/mean"]  # the policy moved (lr 3e-2)
    # brightness of 6 images: colors is the mean of prompts 0 and 2, counting of prompt 1
    assert last["eval/reward/mean"] == pytest.approx((2 * last["eval/task/colors"] + last["eval/task/counting"]) / 3)
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["eval_-00001.png", "eval_000001.png",
                                                                                "eval_000002.png"]
    ea = EventAccumulator(str(tmp_path / "run" / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("eval/reward/mean")] == [-1, 1, 2]


def test_eval_at_start_off_and_not_on_resume(tmp_path):
    from fpo_diffusion.trainer import Trainer

    Trainer(_cfg(tmp_path, **{"eval.at_start": "false", "checkpoint.every": 1})).train(stop_after=1)
    path = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0]
    Trainer(_cfg(tmp_path, **{"checkpoint.every": 1}), resume="latest").train()  # at_start on: not on resume
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_eval_tags_evaluate_only_those_tasks(tmp_path):
    from fpo_diffusion.trainer import Trainer

    tr = Trainer(_cfg(tmp_path, **{"eval.tags": "[counting]"}))
    out = tr.periodic_eval.run(tr.model, 0)[0]
    assert tr.periodic_eval.n == 2 and set(k for k in out if k.startswith("eval/task/")) == {"eval/task/counting"}


def test_eval_reward_options_score_the_evaluation_by_another_reading(tmp_path):
    """``eval.reward_options`` merges over ``reward.options`` for the evaluation's reward only: the same images
    scored another way, the training reward untouched; a name outside ``reward.weights`` is one config error."""
    from fpo_diffusion.trainer import Trainer

    train = {"reward.weights": "{jpeg_compressibility: 1.0}", "reward.options": "{jpeg_compressibility: {quality: 95}}"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = Trainer(_cfg(tmp_path / "a", **train))
    other = Trainer(_cfg(tmp_path / "b", **train, **{"eval.reward_options": "{jpeg_compressibility: {quality: 10}}"}))
    assert plain.periodic_eval.reward is plain.reward
    assert other.reward.options == {"jpeg_compressibility": {"quality": 95}}
    assert other.periodic_eval.reward.options == {"jpeg_compressibility": {"quality": 10}}
    a, b = plain.periodic_eval.run(plain.model, 0)[0], other.periodic_eval.run(other.model, 0)[0]
    assert a["eval/reward/mean"] != pytest.approx(b["eval/reward/mean"], rel=1e-3)
    with pytest.raises(ConfigError, match=r"^eval.reward_options names reward 'brightness', which reward.weights does "
                                          r"not \(jpeg_compressibility\)$"):
        _cfg(tmp_path, **train, **{"eval.reward_options": "{brightness: {}}"})
    from fpo_diffusion.config_io import config_warnings

    assert config_warnings(load_config(None, ["eval.reward_options={shapes: {color_weight: 0.0}}"])) == [
        "warning: eval.reward_options is set but eval.every=0: there is no periodic evaluation to score"]
    with pytest.raises(ConfigError, match="^eval.reward_options: expected dict"):
        _cfg(tmp_path, **train, **{"eval.reward_options": "{jpeg_compressibility: 3}"})


def test_progress_line_and_last_line(tmp_path):
    m = {"reward/mean": 0.41234, "fpo/log_ratio_std": 3.1e-4, "fpo/ratio_min": 0.99971, "fpo/ratio_max": 1.00068,
         "fpo/clip_frac": 0.0, "perf/rollout_s": 1.85, "perf/update_s": 1.44, "eval/reward/mean": 0.5}
    line = progress_line(m, "fpo", [0.3, 0.4, 0.41234])
    assert line == ("reward 0.412 (mean of last 3: 0.371) | log-ratio std 3.10e-04 | ratio [0.99971, 1.00068] | "
                    "clip 0.000 | eval 0.500 | rollout 1.9s update 1.4s")
    assert "ratio=1.000" not in line
    assert progress_line({"reward/mean": 0.5, "perf/rollout_s": 1, "perf/update_s": 2}, "ddpo", [0.5]) == \
        "reward 0.500 | rollout 1.0s update 2.0s"
    out = tmp_path / "run"
    assert where_line(out, exported=True, tensorboard=True) == (
        f"done: LoRA in {out / 'lora'}, checkpoints in {out / 'checkpoints'}, TensorBoard logs in {out / 'tb'} "
        f"(tensorboard --logdir {out / 'tb'})")
    assert "no LoRA exported yet" in where_line(out, exported=False, tensorboard=False)


def test_training_prints_where_things_are_and_no_nested_bar(tmp_path, capsys):
    from fpo_diffusion.trainer import Trainer

    cfg = _cfg(tmp_path, **{"eval.every": 0, "train.iterations": 1, "log.progress": "true"})
    tr = Trainer(cfg)
    assert tr.rollout_driver.progress is False  # one bar: the iterations'
    tr.train()
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == where_line(tmp_path / "run", exported=True, tensorboard=True)
    assert "rollout 0:" not in captured.err  # the per-rollout bar (its description, "rollout <iteration>: ...")
