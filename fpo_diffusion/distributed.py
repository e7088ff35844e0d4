"""How the run is distributed: the accelerate launch config's DeepSpeed / FSDP request, the CPU
fallback, and the DeepSpeed settings the trainer owns.

``accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml`` (or ``fsdp.yaml``) asks
for DeepSpeed (FSDP) through the environment (``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``).
On a machine without an accelerator the trainer builds ``Accelerator(cpu=True)``, which runs such a
launch as a plain (gloo) CPU run: :func:`cpu_fallback_note` says so in one line instead of silently.
DeepSpeed's own CPU backend is used instead when the user asks for it with ``DS_ACCELERATOR=cpu``.

Under DeepSpeed the training config is the source of truth for what DeepSpeed would otherwise need
a dataloader or its own config for (:func:`configure_deepspeed`): ``train_micro_batch_size_per_gpu``
is ``train.minibatch_size`` (the trainer passes no dataloader to ``accelerator.prepare``),
``gradient_accumulation_steps`` is ``train.grad_accum_steps`` and ``gradient_clipping`` is
``train.max_grad_norm``.
"""
from __future__ import annotations

import os
from typing import Any

from .config import TrainConfig


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_backend() -> str | None:
    """``"DeepSpeed"`` or ``"FSDP"`` when the accelerate launch config asks for it, else ``None``."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def deepspeed_on_cpu() -> bool:
    """DeepSpeed asked for with its CPU backend selected explicitly (``DS_ACCELERATOR=cpu``)."""
    return requested_backend() == "DeepSpeed" and os.environ.get("DS_ACCELERATOR", "").strip().lower() == "cpu"


def cpu_fallback_note(cpu: bool) -> str | None:
    """The one line to print when ``Accelerator(cpu=cpu)`` turns a DeepSpeed / FSDP launch into a plain run."""
    backend = requested_backend()
    if not cpu or backend is None:
        return None
    extra = " (DeepSpeed's CPU backend: set DS_ACCELERATOR=cpu)" if backend == "DeepSpeed" else ""
    return (f"note: the accelerate config asks for {backend}, but this machine has no GPU: training as a plain "
            f"CPU run, one process per rank{extra}")


def configure_deepspeed(accelerator: Any, train: TrainConfig) -> list[str]:
    """Fill the DeepSpeed config from the training config before ``accelerator.prepare`` (no-op unless
    the accelerator runs DeepSpeed). Returns one note per value the DeepSpeed config had set otherwise."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return []
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    want = {"train_micro_batch_size_per_gpu": train.minibatch_size,
            "gradient_accumulation_steps": train.grad_accum_steps,
            "gradient_clipping": float(train.max_grad_norm) if train.max_grad_norm else 0.0}
    source = {"train_micro_batch_size_per_gpu": "train.minibatch_size",
              "gradient_accumulation_steps": "train.grad_accum_steps", "gradient_clipping": "train.max_grad_norm"}
    notes = []
    for key, value in want.items():
        old = ds.get(key, "auto")
        if old not in ("auto", None) and float(old) != float(value):
            notes.append(f"note: DeepSpeed {key} {old} replaced by {source[key]} = {value}")
        ds[key] = value
    ds["train_batch_size"] = train.minibatch_size * train.grad_accum_steps * accelerator.num_processes
    # accelerate's own accumulation counter must agree (it scales the loss and tells the engine its boundary)
    accelerator.gradient_accumulation_steps = train.grad_accum_steps
    return notes


__all__ = ["configure_deepspeed", "cpu_fallback_note", "deepspeed_on_cpu", "requested_backend"]
