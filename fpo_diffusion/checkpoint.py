"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/checkpoint-<iteration:06d>`` written
first under a temporary name (``.tmp-checkpoint-...``) and renamed only when complete;
``trainer_state.json`` is its last file, so a folder without it is never a checkpoint
and ``latest`` only ever names a complete one. Inside: ``accelerator.save_state`` output
(optimizer, RNG states of every rank, registered objects such as the LR scheduler) with
the model saved as its LoRA weights only (``lora.safetensors``), plus ``ema.safetensors``
when EMA is on.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import faults

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_OLD = re.compile(r"^\.old-checkpoint-(\d+)$")  # a complete checkpoint moved aside while being replaced


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _NAME.match(p.name) or _OLD.match(p.name)
        if m and is_checkpoint(p) and (int(m.group(1)) not in found or _NAME.match(p.name)):
            # A process killed between the two renames that replace checkpoint-N leaves the old complete
            # folder as .old-checkpoint-N and no checkpoint-N: it still counts (the plain name wins).
            found[int(m.group(1))] = p
    return [found[i] for i in sorted(found)]


def resolve_resume(resume: str, root: str | Path) -> Path:
    """``latest`` or a path -> a complete checkpoint folder, else :class:`CheckpointError`."""
    if resume == "latest":
        ckpts = list_checkpoints(root)
        if not ckpts:
            raise CheckpointError(f"--resume latest: no complete checkpoint in {root}")
        return ckpts[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume path {path} does not exist or is not a folder")
    if not is_checkpoint(path):
        raise CheckpointError(f"resume path {path} is not a checkpoint (no {STATE_FILE})")
    return path


def read_state(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from None


def named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into the model's trainable (LoRA) parameters; every one of them must be there."""
    params = named_trainable(model)
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"{where} lacks LoRA weights such as {missing[0]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))


def install_lora_only_hooks(accelerator, lora_file: str = "lora.safetensors") -> None:
    """Make ``save_state``/``load_state`` store only the trainable (LoRA) weights of the model."""

    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            params = named_trainable(accelerator.unwrap_model(m))
            save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items()},
                      os.path.join(output_dir, lora_file if i == 0 else f"lora_{i}.safetensors"))
        weights.clear()  # nothing else of the (frozen) model is written

    def load_hook(models, input_dir):
        for i in range(len(models)):
            m = accelerator.unwrap_model(models.pop())
            load_trainable(m, load_file(os.path.join(input_dir, lora_file if i == 0 else f"lora_{i}.safetensors")),
                           f"checkpoint {input_dir}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(accelerator, root: str | Path, iteration: int, state: dict,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None, keep_last: int = 2) -> Path:
    """Write a checkpoint atomically (every rank must call this); prune to ``keep_last``.

    ``extra`` maps file names to tensor dicts written by the main process (e.g. EMA).
    On failure (disk full...) the temporary folder is removed, earlier checkpoints stay
    intact, and :class:`CheckpointError` says what happened.
    """
    root = Path(root)
    final = root / f"{PREFIX}{iteration:06d}"
    tmp = root / f".tmp-{PREFIX}{iteration:06d}"
    error = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            for name, tensors in (extra or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
            faults.hit("checkpoint_write")
            state_path = tmp / STATE_FILE
            with open(state_path, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        error = e
    accelerator.wait_for_everyone()
    if error is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final.name}: {error.strerror or error}; "
                              f"earlier checkpoints are intact") from None
    if accelerator.is_main_process:
        faults.hit("checkpoint_rename")
        if final.exists():  # the same iteration saved again (e.g. after a resume): replace atomically
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            faults.hit("checkpoint_replace")
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_extra(path: str | Path, name: str) -> dict[str, torch.Tensor] | None:
    f = Path(path) / name
    return load_file(str(f)) if f.exists() else None
