"""Shared machinery of the pipeline-backed policies (loading, sampling, CFM loss, LoRA).

Subclasses fill in the family specifics: the pipeline class, the denoiser attribute name,
how prompts become a ``Cond``, how ``(x0, t, eps)`` become ``(x_t, target, model time)``, and
the denoiser call. Everything here is batched: one forward over ``B * N`` rows.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import PathNotFoundError
from .base import Cond, Policy, cond_repeat, cond_to, runnable_module, unwrap_model

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_path(path: str | os.PathLike) -> str:
    """``path`` if it exists locally or looks like a hub id ``org/name``; else ``FileNotFoundError``."""
    p = os.fspath(path)
    if os.path.exists(os.path.expanduser(p)):
        return os.path.expanduser(p)
    if _HUB_ID.match(p) and not p.startswith((".", "~")):
        return p
    raise PathNotFoundError(f"model path not found: {p!r} (not a local folder, and not a hub id 'org/name')")


def read_pipeline_class_name(path: str) -> str:
    """``_class_name`` from ``model_index.json`` of a local folder or hub id."""
    p = resolve_path(path)
    index = os.path.join(p, "model_index.json")
    if os.path.isdir(p):
        if not os.path.isfile(index):
            raise PathNotFoundError(f"no model_index.json in {p!r}: not a diffusers pipeline folder")
        with open(index) as f:
            return json.load(f)["_class_name"]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(p)["_class_name"]


def check_prompts(prompts: list[str]) -> list[str]:
    """Validate a prompt list: non-empty list of strings."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if len(prompts) == 0:
        raise ValueError("prompt list is empty: pass at least one prompt")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[0]}")
    return prompts


_OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor", "safety_checker")


