"""Typed configuration: dataclasses, YAML files and dotted CLI overrides.

``load_config(path, overrides)`` starts from the dataclass defaults (the embedded default
run), applies the YAML file, then ``a.b.c=value`` overrides (values parsed as YAML).
Unknown fields, wrong types and malformed YAML raise :class:`ConfigError` with one line
that names the problem.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .noise import TimeSampling


class ConfigError(ValueError):
    """Bad configuration (file, field or value)."""


@dataclass
class ModelConfig:
    """Which model is the policy."""

    family: str = "sd3"
    """``sd`` (SD1.x/2.x), ``sdxl``, ``sd3`` (SD3/3.5), ``flux`` or ``auto`` (read ``model_index.json``)."""
    path: str = "embedded:shapes"
    """A diffusers pipeline folder or hub id; ``embedded:shapes`` is the shipped shapes model,
    ``embedded:tiny-<family>`` a tiny random model built in-process (for smoke tests)."""
    dtype: str = "float32"
    """Dtype of the frozen weights: ``float32``, ``bfloat16`` or ``float16``. LoRA weights stay float32."""


@dataclass
class LoRAConfig:
    """The LoRA adapter on the denoiser (UNet or transformer)."""

    rank: int = 8
    """LoRA rank."""
    alpha: float | None = None
    """LoRA alpha (scale = alpha / rank); ``None`` means ``alpha = rank``."""
    dropout: float = 0.0
    """LoRA dropout; keep 0 so the on-policy ratio is exactly 1."""
    target_modules: list[str] | None = None
    """Module-name suffixes to adapt; ``None``: the family's attention projections."""


@dataclass
class SamplingConfig:
    """Rollouts through the stock diffusers pipeline."""

    scheduler: str | None = None
    """Sampler name (``euler``, ``dpmsolver++``, ``unipc``, ``ddim``, ``flow_euler``...); ``None``: the pipeline's own."""
    steps: int = 20
    """Denoising steps per rollout."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale (``<= 1`` turns CFG off)."""
    negative_prompt: str = ""
    """Negative prompt used with CFG."""
    height: int | None = None
    """Image height in pixels (``None``: the model's default)."""
    width: int | None = None
    """Image width in pixels (``None``: the model's default)."""
    batch_size: int = 64
    """Samples per pipeline call on each rank (the default fits the shapes model: one call per
    iteration; set it to what fits in memory for a real model, e.g. 4-16)."""


@dataclass
class FPOConfig:
    """The FPO objective (``fpo_diffusion/fpo.py``)."""

    n_mc: int = 8
    """Number of ``(t, eps)`` pairs per sample (N_mc)."""
    ratio_mode: str = "mean"
    """``mean`` (FPO paper) or ``per_sample`` (FPO++)."""
    beta: float = 5.0
    """Scale on the loss difference inside the exp; sets how far the ratio moves per step."""
    delta: float | None = None
    """Clamp on the loss difference before the exp; ``None``: no clamp."""
    eps_clip: float = 0.2
    """PPO clip range."""
    eps_clip_high: float | None = None
    """Separate upper clip range; ``None``: same as ``eps_clip``."""
    negative_adv: str = "clip"
    """``clip`` (PPO for every sample) or ``spo`` (SPO penalty for negative advantages, FPO++)."""
    time_sampling: TimeSampling = field(default_factory=TimeSampling)
    """How ``t`` is drawn for the CFM loss."""
    group_noise: bool = False
    """Give every sample of a group (same prompt) the same ``(t, eps)`` pairs: common random
    numbers. Each sample's estimate is unchanged in distribution; the part of the CFM-loss
    gradient that comes from the draw of ``(t, eps)`` (not from the sample) is shared and cancels
    in the advantage-weighted sum, since a group's advantages sum to zero. Measured on the shapes
    default job: no gain (held-out ShapesEval 0.395 with, 0.413 without), hence off."""
    kl_beta: float = 0.05
    """Weight of the KL anchor ``mean (v_theta - v_ref)^2`` to the frozen base model (adapter off)."""
    fm_anchor_beta: float = 0.0
    """Weight of a flow-matching loss on samples drawn from the base model at the start (0: off)."""
    fm_anchor_samples: int = 16
    """Number of base-model samples (per rank) kept for the flow-matching anchor."""


