"""Resolving ``model.path``: the embedded models and ordinary pipeline folders / hub ids."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("FPO_DIFFUSION_CACHE", Path.home() / ".cache" / "fpo_diffusion"))


def tiny_model_path(family: str, seed: int = 0) -> Path:
    """A tiny random pipeline of ``family`` saved once under the cache (built in-process, no download)."""
    from .tiny import build_tiny_pipeline

    path = cache_dir() / f"tiny-{family}-seed{seed}"
    if not (path / "model_index.json").exists():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            # transformers saves a model's weights on rank 0 only: this rank would publish a broken copy
            raise ConfigError(f"the tiny {family} model is not built yet in {path.parent}, and rank "
                              f"{dist.get_rank()} of a process group cannot build it: build it before the process "
                              f"group starts (the trainer does)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=path.parent))
        build_tiny_pipeline(family, seed=seed).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(family: str, path: str) -> tuple[str, str]:
    """``(family, path)`` with the ``embedded:`` names (tiny models, plug-ins) replaced by real folders."""
    from . import plugins

    if path.startswith("embedded:tiny-"):
        fam = path[len("embedded:tiny-"):]
        return fam, str(tiny_model_path(fam))
    if path.startswith("embedded:"):
        fn = plugins.lookup(plugins.MODELS, path[len("embedded:"):])
        if fn is None:
            known = ", ".join([f"embedded:{n}" for n in plugins.names(plugins.MODELS)] + ["embedded:tiny-<family>"])
            raise ConfigError(f"unknown embedded model {path!r}; available: {known}")
        spec = fn()
        return spec["family"], spec["path"]
    return family, path


def check_model(family: str, path: str) -> str:
    """The family of ``model.path`` after cheap checks made before anything loads (``model_index.json`` only):
    :class:`ConfigError` when ``model.family`` contradicts the model (``sd`` for an SD3 folder or for
    ``embedded:shapes``), and one line for a hub id that is not in the local cache while offline."""
    from .policies import PIPELINE_FAMILIES
    from .policies.common import read_pipeline_class_name, resolve_path

    real, where = resolve_model(family, path)
    if path.startswith("embedded:"):
        if family not in ("auto", real):
            raise ConfigError(f"model.family={family} contradicts model.path={path}, a {real} model; set "
                              f"model.family={real} (or auto)")
        return real
    local = resolve_path(where)
    if not os.path.isdir(local):  # a hub id: offline, only a cached one can load
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(local, "model_index.json")
        if not isinstance(cached, str) and (constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") not in
                                            (None, "", "0", "false", "False")):
            raise ConfigError(f"model.path={path} is a hub id that is not in the local Hugging Face cache, and the hub "
                              f"is offline (HF_HUB_OFFLINE): download it first (huggingface-cli download {path}) or "
                              f"give a local pipeline folder")
        if not isinstance(cached, str):
            return family
        import json

        with open(cached) as f:
            name = json.load(f).get("_class_name")
    else:
        name = read_pipeline_class_name(local)
    found = PIPELINE_FAMILIES.get(name)
    if family != "auto" and found is not None and found != family:
        raise ConfigError(f"model.family={family} contradicts model.path={path}, a {name} ({found}); set "
                          f"model.family={found} (or auto)")
    return found or family


def load_model(family: str, path: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
               distilled_guidance: float | None = None):
    """The policy for a model config (embedded names resolved); ``distilled_guidance`` sets a FLUX
    policy's embedded guidance (``sampling.distilled_guidance``; ``None``: the policy's default)."""
    from .policies import load_policy

    check_model(family, path)
    family, path = resolve_model(family, path)
    policy = load_policy(family, path, dtype=torch_dtype(dtype), device=device)
    if distilled_guidance is not None:
        policy.set_distilled_guidance(distilled_guidance)
    return policy
