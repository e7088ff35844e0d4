"""Export a LoRA (diffusers format): a training run's at its end, or a run's checkpoint (also as a
merged full pipeline)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import (CheckpointError, NonfiniteStateError, WriteError, load_trainable, named_trainable,
                         read_state, resolve_resume, writing)
from .config import ConfigError
from .config_io import load_config
from .errors import OutputExistsError


def export_trained_lora(accelerator, policy, out_dir: str | Path, ema=None, model=None) -> Path:
    """Write the policy's LoRA (with ``ema``'s weights swapped in, if given) in the diffusers format to
    ``out_dir``; every rank calls this, the main process writes. ``model``: the prepared denoiser, whose
    FSDP shards are gathered for the export (``policies.base.full_parameters``)."""
    from .policies.base import full_parameters

    out_dir = Path(out_dir)
    accelerator.wait_for_everyone()
    error: CheckpointError | None = None
    with (ema.swapped_in() if ema is not None else contextlib.nullcontext()), \
            (full_parameters(model) if model is not None else contextlib.nullcontext()):
        if accelerator.is_main_process:
            bad = [n for n, p in named_trainable(policy.denoiser).items() if not bool(torch.isfinite(p).all())]
            if bad:  # never a non-finite LoRA on disk (the update restores a step that overflows)
                error = NonfiniteStateError(f"refusing to export the LoRA to {out_dir}: {len(bad)} of its tensors hold "
                                            f"non-finite values (e.g. {bad[0]})")
            else:
                try:
                    with writing(f"the LoRA to {out_dir}", partial=None if out_dir.exists() else out_dir):
                        policy.export_lora(str(out_dir))
                except CheckpointError as e:
                    error = e
    failed = accelerator.gather(torch.tensor([float(error is not None)], device=accelerator.device))
    if bool(failed.max() > 0):
        raise error or CheckpointError(f"the main process could not export the LoRA to {out_dir}")
    return out_dir


def load_trained_policy(run_dir: str | Path, checkpoint: str = "latest", *, ema: bool = False,
                        device: str | torch.device = "cpu"):
    """The run's policy with the LoRA weights of ``checkpoint`` (``latest`` or a path) loaded."""
    from .embedded import load_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a training run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    ckpt = resolve_resume(checkpoint, run_dir / "checkpoints")
    read_state(ckpt)
    policy = load_model(cfg.model.family, cfg.model.path, dtype=cfg.model.dtype, device=device,
                        distilled_guidance=cfg.sampling.distilled_guidance)
    torch.manual_seed(cfg.train.seed)
    policy.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                    dropout=cfg.lora.dropout)
    params = named_trainable(policy.denoiser)
    if ema:
        f = ckpt / "ema.safetensors"
        if not f.exists():
            raise CheckpointError(f"checkpoint {ckpt} holds no EMA weights (train.ema_decay was off)")
        ema_t = load_file(str(f))
        state = {n: ema_t[str(i)] for i, n in enumerate(params)}
    else:
        state = load_file(str(ckpt / "lora.safetensors"))
    load_trainable(policy.denoiser, state, f"checkpoint {ckpt}")
    return policy, cfg, ckpt


EXPORT_FORMATS = ("diffusers", "kohya")
"""``export_run`` formats: diffusers' ``pytorch_lora_weights.safetensors``, or kohya-ss's layout."""


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest", *, ema: bool = False,
               merge: bool = False, format: str = "diffusers") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (or, with ``merge``, a full pipeline) to ``out_dir``.

    ``format="kohya"`` writes ``<run name>.safetensors`` in the kohya-ss layout instead (SD/SDXL; for
    AUTOMATIC1111, ComfyUI, ...). ``out_dir`` must not exist yet or be empty: nothing already written is
    overwritten. Returns the folder (diffusers, merge) or the file (kohya).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if merge and format != "diffusers":
        raise ValueError("--merge writes a full diffusers pipeline: it does not combine with --format kohya")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"--out {out_dir} is a file, not a folder; choose a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f"output folder {out_dir} is not empty; choose another --out")
    if format == "kohya":  # the cheap check first: the run's family, from its config, before loading the pipeline
        run_cfg = Path(run_dir) / "config.yaml"
        if run_cfg.is_file():
            from .embedded import check_model

            cfg = load_config(run_cfg)
            family = check_model(cfg.model.family, cfg.model.path)
            if family not in ("sd", "sdxl"):
                raise ConfigError(f"--format kohya is for SD 1.x/2.x and SDXL LoRAs; {run_dir} trained a {family} "
                                  f"model: export it in the diffusers format (drop --format kohya)")
    parent = out_dir.resolve().parent
    if not os.access(parent if parent.exists() else parent.parent, os.W_OK) or \
            (out_dir.exists() and not os.access(out_dir, os.W_OK)):
        raise WriteError(f"cannot write to --out {out_dir}: permission denied; choose a writable folder")
    policy, _, _ = load_trained_policy(run_dir, checkpoint, ema=ema)
    if merge:  # a whole pipeline: written to a temporary folder, renamed when complete (a failure leaves nothing)
        from .lora import merge_lora

        merge_lora(policy)
        policy.complete_for_saving()  # e.g. a T5-less SD3 pipeline gets the null T5, so the stock call loads it
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{out_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(f"the merged pipeline to {out_dir}", partial=tmp):
            policy.pipeline.save_pretrained(str(tmp))
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            tmp.rename(out_dir)
    elif format == "kohya":
        from .lora import export_lora_kohya

        with writing(f"the LoRA to {out_dir}", partial=None if out_dir.exists() else out_dir):
            return Path(export_lora_kohya(policy, out_dir / f"{Path(run_dir).resolve().name}.safetensors"))
    else:
        with writing(f"the LoRA to {out_dir}", partial=None if out_dir.exists() else out_dir):
            policy.export_lora(str(out_dir))
    return out_dir