@dataclass
class FlowGRPOConfig:
    """The Flow-GRPO baseline (``algorithm: flow_grpo``; flow families ``sd3``/``flux``).

    Rollouts use its own SDE sampler (``sampling.steps``, ``sampling.guidance_scale``;
    ``sampling.scheduler`` is ignored), see ``fpo_diffusion/algorithms/flow_grpo.py``.
    """

    noise_level: float = 0.7
    """``a`` in the SDE's ``sigma_t = a * sqrt(t / (1 - t))`` (Flow-GRPO's ``noise_level``)."""
    clip_range: float = 1e-4
    """GRPO clip range of the per-step ratio (log-probs are means over latent dims, hence tiny)."""
    timestep_fraction: float = 0.99
    """Fraction of the denoising steps trained per sample and epoch (a random subset; at least one)."""
    kl_beta: float = 0.0
    """Weight of the KL to the frozen base model, ``||mean - mean_ref||^2 / (2 std^2)`` per step (0: off)."""

    def __post_init__(self):
        if not self.noise_level > 0:
            raise ValueError(f"flow_grpo.noise_level must be > 0, got {self.noise_level}")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"flow_grpo.clip_range must be in (0, 1), got {self.clip_range}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"flow_grpo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.kl_beta < 0:
            raise ValueError(f"flow_grpo.kl_beta must be >= 0, got {self.kl_beta}")


@dataclass
class DDPOConfig:
    """The DDPO baseline (``algorithm: ddpo``; VP families ``sd``/``sdxl``).

    Rollouts use DDIM with ``eta`` (``sampling.steps``, ``sampling.guidance_scale``;
    ``sampling.scheduler`` is ignored), see ``fpo_diffusion/algorithms/ddpo.py``.
    """

    eta: float = 1.0
    """DDIM eta of the sampler (> 0; 1 is DDPO's default)."""
    clip_range: float = 1e-4
    """PPO clip range of the per-step ratio (log-probs are means over latent dims, hence tiny)."""
    timestep_fraction: float = 1.0
    """Fraction of the denoising steps trained per sample and epoch (a random subset; at least one)."""
    kl_beta: float = 0.0
    """Weight of the KL to the frozen base model, ``||mean - mean_ref||^2 / (2 std^2)`` per step (0: off)."""

    def __post_init__(self):
        if not self.eta > 0:
            raise ValueError(f"ddpo.eta must be > 0, got {self.eta}")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"ddpo.clip_range must be in (0, 1), got {self.clip_range}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"ddpo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.kl_beta < 0:
            raise ValueError(f"ddpo.kl_beta must be >= 0, got {self.kl_beta}")


@dataclass
class AdvantageConfig:
    """Per-prompt group advantages (``fpo_diffusion/advantages.py``)."""

    std: str = "group"
    """``group``: divide by each group's reward std; ``global``: by the std of the whole batch."""
    clip: float = 5.0
    """Advantages are clipped to ``[-clip, clip]``."""
    eps: float = 1e-4
    """Added to the std."""


@dataclass
class RewardConfig:
    """The reward: a weighted sum of registered rewards (``rewards/``)."""

    weights: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    """``{reward name: weight}``; every component is logged separately."""
    options: dict[str, dict] = field(default_factory=lambda: {"shapes": {"mode": "partial"}})
    """``{reward name: {option: value}}`` passed to each reward's constructor (e.g. ``{remote: {url: ...}}``)."""


@dataclass
class PromptConfig:
    """Where training prompts come from (``fpo_diffusion/prompts.py``)."""

    source: str = "embedded:shapes"
    """A ``.txt`` file (one prompt a line), a ``.jsonl`` file (``{"prompt": ..., ...metadata}``,
    GenEval style), ``hf:<dataset>[:<split>]`` or a folder saved by ``datasets``, or
    ``embedded:shapes`` (the shapes world's fixed training set: 2048 GenEval-format entries over
    all six tasks, never a ShapesEval prompt; ``shapes.scenes.training_metadata``) /
    ``embedded:tiny``."""
    column: str = "prompt"
    """Prompt column of a ``datasets`` dataset."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    iterations: int = 125
    """Number of FPO iterations (rollout + update)."""
    prompts_per_iteration: int = 8
    """Distinct prompts per iteration (P), across all ranks."""
    group_size: int = 8
    """Images per prompt (K): the group advantages are computed over. ``P * K`` must divide by the number of ranks."""
    epochs: int = 1
    """Passes (E) over the iteration's samples."""
    minibatch_size: int = 8
    """Samples per forward/backward on each rank."""
    grad_accum_steps: int = 1
    """Minibatches accumulated per optimizer step."""
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    lr_schedule: str = "constant"
    """``constant``, ``linear`` or ``cosine`` (any name ``diffusers.optimization.get_scheduler`` knows)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip (``None``: off)."""
    mixed_precision: str = "no"
    """``no``, ``bf16`` or ``fp16`` (through accelerate)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more compute)."""
    ema_decay: float | None = None
    """EMA of the LoRA weights (used for export); ``None``: off."""
    seed: int = 0
    """Seed of everything (prompts, rollouts, ``(t, eps)`` pairs)."""
    max_nonfinite_in_a_row: int = 3
    """Stop after this many consecutive updates skipped for NaN/Inf."""


