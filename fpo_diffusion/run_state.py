"""A run's state across invocations: the EMA of the LoRA weights, the check that a resume
continues the same run, and saving / restoring everything a checkpoint holds
(``checkpoint.py`` writes and reads the folders atomically).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import load_extra, read_state, resolve_resume, save_checkpoint
from .config import Config, ConfigError, config_to_dict

EMA_FILE = "ema.safetensors"


class EMA:
    """An exponential moving average of trainable parameters (``decay`` per optimizer step)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), float(decay)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for e, p in zip(self.shadow, self.params):
            e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): e for i, e in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, e in enumerate(self.shadow):
            e.copy_(state[str(i)])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily copy the EMA weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


@dataclass
class Progress:
    """What a checkpoint carries besides accelerate's state (weights, optimizer, LR schedule, RNG)."""

    iteration: int = 0
    nonfinite_in_a_row: int = 0
    cfm_start: float | None = None
    """The policy's CFM loss on its own samples at the first iteration (the collapse monitor's reference)."""


def check_resume(cfg: Config, out_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (``None``: a fresh run), after checking that ``out_dir`` holds no
    other run and that ``cfg`` is the checkpoint's own (only ``train.iterations``, ``log`` and
    ``checkpoint`` may change)."""
    cfg_file = out_dir / "config.yaml"
    if resume is None:
        if cfg_file.exists():
            raise ConfigError(f"output directory {out_dir} already holds a run; resume it with --resume latest "
                              f"or choose another output_dir")
        return None
    path = resolve_resume(resume, out_dir / "checkpoints")
    saved = read_state(path).get("config")
    if saved is not None:
        now = config_to_dict(cfg)
        for section in ("train", "log", "checkpoint"):
            for k in ("iterations",) if section == "train" else list(now[section]):
                saved.get(section, {}).pop(k, None)
                now[section].pop(k, None)
        if saved != now:
            diff = sorted(f"{s}.{k}" for s in now if isinstance(now[s], dict)
                          for k in now[s] if saved.get(s, {}).get(k) != now[s][k])
            raise ConfigError(f"the config differs from the checkpoint's in {', '.join(diff) or 'top-level fields'}; "
                              f"resume with the run's own config ({cfg_file})")
    return path


def save_run(accelerator, root: Path, progress: Progress, cfg: Config, ema: EMA | None) -> Path:
    """Checkpoint the run after ``progress.iteration`` iterations (every rank calls this)."""
    state = {"iteration": progress.iteration, "nonfinite_in_a_row": progress.nonfinite_in_a_row,
             "cfm_start": progress.cfm_start, "world_size": accelerator.num_processes, "version": __version__,
             "config": config_to_dict(cfg)}
    extra = {EMA_FILE: ema.state_dict()} if ema is not None else None
    return save_checkpoint(accelerator, root, progress.iteration, state, extra, keep_last=cfg.checkpoint.keep_last)


def load_run(accelerator, path: Path, ema: EMA | None) -> Progress:
    """Restore the checkpoint at ``path`` into ``accelerator``'s objects and ``ema``."""
    state = read_state(path)
    accelerator.load_state(str(path))
    saved_ema = load_extra(path, EMA_FILE)
    if ema is not None and saved_ema is not None:
        ema.load_state_dict(saved_ema)
    return Progress(int(state["iteration"]), int(state.get("nonfinite_in_a_row", 0)), state.get("cfm_start"))


__all__ = ["EMA", "EMA_FILE", "Progress", "check_resume", "load_run", "save_run"]
