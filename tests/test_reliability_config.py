"""Every setting is range-checked where it is defined (issue 17, items 2, 4, 7, 8; issue 16, defect 7).

A value that would silently train against the reward (``train.max_grad_norm=-1``), make every
advantage ``-clip`` or 0 (``advantage.clip<=0``), train nothing (``lora.alpha=0``), write into the
current directory (``output_dir=``) or crash later with a traceback is refused when the config is
built, with one line that names the field; ``launch/train.py`` prints it and exits 2.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import sys
import typing
from pathlib import Path

import pytest
import yaml

from fpo_diffusion.config import Config, ConfigError
from fpo_diffusion.config_io import load_config
from test_trainer import cli  # noqa: F401  (the fixture: launch/train.py in-process -> (exit status, stderr lines))

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override,needle", [
    ("train.max_grad_norm=-1", "train.max_grad_norm must be a finite number > 0, got -1.0 (null turns clipping off)"),
    ("train.max_grad_norm=0", "train.max_grad_norm must be a finite number > 0"),
    ("advantage.clip=-1", "advantage.clip must be > 0, got -1.0"),
    ("advantage.clip=0", "advantage.clip must be > 0, got 0.0"),
    ("lora.alpha=0", "lora.alpha must be a finite number > 0, got 0.0"),
    ("sampling.height=0", "sampling.height must be >= 1, got 0"),
    ("sampling.height=-64", "sampling.height must be >= 1, got -64"),
    ("sampling.width=-8", "sampling.width must be >= 1, got -8"),
    ("train.warmup_steps=-5", "train.warmup_steps must be >= 0, got -5"),
    ("train.warmup_steps=5", "train.warmup_steps=5 has no effect with train.lr_schedule=constant"),
    ("checkpoint.every=-1", "checkpoint.every must be >= 0, got -1"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0, got -1"),
    ("log.image_every=-1", "log.image_every must be >= 0, got -1"),
    ("model.family=dalle", "model.family must be one of sd, sdxl, sd3, flux, auto, got 'dalle'"),
    ("train.adam_betas=[0.9]", "train.adam_betas must be two numbers [beta1, beta2], got [0.9]"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas[1] must be in [0, 1), got 1.0"),
    ("log.collapse_ratio=0", "log.collapse_ratio must be > 1, got 0.0"),
    ("log.collapse_ratio=1", "log.collapse_ratio must be > 1, got 1.0"),
    ("train.group_size=1", "train.group_size must be >= 2, got 1"),
    ("train.lr=0", "train.lr must be a finite number > 0, got 0.0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be a finite number >= 0"),
    ("train.seed=-1", "train.seed must be in [0, 4294967296), got -1"),
    ("train.lr_schedule=piecewise_constant", "train.lr_schedule must be one of constant, constant_with_warmup"),
    ("fpo.kl_beta=-0.1", "fpo.kl_beta must be a finite number >= 0"),
    ("fpo.beta=.inf", "fpo.beta must be a finite number > 0, got inf"),
    ("fpo.eps_clip_high=0", "fpo.eps_clip_high must be a finite number > 0"),
    ("fpo.time_sampling.grid_size=0", "fpo.time_sampling.grid_size must be >= 1"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
    ("lora.target_modules=[]", "lora.target_modules must be non-empty"),
    ("sampling.guidance_scale=-2", "sampling.guidance_scale must be a finite number >= 0"),
    ("algorithm=ppo", "algorithm must be one of fpo, flow_grpo, ddpo"),
    ("reward.weights={brightness: 0}", "reward.weights are all 0"),
    ("output_dir=", "output_dir must not be empty (an empty output_dir would write the run into the current directory)"),
    ("output_dir='  '", "output_dir must not be empty"),
])
def test_out_of_range_settings_are_refused_with_one_line_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(needle), msg


def test_the_cli_refuses_them_with_exit_2_and_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty output_dir would have meant the current directory
    rc, err = cli(["output_dir="])
    assert rc == 2 and err == ["train: error: output_dir must not be empty (an empty output_dir would write the run "
                               "into the current directory)"]
    rc, err = cli([f"output_dir={tmp_path / 'run'}", "train.max_grad_norm=-1"])
    assert rc == 2 and len(err) == 1 and err[0].startswith("train: error: train.max_grad_norm must be")
    assert list(tmp_path.iterdir()) == []


def test_stop_after_must_be_positive_and_overrides_may_follow_options(cli):
    for bad in ("-3", "0", "x"):
        rc, err = cli(["--stop-after", bad])
        assert rc == 2 and len(err) == 1 and err[0].startswith("train: error: argument --stop-after: "), err
        assert bad in err[0]
    # an override after an option reaches the config (argparse alone said "unrecognized arguments")
    for argv in (["--stop-after", "2", "train.nope=1"], ["train.lr=1e-3", "--stop-after", "2", "train.nope=1"]):
        rc, err = cli(argv)
        assert rc == 2 and err == ["train: error: unknown config field train.nope (in override 'train.nope=1')"]
    rc, err = cli(["--no-such-option"])
    assert rc == 2 and err == ["train: error: unrecognized arguments: --no-such-option (see --help)"]


def test_argparse_types_for_counts():
    import argparse

    from fpo_diffusion.cli import ArgumentParser, UsageError, float_at_least, int_at_least

    p = ArgumentParser(prog="x")
    p.add_argument("--images", type=int_at_least(1), default=4)
    p.add_argument("--cfg", type=float_at_least(0.0), default=4.5)
    p.add_argument("paths", nargs="*")
    assert p.parse_args(["a", "--images", "2", "b"]) == argparse.Namespace(images=2, cfg=4.5, paths=["a", "b"])
    for argv, needle in ((["--images", "0"], "argument --images: must be >= 1, got 0"),
                         (["--cfg", "nan"], "argument --cfg: must be a finite number >= 0.0, got nan"),
                         (["--cfg", "-1"], "argument --cfg: must be a finite number >= 0.0, got -1")):
        with pytest.raises(UsageError, match=needle):
            p.parse_args(argv)


def test_a_yaml_key_null_names_the_file(tmp_path):
    """Issue 16, defect 7: every error caused by the file names the file; one caused by an override does not."""
    f = tmp_path / "c.yaml"
    for text, needle in (("null: 1\n", "unknown config field None"), ("1: x\n", "unknown config field 1"),
                         ("train: {lr: -1}\n", "train.lr must be a finite number > 0"),
                         ("train: {nope: 1}\n", "unknown config field train.nope")):
        f.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert str(e.value).startswith(f"config file {f}: {needle}"), str(e.value)
        if "lr" in text:  # the override fixes it
            assert load_config(f, ["train.lr=1e-3"]).train.lr == 1e-3
    f.write_text("train: {lr: 1e-3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["train.lr=-1"])
    assert str(e.value).startswith("train.lr must be")  # the file is not to blame


# ---------------------------------------------------------------- every field: documented and range-checked

def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _numeric(tp) -> type | None:
    args = [a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


#: Numeric fields where any finite number means something (a reward threshold: rewards may be negative).
ANY_FINITE = {"fpo.time_sampling.logit_mean", "fpo.fm_anchor_min_reward"}
#: Float fields where ``.inf`` is a documented setting.
INF_ALLOWED = {"advantage.clip": "no clip", "log.collapse_ratio": "never warn", "fpo.delta": "no clamp"}


@pytest.mark.parametrize("name", sorted(ANY_FINITE))
def test_a_field_where_any_finite_number_means_something_refuses_a_non_finite_one(name):
    load_config(None, [f"{name}=-1000000000"])
    for bad in (".nan", "-.inf", ".inf"):
        with pytest.raises(ConfigError, match=name.split(".")[-1]):
            load_config(None, [f"{name}={bad}"])


@pytest.mark.parametrize("name,tp", [(n, t) for n, t in _fields(Config) if _numeric(t) and n not in ANY_FINITE])
def test_every_numeric_field_refuses_a_huge_negative_and_a_non_finite_value(name, tp):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{name}=-1000000000"])
    assert name.split(".")[-1] in str(e.value), str(e.value)
    if _numeric(tp) is float:
        for bad in (".nan", "-.inf", *([] if name in INF_ALLOWED else [".inf"])):
            with pytest.raises(ConfigError):
                load_config(None, [f"{name}={bad}"])


def _sections(cls):
    yield cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


def test_every_config_field_is_documented_where_it_is_defined():
    import inspect
    import textwrap

    undocumented = []
    for cls in _sections(Config):
        assert (cls.__doc__ or "").strip(), cls  # a section is documented by its class docstring
        hints = typing.get_type_hints(cls)
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and not dataclasses.is_dataclass(hints[node.target.id]):
                doc = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                        and isinstance(doc.value.value, str) and doc.value.value.strip()):
                    undocumented.append(f"{cls.__name__}.{node.target.id}")
    assert undocumented == [], undocumented


def test_the_defaults_and_every_shipped_config_pass():
    assert math.isfinite(Config().train.lr)
    for f in sorted((ROOT / "launch" / "configs").glob("*.yaml")):
        load_config(f)
    assert yaml.safe_load((ROOT / "launch" / "configs" / "shapes.yaml").read_text()) is not None


def test_an_offline_hf_prompt_source_and_an_export_onto_a_file_are_one_line(tmp_path, capsys):
    from fpo_diffusion.cli import run_cli
    from fpo_diffusion.config import PromptConfig
    from fpo_diffusion.prompts import load_prompts

    assert __import__("os").environ.get("HF_DATASETS_OFFLINE") == "1"  # conftest: nothing downloads
    with pytest.raises(ConfigError) as e:
        load_prompts(PromptConfig(source="hf:someone/no-such-prompts"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("prompt source hf:someone/no-such-prompts: cannot load the dataset (")
    assert "pass the folder of dataset.save_to_disk(...)" in msg
    sys.path.insert(0, str(ROOT / "launch"))
    import export_lora

    target = tmp_path / "a_file"
    target.write_text("precious")
    rc = run_cli(export_lora.main, ["--run", str(tmp_path / "run"), "--out", str(target)], prog="export_lora")
    assert rc == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"export_lora: error: --out {target} is a file, not a folder; choose a new or empty folder"]
    assert target.read_text() == "precious"
