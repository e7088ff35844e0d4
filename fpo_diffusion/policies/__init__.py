"""Model-family adapters behind one contract (:class:`~fpo_diffusion.policies.base.Policy`).

``load_policy(family, path)`` loads a stock diffusers pipeline folder (or hub id) into the
family's policy; ``family="auto"`` reads ``_class_name`` from ``model_index.json``.
"""
from __future__ import annotations

import torch

from ..config import FAMILIES, ConfigError
from .base import Cond, Policy, cond_cat, cond_index, cond_repeat, cond_to
from .common import PipelinePolicy, check_prompts, read_pipeline_class_name, resolve_path, unwrap_model
from .flux import FluxPolicy
from .sd import SDPolicy
from .sd3 import SD3Policy
from .sdxl import SDXLPolicy

POLICIES: dict[str, type[PipelinePolicy]] = {cls.family: cls for cls in (SDPolicy, SDXLPolicy, SD3Policy, FluxPolicy)}
"""Family name (each class's ``family``) -> policy class: the registry of model families."""

if (*POLICIES, "auto") != FAMILIES:  # the config sits below this registry and cannot import it
    raise ImportError(f"the model-family registry ({', '.join(POLICIES)}) and config.FAMILIES ({', '.join(FAMILIES)}) "
                      f"differ: a new family is added to both, in the same order, before auto")

PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
"""Stock pipeline class name (``model_index.json`` ``_class_name``) -> family."""


def family_of_pipeline(path: str) -> str:
    """The family of the pipeline at ``path`` (from ``model_index.json``)."""
    name = read_pipeline_class_name(path)
    if name not in PIPELINE_FAMILIES:
        raise ConfigError(f"cannot infer the model family of {path!r}: pipeline class {name!r} is not one of "
                         f"{', '.join(PIPELINE_FAMILIES)}; pass the family explicitly")
    return PIPELINE_FAMILIES[name]


def load_policy(family: str, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                **kw) -> Policy:
    """Load the stock pipeline at ``path`` (folder or hub id) as the ``family`` policy.

    ``family`` is one of ``sd``, ``sdxl``, ``sd3``, ``flux`` or ``auto``. Extra keywords go to
    the policy (``height``, ``width``, ``max_sequence_length``, ``guidance``) or to the
    pipeline's ``from_pretrained``.
    """
    if family != "auto" and family not in POLICIES:
        raise ConfigError(f"unknown model family {family!r}; available: {', '.join([*POLICIES, 'auto'])}")
    path = resolve_path(path)
    if family == "auto":
        family = family_of_pipeline(path)
    return POLICIES[family].from_pretrained(path, dtype=dtype, device=device, **kw)


__all__ = ["Cond", "Policy", "POLICIES", "PIPELINE_FAMILIES", "load_policy", "family_of_pipeline", "SDPolicy",
           "SDXLPolicy", "SD3Policy", "FluxPolicy", "PipelinePolicy", "cond_cat", "cond_index", "cond_repeat",
           "cond_to", "check_prompts", "unwrap_model"]
