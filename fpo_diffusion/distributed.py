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




def collective_timeout(seconds: float):
    """accelerate's handler that sets the process group's timeout (``train.collective_timeout_s``): a rank
    waiting longer than this in a gather, barrier or all-reduce raises instead of hanging (torch's
    default: 30 minutes); ``launch/train.py`` turns that into one line."""
    import datetime

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=seconds))


def collective_failure(e: BaseException) -> str | None:
    """What a distributed failure means for the user, in words, or ``None`` if ``e`` is not one: a timeout
    of a collective (another rank is stuck) or a connection lost to another rank (it ended)."""
    import re

    text = " ".join(str(e).split())
    if re.search(r"[Tt]imed out|[Tt]imeout|timed-out", text):
        return "waited longer than train.collective_timeout_s for the other ranks (one is stuck or too slow)"
    if re.search(r"Connection (closed|reset) by peer|Broken pipe", text):
        return "lost the connection to another rank (it ended or was killed)"
    return None


def no_accelerator() -> bool:
    """True on a CPU-only machine: accelerate then runs multi-process launches as gloo CPU ranks
    (without ``cpu=True`` every rank of ``accelerate launch --multi_gpu`` would think it is alone)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (hasattr(torch, "xpu") and torch.xpu.is_available()))


__all__ = ["collective_failure", "collective_timeout", "configure_deepspeed", "cpu_fallback_note", "deepspeed_on_cpu",
           "no_accelerator", "requested_backend"]
