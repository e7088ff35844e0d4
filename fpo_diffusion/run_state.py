"""A run's state across invocations: the EMA of the LoRA weights, the check that a resume
continues the same run, and saving / restoring everything a checkpoint holds
(``checkpoint.py`` writes and reads the folders atomically).
"""
from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import (CheckpointError, list_checkpoints, load_extra, read_state, resolve_resume, save_checkpoint,
                         say_once)
from .config import Config, ConfigError
from .config_io import config_for_writing, config_to_dict, redacted
from .lagged import LaggedWeights
from .run_lock import LOCK_FILE

EMA_FILE = "ema.safetensors"


class EMA(LaggedWeights):
    """An exponential moving average of trainable parameters (``decay`` per optimizer step).

    ``warmup`` and ``every`` follow the baselines' official ``EMAModuleWrapper`` (yifan123/flow_grpo
    ``flow_grpo/ema.py`` lines 33-49): after optimizer step ``n`` (1-based) the average moves when
    ``(n + 1) % every == 0``, with decay ``min((1 + n) / (10 + n), decay)`` under ``warmup``. The count ``n``
    is checkpointed (only then: the plain EMA's state is its weights)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, *, warmup: bool = False, every: int = 1):
        super().__init__(params)
        self.decay = float(decay)
        self.warmup, self.every = bool(warmup), int(every)
        self.steps = 0

    @property
    def counted(self) -> bool:
        return self.warmup or self.every > 1

    def current_decay(self) -> float:
        n = self.steps
        return min((1 + n) / (10 + n), self.decay) if self.warmup else self.decay

    def step(self) -> None:
        if not self.counted:
            self.blend(self.decay)
            return
        self.steps += 1
        if (self.steps + 1) % self.every == 0:
            self.blend(self.current_decay())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.counted:
            state["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.counted and "steps" in state:
            self.steps = int(state["steps"])


@dataclass
class Progress:
    """What a checkpoint carries besides accelerate's state (weights, optimizer, LR schedule, RNG)."""

    iteration: int = 0
    nonfinite_in_a_row: int = 0
    cfm_start: float | None = None
    """The policy's CFM loss on its own samples at the first iteration (the collapse monitor's reference)."""
    nonfinite_iterations_in_a_row: int = 0
    """Iterations in a row that skipped at least one update (``update.NonfiniteGuard.end_iteration``)."""


_UNFINISHED = re.compile(r"^unfinished-\d+$")


