"""The policy contract: what the trainer needs from a model family.

A policy wraps a stock diffusers pipeline. ``denoiser`` (UNet or transformer) is the module
that carries the LoRA adapter and that the trainer hands to ``accelerator.prepare``; every
method that runs it takes an optional ``model`` argument so the trainer can pass the
wrapped (DDP/FSDP) module and gradients synchronise.

Conditions are plain dicts of tensors with the batch first (``Cond``), keyed like the
pipeline's own ``prompt_embeds``-style arguments, so they can be cached per prompt,
indexed, concatenated and repeated with the helpers below.

Time convention: ``t`` in ``(0, 1)``, ``t -> 1`` is noise. Flow families use
``x_t = (1 - t) x0 + t eps`` with target ``eps - x0``; VP families map ``t`` to a discrete
training timestep and use ``x_t = alpha x0 + sigma eps`` with the eps or v target of the
scheduler's ``prediction_type``.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch
from torch import nn

Cond = dict[str, torch.Tensor]


def _strip_wrappers(model: nn.Module, keep=lambda m: False) -> nn.Module:
    """Strip ``torch.compile`` (``._orig_mod``) and DDP/FSDP-style (``.module``) wrappers, stopping at
    the first module ``keep`` accepts."""
    while not keep(model):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.Module) and hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP-style (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    return _strip_wrappers(model)


def _is_fsdp_wrapper(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FullyShardedDataParallel)


def runnable_module(model: nn.Module) -> nn.Module:
    """The module to *call* for a no-grad forward outside the training step (rollouts, references).

    An FSDP (v1) wrapper is kept: its inner module holds only this rank's shard of every weight, so
    calling the inner module directly fails (or, with a flat shard that happens to fit, computes garbage);
    the wrapper gathers the weights for the forward and frees them after. DDP's and ``torch.compile``'s
    wrappers are stripped as :func:`unwrap_model` does (they add nothing a no-grad forward needs). FSDP2
    (``fully_shard``) shards in place with hooks on the module itself, so it needs no special case.
    """
    return _strip_wrappers(model, keep=_is_fsdp_wrapper)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Every weight of the prepared ``model`` whole on this rank for the block, e.g. to export its LoRA.

    An FSDP (v1) wrapper (found under any DDP / compile wrappers) gathers its shards
    (``summon_full_params``, read-only: a collective, so every rank must enter); anything else already
    holds its weights whole and the block runs as it is.
    """
    m = runnable_module(model)
    if not _is_fsdp_wrapper(m):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(m, writeback=False):
        yield


def batch_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` rows (batches in order)."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def cond_index(cond: Cond, idx: torch.Tensor | list[int] | slice) -> Cond:
    """Select batch rows of every tensor of ``cond``."""
    if isinstance(idx, list):
        idx = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[idx] for k, v in cond.items()}


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conditions along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_repeat(cond: Cond, n: int) -> Cond:
    """Repeat each row ``n`` times consecutively (``repeat_interleave``)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def cond_to(cond: Cond, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
    """Move every tensor (floating ones also to ``dtype``)."""
    out = {}
    for k, v in cond.items():
        v = v.to(device) if device is not None else v
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


class Policy(ABC):
    """One model family behind the contract used by the trainer, rollout and export."""

    family: str = ""
    """Registry name of the family (``sd``, ``sdxl``, ``sd3``, ``flux``)."""
    prediction_type: str = ""
    """``epsilon``, ``v_prediction`` or ``flow``."""
    default_lora_targets: tuple[str, ...] = ()
    """Module-name suffixes that get LoRA by default (attention projections)."""

    pipeline: Any
    denoiser: nn.Module

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> "Policy":
        """Load the family's stock diffusers pipeline from a folder or hub id."""

    # --- conditions and sampling -----------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Text conditions for ``prompts`` (no grad), batch first."""

    @abstractmethod
    def sample(self, cond: Cond, generators: list[torch.Generator], *, steps: int,
               guidance_scale: float, scheduler: str | None = None, height: int | None = None,
               width: int | None = None, negative_cond: Cond | None = None,
               model: nn.Module | None = None) -> torch.Tensor:
        """Final latents ``x0`` from the stock pipeline (``output_type="latent"``), one generator per row."""

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]``, ``[B, 3, H, W]`` float32."""

    @abstractmethod
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        """Shape of one ``x0`` (without the batch)."""

    # --- the CFM loss ----------------------------------------------------------------------
    @abstractmethod
    def cfm_loss(self, x0: torch.Tensor, cond: Cond, t: torch.Tensor, eps: torch.Tensor, *,
                 model: nn.Module | None = None, return_pred: bool = False, guidance_scale: float = 1.0,
                 negative_cond: Cond | None = None):
        """Per-pair CFM loss ``[B, N]`` reduced (mean) over latent dims.

        ``x0 [B, *L]``, ``t [B, N]``, ``eps [B, N, *L]``; one batched forward over ``B * N``.
        With ``return_pred`` also returns the model prediction ``[B, N, *L]`` (for KL). With
        ``guidance_scale > 1`` the loss (and prediction) is that of the CFG-combined prediction, the
        unconditional branch (``negative_cond``, default the empty prompt) without grad.
        """

    # --- LoRA ------------------------------------------------------------------------------
    @abstractmethod
    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules: list[str] | None = None,
                 dropout: float = 0.0, init: str | bool = True) -> None:
        """Attach a peft LoRA adapter to ``denoiser``; freezes everything else."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self, model: nn.Module | None = None) -> Iterator[None]:
        """Context in which the denoiser runs as the frozen base model (adapter disabled)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)

    def set_distilled_guidance(self, scale: float) -> None:
        """The embedded guidance of a guidance-distilled model (FLUX's ``guidance``; in a training config
        ``sampling.distilled_guidance``). Families without one have nothing to set (default)."""

    def complete_for_saving(self) -> None:
        """Called before ``pipeline.save_pretrained`` of a merged model: whatever the folder needs so that
        the stock ``from_pretrained`` call loads it (default: nothing)."""

    @abstractmethod
    def export_lora(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
        """Write ``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights(out_dir)``."""