@dataclass
class LogConfig:
    """What is logged (always a ``metrics.jsonl``)."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tb``."""
    wandb: bool = False
    """Also log to Weights & Biases (needs ``pip install fpo-diffusion[wandb]``)."""
    wandb_project: str = "fpo-diffusion"
    """W&B project name."""
    image_every: int = 5
    """Log an image grid every this many iterations (0: never)."""
    grid_images: int = 16
    """Images in a logged grid."""
    collapse_ratio: float = 1.5
    """Warn when the policy's CFM loss on its own samples leaves ``[start / r, start * r]``."""
    progress: bool = True
    """Show tqdm progress bars."""


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<output_dir>/checkpoints``."""

    every: int = 25
    """Save every this many iterations (and at the end); 0: only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""


@dataclass
class Config:
    """A whole training run."""

    output_dir: str = "runs/fpo-shapes"
    """Where the run writes config, metrics, TensorBoard, checkpoints and the exported LoRA."""
    algorithm: str = "fpo"
    """``fpo``, or a baseline in the same loop (see ``fpo_diffusion/algorithms``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fpo: FPOConfig = field(default_factory=FPOConfig)
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str) and not isinstance(value, bool):
                try:  # YAML 1.1 reads "3e-4" as a string
                    return float(value.strip().lstrip(".") if value.strip().lower() in (".inf", "+.inf") else value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys need not be strings (``1: x``, ``null: x``)
    if unknown:
        name = unknown[0] if isinstance(unknown[0], str) and unknown[0].isidentifier() else repr(unknown[0])  # one line, whatever the key
        raise ConfigError(f"unknown config field {where + '.' if where != 'config' else ''}{name} "
                          f"(known fields of {cls.__name__}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_to_dict(cfg: Any) -> dict:
    """A plain dict (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("weights", "options"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _split_key(key: str, text: str) -> list[str]:
    """``a."b.c".d`` -> ``["a", "b.c", "d"]``: a double-quoted part keeps its dots."""
    parts, cur, quoted, was_quoted = [], "", False, False
    for ch in key:
        if ch == '"':
            quoted, was_quoted = not quoted, True
        elif ch == "." and not quoted:
            parts.append((cur, was_quoted))
            cur, was_quoted = "", False
        else:
            cur += ch
    if quoted:
        raise ConfigError(f"override {text!r} has an unclosed quote in its key")
    parts.append((cur, was_quoted))
    if any(not p and not q for p, q in parts):
        raise ConfigError(f"override {text!r} has an empty key")
    return [p for p, _ in parts]


def _split_assignment(text: str) -> tuple[str, str]:
    """The key and the raw value of ``key=value``, split at the first ``=`` outside double quotes."""
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not quoted:
            return text[:i], text[i + 1:]
    if quoted:
        raise ConfigError(f"override {text!r} has an unclosed quote in its key")
    raise ConfigError(f"override {text!r} is not of the form dotted.key=value")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> ``(["a", "b"], 3)`` (the value is parsed as YAML).

    A double-quoted part of the key keeps its dots (``reward.weights."remote:http://127.0.0.1:8765"=1``);
    the names under ``reward.weights`` / ``reward.options`` need no quotes (see :func:`load_config`).
    """
    key, raw = _split_assignment(text)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    keys = _split_key(key, text)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. a date-like 2020-13-45, 10^5 digits, [[[[...
        value = raw
    return keys, value


def _reward_name_keys(keys: list[str], reward: dict) -> list[str]:
    """Rejoin a reward name that the dots of a URL split: ``reward.weights.<name>`` takes the whole rest as the
    name; ``reward.options.<name>.<option>...`` the longest prefix of the rest that names a reward in
    ``weights`` or ``options`` (else the first part)."""
    if len(keys) < 3 or keys[0] != "reward" or keys[1] not in ("weights", "options"):
        return keys
    rest = keys[2:]
    if keys[1] == "weights":
        return [*keys[:2], ".".join(rest)]
    known = set(reward.get("weights") or {}) | set(reward.get("options") or {}) if isinstance(reward, dict) else set()
    for n in range(len(rest), 0, -1):
        if ".".join(rest[:n]) in known:
            return [*keys[:2], ".".join(rest[:n]), *rest[n:]]
    return keys


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())  # one line (a ReaderError has no mark)
        raise ConfigError(f"config file {p} is not valid YAML{at}: {what}") from None
    except (ValueError, RecursionError) as e:  # PyYAML constructors: bad dates, huge integers; deep nesting
        raise ConfigError(f"config file {p} is not valid YAML: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then dotted overrides; validated."""
    data = config_to_dict(Config())
    if path is not None:
        data = _merge(data, read_yaml(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        keys = _reward_name_keys(keys, data.get("reward"))
        if len(keys) >= 4 and keys[:2] == ["reward", "options"] and isinstance(data.get("reward"), dict) \
                and isinstance(data["reward"].get("options"), dict):
            data["reward"]["options"].setdefault(keys[2], {})  # reward.options.<name>.<option>=v needs no YAML first
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"unknown config field {'.'.join(keys)} (in override {text!r})")
            node = node[k]
        free = keys[:2] in (["reward", "weights"], ["reward", "options"]) and len(keys) >= 3  # names of rewards, options
        if keys[-1] not in node and not free:
            raise ConfigError(f"unknown config field {'.'.join(keys)} (in override {text!r})")
        node[keys[-1]] = value
    default_reward = config_to_dict(Config())["reward"]
    reward = data.get("reward")
    if isinstance(reward, dict) and reward.get("weights") != default_reward["weights"] \
            and reward.get("options") == default_reward["options"]:
        reward["options"] = {}  # the default options belong to the default reward only
    if isinstance(reward, dict) and isinstance(reward.get("options"), dict) and isinstance(reward.get("weights"), dict):
        for name, opts in default_reward["options"].items():  # e.g. reward.options.<url>.timeout=3 with new weights
            if name not in reward["weights"] and reward["options"].get(name) == opts:
                del reward["options"][name]
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that the dataclasses alone cannot express."""
    t = cfg.train
    for name in ("iterations", "prompts_per_iteration", "group_size", "epochs", "minibatch_size", "grad_accum_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if cfg.fpo.n_mc < 1:
        raise ConfigError(f"fpo.n_mc must be >= 1, got {cfg.fpo.n_mc}")
    if cfg.sampling.steps < 1:
        raise ConfigError(f"sampling.steps must be >= 1, got {cfg.sampling.steps}")
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {t.mixed_precision!r}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.advantage.std not in ("group", "global"):
        raise ConfigError(f"advantage.std must be group or global, got {cfg.advantage.std!r}")
    if not cfg.reward.weights:
        raise ConfigError("reward.weights is empty: name at least one reward")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in (0, 1), got {t.ema_decay}")
    if cfg.sampling.batch_size < 1:
        raise ConfigError(f"sampling.batch_size must be >= 1, got {cfg.sampling.batch_size}")
    if cfg.lora.rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {cfg.lora.rank}")
    if t.max_nonfinite_in_a_row < 1:
        raise ConfigError(f"train.max_nonfinite_in_a_row must be >= 1, got {t.max_nonfinite_in_a_row}")
    # A NaN is never a setting, and these must be finite for the weights to stay finite.
    _no_nan(config_to_dict(cfg), "")
    for name in ("train.lr", "train.weight_decay", "train.adam_eps", "train.max_grad_norm", "fpo.beta", "fpo.kl_beta",
                 "fpo.fm_anchor_beta", "sampling.guidance_scale", "advantage.eps"):
        section, field_ = name.split(".")
        v = getattr(getattr(cfg, section), field_)
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v}")
    if not all(math.isfinite(b) for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be finite numbers, got {t.adam_betas}")
    # Building the objective validates its fields.
    fpo_objective(cfg.fpo)


def _no_nan(node: Any, where: str) -> None:
    if isinstance(node, float) and math.isnan(node):
        raise ConfigError(f"{where} is NaN")
    if isinstance(node, dict) and where != "reward.options":  # options are the rewards' own business
        for k, v in node.items():
            _no_nan(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _no_nan(v, f"{where}[{i}]")


def fpo_objective(f: FPOConfig):
    from .fpo import FPOObjective

    try:
        return FPOObjective(ratio_mode=f.ratio_mode, beta=f.beta, delta=math.inf if f.delta is None else f.delta,
                            eps_clip=f.eps_clip, eps_clip_high=f.eps_clip_high, negative_adv=f.negative_adv)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