def _dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` since diffusers 0.42 deprecated
    ``torch_dtype`` (huggingface/diffusers#14205); older releases know only ``torch_dtype``."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _absent_optional_components(path: str) -> dict[str, None]:
    """``{name: None}`` for optional components a local pipeline folder does not have.

    ``save_pretrained`` omits ``None`` components (e.g. SD3 without T5) from
    ``model_index.json``, and ``from_pretrained`` then refuses to load unless they are passed.
    """
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        entries = json.load(f)
    return {n: None for n in _OPTIONAL_COMPONENTS
            if n not in entries or entries[n] is None or list(entries[n]) == [None, None]}


class PipelinePolicy(Policy):
    """A :class:`Policy` backed by a stock diffusers pipeline (family-agnostic parts)."""

    pipeline_class: str = ""
    """Name of the stock diffusers pipeline class."""
    denoiser_attr: str = "unet"
    """Attribute of the pipeline that holds the denoiser (``unet`` / ``transformer``)."""
    policy_kwargs: tuple[str, ...] = ("height", "width")
    """Keyword arguments of ``__init__`` that :meth:`from_pretrained` routes to the policy."""

    def __init__(self, pipeline: Any, *, height: int | None = None, width: int | None = None):
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self.base_scheduler = pipeline.scheduler
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            m = getattr(pipeline, name, None)
            if isinstance(m, nn.Module):
                m.requires_grad_(False).eval()
        self.denoiser.eval()
        self.vae_scale_factor = int(pipeline.vae_scale_factor)
        h, w = self._default_size()
        self.height = int(height or h)
        self.width = int(width or w)
        self.lora_config = None
        self._negative_cache: Cond | None = None

    # --- loading ---------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:  # type: ignore[override]
        """The pipeline's own (unwrapped) UNet/transformer."""
        return getattr(self.pipeline, self.denoiser_attr)

    @denoiser.setter
    def denoiser(self, module: nn.Module) -> None:
        if unwrap_model(module) is not module:
            raise ValueError("policy.denoiser must stay the unwrapped module; pass the DDP/compiled wrapper as "
                             "`model=` to cfm_loss/sample instead")
        setattr(self.pipeline, self.denoiser_attr, module)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def _default_size(self) -> tuple[int, int]:
        s = int(self.denoiser.config.sample_size) * self.vae_scale_factor
        return s, s

    @classmethod
    def _from_pretrained_kwargs(cls) -> dict[str, Any]:
        return {}

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> "PipelinePolicy":
        """Load the stock pipeline from a local folder or hub id and wrap it.

        Keyword arguments named in ``policy_kwargs`` configure the policy; the rest go to the
        pipeline's ``from_pretrained`` (e.g. ``variant``, ``revision``).
        """
        import diffusers

        path = resolve_path(path)
        pkw = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.policy_kwargs}
        pipe_cls = getattr(diffusers, cls.pipeline_class)
        accepted = set(inspect.signature(pipe_cls.__init__).parameters)
        absent = {k: v for k, v in _absent_optional_components(path).items() if k in accepted}
        extra = {**cls._from_pretrained_kwargs(), **absent, **kwargs}
        pipe = pipe_cls.from_pretrained(path, **{_dtype_keyword(): dtype}, **extra)
        pipe.to(device)
        return cls(pipe, **pkw)

    # --- conditions ------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Cond:
        prompts = check_prompts(prompts)
        with torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def negative_cond(self, batch: int) -> Cond:
        """The empty-prompt condition repeated ``batch`` times (cached)."""
        if self._negative_cache is None:
            self._negative_cache = self.encode_prompts([""])
        return cond_repeat(self._negative_cache, batch)

    # --- sampling --------------------------------------------------------------------------
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.height, width or self.width
        c = int(self.pipeline.vae.config.latent_channels)
        return (c, h // self.vae_scale_factor, w // self.vae_scale_factor)

    @contextlib.contextmanager
    def _sampling_setup(self, model: nn.Module | None, scheduler: str | None) -> Iterator[None]:
        from .schedulers import make_scheduler

        pipe = self.pipeline
        old_den, old_sched = getattr(pipe, self.denoiser_attr), pipe.scheduler
        den = runnable_module(model) if model is not None else old_den
        was_training = den.training
        try:
            if den is not old_den:
                setattr(pipe, self.denoiser_attr, den)
            pipe.scheduler = make_scheduler(scheduler, self.base_scheduler, family=self.family)
            den.eval()
            yield
        finally:
            den.train(was_training)
            setattr(pipe, self.denoiser_attr, old_den)
            pipe.scheduler = old_sched

    def _pipe_kwargs(self, cond: Cond, negative_cond: Cond | None, guidance_scale: float) -> dict[str, Any]:
        raise NotImplementedError

    def _from_pipe_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def sample(self, cond: Cond, generators: list[torch.Generator], *, steps: int,
               guidance_scale: float, scheduler: str | None = None, height: int | None = None,
               width: int | None = None, negative_cond: Cond | None = None,
               model: nn.Module | None = None) -> torch.Tensor:
        """Final latents ``x0`` (the space of :meth:`cfm_loss`) from the stock pipeline.

        One generator per row; ``guidance_scale <= 1`` turns CFG off. ``model`` may be the
        prepared denoiser: a DDP / compiled wrapper is stripped (sampling needs no grad), an FSDP
        wrapper is called as it is (:func:`~fpo_diffusion.policies.base.runnable_module`).
        """
        batch = next(iter(cond.values())).shape[0]
        if len(generators) != batch:
            raise ValueError(f"need one generator per row: got {len(generators)} for a batch of {batch}")
        h, w = int(height or self.height), int(width or self.width)
        cond = cond_to(cond, self.device, self.dtype)
        if negative_cond is not None:
            negative_cond = cond_to(negative_cond, self.device, self.dtype)
        with self._sampling_setup(model, scheduler), torch.no_grad():
            out = self.pipeline(**self._pipe_kwargs(cond, negative_cond, float(guidance_scale)),
                                num_inference_steps=int(steps), generator=list(generators), height=h, width=w,
                                output_type="latent", return_dict=False)[0]
        return self._from_pipe_latents(out, h, w)

    # --- decoding --------------------------------------------------------------------------
    def _unnormalise(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.pipeline.vae.config
        shift = cfg.get("shift_factor", None) or 0.0
        return x0 / cfg.scaling_factor + shift

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        with torch.no_grad():
            z = self._unnormalise(x0.to(self.device, torch.float32)).to(vae.dtype)
            img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # --- the CFM loss ----------------------------------------------------------------------
    def _noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, model_time)`` for flat rows (float32)."""
        raise NotImplementedError

    def _forward(self, model: nn.Module, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def cfm_loss(self, x0: torch.Tensor, cond: Cond, t: torch.Tensor, eps: torch.Tensor, *,
                 model: nn.Module | None = None, return_pred: bool = False, guidance_scale: float = 1.0,
                 negative_cond: Cond | None = None):
        """Per-pair CFM loss ``[B, N]`` (mean over latent dims; float32, float64 for float64 models).

        See :class:`~fpo_diffusion.policies.base.Policy`. One batched forward over ``B * N`` rows; with
        ``guidance_scale > 1`` one more, without grad, for the unconditional branch (``negative_cond``, one row
        or ``B``; default the empty prompt), and the loss is that of the CFG-combined prediction.
        """
        if t.dim() != 2:
            raise ValueError(f"t must be [B, N], got {tuple(t.shape)}")
        b, n = t.shape
        if eps.shape[:2] != (b, n) or eps.shape[2:] != x0.shape[1:] or x0.shape[0] != b:
            raise ValueError(f"shape mismatch: x0 {tuple(x0.shape)}, t {tuple(t.shape)}, eps {tuple(eps.shape)}")
        dev = self.device
        cdt = torch.float64 if self.dtype == torch.float64 else torch.float32  # noising precision
        x0f = x0.to(dev, cdt).repeat_interleave(n, dim=0)
        epsf = eps.to(dev, cdt).reshape(b * n, *eps.shape[2:])
        tf = t.to(dev, cdt).reshape(b * n)
        x_t, target, model_time = self._noise(x0f, tf, epsf)
        c = cond_to(cond_repeat(cond, n), dev, self.dtype)
        net = model if model is not None else self.denoiser
        pred = self._forward(net, x_t.to(self.dtype), model_time, c)
        if guidance_scale > 1:
            pred = self._guided(net, pred, x_t, model_time, b, n, guidance_scale, negative_cond)
        err = (pred.to(cdt) - target) ** 2
        loss = err.reshape(b, n, -1).mean(dim=2)
        if return_pred:
            return loss, pred.reshape(b, n, *pred.shape[1:])
        return loss

    def _guided(self, net, pred, x_t, model_time, b: int, n: int, scale: float, negative_cond: Cond | None):
        """``v_u + scale * (v_c - v_u)``, the prediction the CFG sampler follows, the unconditional branch
        ``v_u`` without grad (Flow-GRPO's official training forward since 2025-07-15)."""
        neg = negative_cond if negative_cond is not None else self.negative_cond(1)
        rows = next(iter(neg.values())).shape[0]
        if rows not in (1, b):
            raise ValueError(f"negative_cond must have 1 or {b} rows, got {rows}")
        neg = cond_repeat(neg, b * n // rows)  # row i of the batch is rows i*n .. i*n+n-1 of x_t
        with torch.no_grad():
            unc = self._forward(net, x_t.to(self.dtype), model_time, cond_to(neg, self.device, self.dtype))
        return unc + scale * (pred - unc)

    def predict(self, x_t: torch.Tensor, model_time: torch.Tensor, cond: Cond, *,
                model: nn.Module | None = None) -> torch.Tensor:
        """The raw denoiser prediction at ``x_t`` (``[n, *L]``) and the family's native model time.

        ``model_time`` (``[n]``) is what :meth:`_noise` returns: the flow time ``sigma`` in
        ``[0, 1]`` for flow families, the discrete training timestep for VP families. ``model``
        may be the DDP-wrapped denoiser (gradients flow through it).
        """
        dev = self.device
        return self._forward(model if model is not None else self.denoiser, x_t.to(dev, self.dtype),
                             model_time.to(dev), cond_to(cond, dev, self.dtype))

    # --- LoRA ------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules: list[str] | None = None,
                 dropout: float = 0.0, init: str | bool = True) -> None:
        from ..lora import add_lora

        self.lora_config = add_lora(self.denoiser, rank=rank, alpha=alpha,
                                    target_modules=list(target_modules or self.default_lora_targets),
                                    dropout=dropout, init=init)

    @property
    def lora_targets(self) -> list[str]:
        """Target module suffixes of the attached adapter (or the family defaults)."""
        if self.lora_config is not None:
            return sorted(self.lora_config.target_modules)
        return list(self.default_lora_targets)

    def export_lora(self, out_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
        from ..lora import export_lora

        return export_lora(self, out_dir, state_dict=state_dict)