def unfinished_start(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run that stopped before its first checkpoint (a ``config.yaml``, no
    checkpoint): there is nothing to resume, and the run may start over."""
    return (out_dir / "config.yaml").is_file() and not list_checkpoints(out_dir / "checkpoints")


def set_aside_unfinished(out_dir: Path) -> Path:
    """Move everything of such a run (config, metrics, samples, images, TensorBoard logs...) into
    ``out_dir/unfinished-<n>/`` so that the run can start over with nothing lost; returns that folder."""
    n = 1
    while (out_dir / f"unfinished-{n}").exists():
        n += 1
    dest = out_dir / f"unfinished-{n}"
    dest.mkdir()
    for p in sorted(out_dir.iterdir()):
        if p.name != LOCK_FILE and p != dest and not _UNFINISHED.match(p.name):
            p.rename(dest / p.name)
    return dest


RESUMABLE_TRAIN_FIELDS = ("iterations", "collective_timeout_s")
"""``train`` fields a resume may change (besides all of ``log`` and ``checkpoint``, and ``output_dir``)."""


RESUMABLE_SECTIONS = ("log", "checkpoint", "eval")
"""Sections a resume may change as a whole (with ``--allow-change``)."""


def may_change_on_resume(keys: list[str]) -> bool:
    """Whether the setting at ``keys`` may change when a run is resumed (it does not change the run itself)."""
    return (keys[0] in RESUMABLE_SECTIONS or (keys[0] == "train" and len(keys) == 2 and keys[1] in RESUMABLE_TRAIN_FIELDS)
            or keys == ["output_dir"])


def _get(node, keys: list[str]):
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return _MISSING
        node = node[k]
    return node


_MISSING = object()


def _explicit_settings(path: str | Path | None, overrides: list[str], data: dict) -> list[list[str]]:
    """The key paths the user set: every leaf of the ``--config`` file (a reward's weights and options as one
    setting each) and every override."""
    from .config_io import override_keys, read_yaml

    found: list[list[str]] = []

    def walk(node, keys):
        if isinstance(node, dict) and node and keys[:2] not in (["reward", "weights"], ["reward", "options"]):
            for k, v in node.items():
                walk(v, keys + [str(k)])
        elif keys:
            found.append(keys)

    if path is not None:
        walk(read_yaml(path), [])
    for text in overrides:
        found.append(override_keys(text, data)[0])
    return found


def _put_back_secrets(saved, given, keys: list[str] | None = None) -> None:
    """Redacted values of the saved config take the value given now (else they are dropped: e.g. a remote
    reward's token then comes from ``$REWARD_SERVER_TOKEN``)."""
    from .config_io import REDACTED

    keys = keys or []
    if not isinstance(saved, dict):
        return
    for k in list(saved):
        if saved[k] == REDACTED:
            value = _get(given, keys + [k])
            if value is _MISSING or value == REDACTED:
                del saved[k]
            else:
                saved[k] = value
        else:
            _put_back_secrets(saved[k], given, keys + [k])


def resume_config(path: str | Path | None, overrides: list[str], allow_change: list[str] | None = None, *,
                  report=say_once) -> Config:
    """The config of ``--resume``: the run's own saved config (``<output_dir>/config.yaml``), not the defaults.

    The ``--config`` file and overrides given now must equal the saved values (one line naming each that
    differs otherwise); ``allow_change`` (``--allow-change a.b=value``) changes a setting deliberately (only
    those that do not change the run itself: ``train.iterations``, ``train.collective_timeout_s``, ``log.*``,
    ``checkpoint.*``, ``eval.*``), and the trainer records the new config. A folder with no complete
    checkpoint (nothing to resume: the run starts over) takes the config given now."""
    from .config_io import REDACTED, load_config, read_yaml

    given = load_config(path, overrides)
    out = Path(given.output_dir)
    saved_file = out / "config.yaml"
    allow_change = list(allow_change or [])
    if not saved_file.is_file() or not list_checkpoints(out / "checkpoints"):
        if allow_change:
            raise ConfigError(f"--allow-change: {out} holds no checkpoint to resume; give the settings as plain "
                              f"overrides")
        return given
    saved = read_yaml(saved_file)
    _fill_defaults(saved, config_to_dict(Config()))
    saved["output_dir"] = given.output_dir  # the same run in another folder (copied or moved)
    now = config_to_dict(given)
    differ = []
    for keys in _explicit_settings(path, overrides, now):
        if keys == ["output_dir"]:
            continue
        want, had = _get(now, keys), _get(saved, keys)
        if had == REDACTED or want == had:
            continue
        differ.append(f"{'.'.join(keys)}={want!r} (the run has {'nothing' if had is _MISSING else repr(had)})")
    if differ:
        raise ConfigError(f"--resume continues the run's own config ({saved_file}), and {'; '.join(differ)}: drop "
                          f"{'it' if len(differ) == 1 else 'them'}, or change a setting deliberately with "
                          f"--allow-change KEY=VALUE (train.iterations, train.collective_timeout_s, log.*, "
                          f"checkpoint.*, eval.*; the config.yaml then records it)")
    _put_back_secrets(saved, now)
    base = dict(saved)
    changes = []
    for text in allow_change:
        from .config_io import override_keys

        keys, _ = override_keys(text, base)
        if not may_change_on_resume(keys):
            raise ConfigError(f"--allow-change {text}: {'.'.join(keys)} cannot change on resume (it would be another "
                              f"run); only train.iterations, train.collective_timeout_s, log.*, checkpoint.* and "
                              f"eval.* can: start a new run in another output_dir")
        changes.append(keys)
    cfg = load_config(None, allow_change, base=base)
    if changes and report is not None:
        new = config_to_dict(cfg)
        said = ", ".join(f"{'.'.join(k)} {_get(saved, k)!r} -> {_get(new, k)!r}" for k in changes)
        report(f"note: resuming {out} with {said} (--allow-change); {saved_file} records the new config")
    return cfg


def _fill_defaults(saved: dict, defaults: dict) -> None:
    """Give a saved config the default of every field it lacks (it was written before the field existed)."""
    for k, v in defaults.items():
        if k not in saved:
            saved[k] = v
        elif isinstance(v, dict) and isinstance(saved[k], dict) and k not in ("weights", "options"):
            _fill_defaults(saved[k], v)


def _steps_per_iteration(cfg: Config, world: int) -> int:
    t = cfg.train
    n_local = t.prompts_per_iteration * t.group_size // world
    return t.epochs * math.ceil(math.ceil(n_local / t.minibatch_size) / t.grad_accum_steps)


def check_resume(cfg: Config, out_dir: Path, resume: str | None, *, world_size: int | None = None,
                 distributed_type: str = "") -> Path | None:
    """The checkpoint to resume from (``None``: a fresh run), after checking that ``out_dir`` holds no
    other run and that ``cfg`` is the checkpoint's own (only ``train.iterations``, ``log``, ``checkpoint``
    and ``eval`` may change, and ``output_dir``: a copied run folder resumes; the periodic evaluation draws
    its own fixed noise and never touches the training's, so adding or changing it keeps the run exact).

    A checkpoint written by another number of processes (``world_size``) resumes with a line saying
    what changes (DDP or one process), or is refused where its optimizer state is sharded
    (DeepSpeed, FSDP)."""
    cfg_file = out_dir / "config.yaml"
    if resume is None:
        if cfg_file.exists():
            raise ConfigError(f"output directory {out_dir} already holds a run; resume it with --resume latest "
                              f"or choose another output_dir")
        return None
    path = resolve_resume(resume, out_dir / "checkpoints")
    state = read_state(path)
    saved = state.get("config")
    if saved is not None:
        now = config_for_writing(cfg)  # as the checkpoint wrote it: secrets redacted (a token may differ)
        saved = redacted(saved)
        _fill_defaults(saved, config_to_dict(Config()))  # fields added since the checkpoint was written
        saved.pop("output_dir", None)  # the same run in another folder (copied or moved)
        now.pop("output_dir", None)
        for section in ("train", "log", "checkpoint", "eval"):
            for k in RESUMABLE_TRAIN_FIELDS if section == "train" else list(now[section]):
                saved.get(section, {}).pop(k, None)
                now[section].pop(k, None)
        if saved != now:
            diff = sorted(f"{s}.{k}" for s in now if isinstance(now[s], dict)
                          for k in now[s] if saved.get(s, {}).get(k) != now[s][k])
            top = sorted(k for k in now if not isinstance(now[k], dict) and saved.get(k) != now[k])
            raise ConfigError(f"the config differs from the checkpoint's in {', '.join(diff + top) or 'its sections'}; "
                              f"resume with the run's own config ({cfg_file})")
    saved_world = state.get("world_size")
    if world_size is not None and isinstance(saved_world, int) and saved_world != world_size:
        if any(k in distributed_type.upper() for k in ("DEEPSPEED", "FSDP")):
            raise CheckpointError(f"checkpoint {path} was written by {saved_world} processes and this run has "
                                  f"{world_size}: its {distributed_type} optimizer state is sharded per process; "
                                  f"resume with {saved_world} processes")
        before, after = _steps_per_iteration(cfg, saved_world), _steps_per_iteration(cfg, world_size)
        say_once(f"warning: checkpoint {path.name} was written by {saved_world} process(es), this run has {world_size}: "
              f"the samples, rewards and noise of every iteration stay the same, but an optimizer step now averages "
              f"{world_size} x train.minibatch_size samples (was {saved_world} x), {after} steps per iteration "
              f"(was {before}), so the run will not be bit-identical to one continued on {saved_world}")
    return path


def save_run(accelerator, root: Path, progress: Progress, cfg: Config, ema: EMA | None) -> Path:
    """Checkpoint the run after ``progress.iteration`` iterations (every rank calls this)."""
    state = {"iteration": progress.iteration, "nonfinite_in_a_row": progress.nonfinite_in_a_row,
             "cfm_start": progress.cfm_start,
             "nonfinite_iterations_in_a_row": progress.nonfinite_iterations_in_a_row, "world_size": accelerator.num_processes, "version": __version__,
             "config": config_for_writing(cfg)}
    extra = {EMA_FILE: ema.state_dict()} if ema is not None else None
    return save_checkpoint(accelerator, root, progress.iteration, state, extra, keep_last=cfg.checkpoint.keep_last)


def load_run(accelerator, path: Path, ema: EMA | None) -> Progress:
    """Restore the checkpoint at ``path`` into ``accelerator``'s objects and ``ema``."""
    state = read_state(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, ImportError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}; resume from another one") from None
    saved_ema = load_extra(path, EMA_FILE)
    if ema is not None and saved_ema is not None:
        ema.load_state_dict(saved_ema)
    return Progress(int(state["iteration"]), int(state.get("nonfinite_in_a_row", 0)), state.get("cfm_start"),
                    int(state.get("nonfinite_iterations_in_a_row", 0)))


__all__ = ["EMA", "EMA_FILE", "Progress", "check_resume", "load_run", "resume_config", "save_run"]
