"""LoRA through peft: attach, state dict, export in the diffusers format, merge.

* :func:`add_lora` injects a peft LoRA adapter (``denoiser.add_adapter``) and freezes every
  non-LoRA parameter of the denoiser.
* :func:`lora_state_dict` is the adapter's peft-format state dict (keys like
  ``down_blocks.0...to_q.lora_A.weight``), unwrapping DDP/compile wrappers.
* :func:`export_lora` writes ``pytorch_lora_weights.safetensors`` through the family's own
  ``Pipeline.save_lora_weights`` (with the adapter config as metadata, so ``lora_alpha``
  survives), so a stock ``pipe.load_lora_weights(out_dir)`` reproduces the trained denoiser.
* :func:`export_lora_kohya` writes the kohya-ss layout (``lora_unet_*`` keys, ``lora_down`` /
  ``lora_up`` / ``alpha``) that AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI load, for the UNet families,
  through diffusers' own ``convert_state_dict_to_kohya``.
* :func:`merge_lora` fuses the adapter into the base weights and removes the peft layers (diffusers'
  ``fuse_lora`` / ``unload_lora_weights``), so ``policy.pipeline.save_pretrained`` writes a plain pipeline.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .policies.base import unwrap_model

ADAPTER_NAME = "default"


def add_lora(denoiser: nn.Module, *, rank: int = 8, alpha: float | None = None,
             target_modules: list[str] | tuple[str, ...], dropout: float = 0.0,
             init: str | bool = True) -> Any:
    """Attach a LoRA adapter (peft ``LoraConfig``) to ``denoiser``; only LoRA params stay trainable.

    ``alpha`` defaults to ``rank`` (scale 1). ``init`` is peft's ``init_lora_weights``
    (``True``: B = 0, the adapter starts as the identity; ``False``: random A and B, for tests;
    ``"gaussian"``, ``"pissa"``...). Returns the ``LoraConfig``.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"lora rank must be >= 1, got {rank}")
    if not target_modules:
        raise ConfigError("lora target_modules is empty")
    denoiser = unwrap_model(denoiser)
    if getattr(denoiser, "peft_config", None) and ADAPTER_NAME in denoiser.peft_config:
        raise ValueError("the denoiser already has a LoRA adapter attached")
    names = [n for n, _ in denoiser.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if len(missing) == len(list(target_modules)):
        raise ConfigError(f"none of the LoRA target modules {list(target_modules)} exist in {type(denoiser).__name__}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=list(target_modules), lora_dropout=float(dropout),
                        init_lora_weights=init)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    for n, p in denoiser.named_parameters():
        p.requires_grad_("lora_" in n)
    return config


def check_rank(policy: Any, rank: int, target_modules: list[str] | None = None) -> None:
    """:class:`~fpo_diffusion.config.ConfigError` when ``lora.rank`` exceeds the width of the layers it adapts
    (a rank-r update of an n x m layer has rank at most min(n, m): the extra rank trains nothing but costs)."""
    from .config import ConfigError

    targets = tuple(target_modules or getattr(policy, "lora_targets", None) or ())
    widths = [min(m.in_features, m.out_features) for n, m in unwrap_model(policy.denoiser).named_modules()
              if isinstance(m, nn.Linear) and targets and any(n == t or n.endswith("." + t) for t in targets)]
    if widths and rank > min(widths):
        raise ConfigError(f"lora.rank={rank} is above the width of the layers it adapts ({min(widths)}: a LoRA of an "
                          f"n x m layer has rank at most min(n, m)); use lora.rank <= {min(widths)}")


def prepare_for_training(policy: Any, *, gradient_checkpointing: bool = False, **lora_kwargs: Any) -> list[nn.Parameter]:
    """Attach LoRA (``policy.add_lora(**lora_kwargs)``), keep its weights in float32 whatever the base
    dtype, optionally turn on gradient checkpointing; returns the trainable parameters."""
    rank = lora_kwargs.get("rank")
    if rank is not None:
        check_rank(policy, int(rank), lora_kwargs.get("target_modules"))
    policy.add_lora(**lora_kwargs)
    params = policy.trainable_parameters()
    for p in params:
        p.data = p.data.float()
    if gradient_checkpointing:
        policy.denoiser.enable_gradient_checkpointing()
    return params


def lora_parameters(denoiser: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``denoiser`` (wrapped or not)."""
    return [p for n, p in unwrap_model(denoiser).named_parameters() if "lora_" in n]


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft format (keys without the adapter name), detached."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unwrap_model(denoiser), adapter_name=ADAPTER_NAME)
    return {k: v.detach().clone() for k, v in sd.items()}


def adapter_metadata(peft_config: Any) -> dict:
    """The adapter's config as the exported file's metadata, sets (``target_modules``) as sorted lists,
    so that the file's bytes do not depend on ``PYTHONHASHSEED``."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in peft_config.to_dict().items()}


def export_lora(policy: Any, out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` in the diffusers LoRA format.

    ``state_dict`` (peft format, e.g. gathered by the trainer) defaults to the policy's own
    adapter. Uses the pipeline class's ``save_lora_weights`` so that a stock pipeline of the
    family loads it with ``pipe.load_lora_weights(out_dir)``. Returns the file path.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    den = unwrap_model(policy.denoiser)
    if not getattr(den, "peft_config", None):
        raise ValueError("the policy has no LoRA adapter to export (call add_lora first)")
    sd = lora_state_dict(den) if state_dict is None else dict(state_dict)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    metadata = adapter_metadata(den.peft_config[ADAPTER_NAME])
    os.makedirs(out_dir, exist_ok=True)
    pipe_cls = type(policy.pipeline)
    if policy.denoiser_attr == "unet":
        pipe_cls.save_lora_weights(os.fspath(out_dir), unet_lora_layers=convert_state_dict_to_diffusers(sd),
                                   unet_lora_adapter_metadata=metadata, safe_serialization=True)
    else:
        pipe_cls.save_lora_weights(os.fspath(out_dir), transformer_lora_layers=sd,
                                   transformer_lora_adapter_metadata=metadata, safe_serialization=True)
    return os.path.join(os.fspath(out_dir), "pytorch_lora_weights.safetensors")


KOHYA_BASE_MODELS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}
"""Families with a kohya-ss LoRA layout (the UNet ones), and the ``ss_base_model_version`` they write."""


def export_lora_kohya(policy: Any, out_file: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write the adapter to ``out_file`` (one ``.safetensors``) in the kohya-ss layout.

    Keys ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (the
    conversion is diffusers' ``convert_state_dict_to_kohya``; ``alpha`` is the adapter's ``lora_alpha``, so
    the scale ``alpha / rank`` survives), plus the ``ss_network_*`` metadata kohya's tools write. A stock
    pipeline loads it back with ``pipe.load_lora_weights(out_file)``. UNet families only (``sd``, ``sdxl``).
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    family = getattr(policy, "family", "?")
    if family not in KOHYA_BASE_MODELS:
        raise ValueError(f"the kohya LoRA layout is for the UNet families ({', '.join(KOHYA_BASE_MODELS)}); "
                         f"export a {family} LoRA in the diffusers format (the default)")
    den = unwrap_model(policy.denoiser)
    if not getattr(den, "peft_config", None):
        raise ValueError("the policy has no LoRA adapter to export (call add_lora first)")
    cfg = den.peft_config[ADAPTER_NAME]
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise ValueError("the kohya layout holds one alpha per module: per-module rank/alpha patterns cannot be exported")
    sd = lora_state_dict(den) if state_dict is None else dict(state_dict)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v.detach().to("cpu").float() for k, v in sd.items()})
    alpha = torch.tensor(float(cfg.lora_alpha))
    kohya = {k: (alpha.clone() if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.r),
                "ss_network_alpha": str(float(cfg.lora_alpha)), "ss_base_model_version": KOHYA_BASE_MODELS[family]}
    os.makedirs(os.path.dirname(os.fspath(out_file)) or ".", exist_ok=True)
    save_file(kohya, os.fspath(out_file), metadata=metadata)
    return os.fspath(out_file)


def merge_lora(policy: Any) -> None:
    """Fuse the adapter into the denoiser's base weights and remove the peft layers (in place).

    Through diffusers' public LoRA API: ``pipeline.fuse_lora(components=[denoiser])`` then
    ``pipeline.unload_lora_weights()``, as a user of a stock pipeline would.
    """
    den = unwrap_model(policy.denoiser)
    if not getattr(den, "peft_config", None):
        raise ValueError("the policy has no LoRA adapter to merge (call add_lora first)")
    pipe = policy.pipeline
    if getattr(pipe, policy.denoiser_attr, None) is not den:
        raise ValueError(f"the pipeline's {policy.denoiser_attr} is not the policy's denoiser; cannot merge through it")
    pipe.fuse_lora(components=[policy.denoiser_attr], lora_scale=1.0, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    policy.lora_config = None
    den.requires_grad_(False)
