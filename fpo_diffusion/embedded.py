"""Resolving ``model.path``: the embedded models and ordinary pipeline folders / hub ids."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ConfigError
from .errors import PathNotFoundError

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES_MODEL = ASSETS / "shapes_sd3"
"""The shipped, pretrained shapes text-to-image model (a stock ``StableDiffusion3Pipeline`` folder)."""

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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=path.parent))
        build_tiny_pipeline(family, seed=seed).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(family: str, path: str) -> tuple[str, str]:
    """``(family, path)`` with the ``embedded:`` names replaced by real folders."""
    if path == "embedded:shapes":
        if not (SHAPES_MODEL / "model_index.json").exists():
            raise PathNotFoundError(f"the embedded shapes model is missing at {SHAPES_MODEL}")
        return "sd3", str(SHAPES_MODEL)
    if path.startswith("embedded:tiny-"):
        fam = path[len("embedded:tiny-"):]
        return fam, str(tiny_model_path(fam))
    if path.startswith("embedded:"):
        raise ConfigError(f"unknown embedded model {path!r}; available: embedded:shapes, embedded:tiny-<family>")
    return family, path


def load_model(family: str, path: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
               distilled_guidance: float | None = None):
    """The policy for a model config (embedded names resolved); ``distilled_guidance`` sets a FLUX
    policy's embedded guidance (``sampling.distilled_guidance``; ``None``: the policy's default)."""
    from .policies import FluxPolicy, load_policy

    embedded_shapes = path == "embedded:shapes"
    family, path = resolve_model(family, path)
    if not embedded_shapes:
        policy = load_policy(family, path, dtype=torch_dtype(dtype), device=device)
        if distilled_guidance is not None and isinstance(policy, FluxPolicy):
            policy.guidance = float(distilled_guidance)
        return policy
    # The shapes model has no T5: the stock pipeline pads its context with 256 identical zero
    # tokens. One zero token with its attention logit raised by log(256) is exactly equivalent
    # (identical tokens keep identical states) and makes every forward several times cheaper.
    from .policies.sd3 import fast_zero_tokens

    policy = load_policy(family, path, dtype=torch_dtype(dtype), device=device, max_sequence_length=1)
    fast_zero_tokens(policy.pipeline, max_sequence_length=256)
    return policy
