"""Schedulers by user-facing name (``sampling.scheduler``).

A policy's ``sample()`` calls the stock diffusers pipeline with ``output_type="latent"``; this
module maps a scheduler name to a diffusers scheduler built from the pipeline's own
scheduler config (``Cls.from_config(base.config, **overrides)``), so the training noise
schedule (betas, shift, prediction type) is kept.

VP names (``euler``, ``euler_ancestral``, ``dpmsolver++``/``dpm``, ``unipc``, ``ddim``,
``ddpm``, ``pndm``, ``heun``, ``lms``) need a VP base scheduler (SD1.x/2.x, SDXL); flow names
(``flow_euler``, ``flow_heun``, ``flow_dpm``/``flow_dpmsolver++``, ``flow_unipc``) need a
flow-matching base scheduler (SD3, FLUX). ``default`` (or ``None``) keeps the pipeline's own.
"""
from __future__ import annotations

from typing import Any

from ..config import ConfigError

# name -> (diffusers class name, overrides, kind)
_VP: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
_FLOW: dict[str, tuple[str, dict[str, Any]]] = {
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow_dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True,
                                                 "prediction_type": "flow_prediction"}),
    "flow_dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True,
                                                         "prediction_type": "flow_prediction"}),
    "flow_unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
SCHEDULERS = tuple(_VP) + tuple(_FLOW)
"""Every scheduler name :func:`make_scheduler` accepts (plus ``default``)."""


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a flow-matching scheduler (SD3/FLUX family)."""
    cfg = scheduler.config
    return type(scheduler).__name__.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas", False)) \
        or cfg.get("prediction_type") == "flow_prediction"


_FAMILY_UNSUPPORTED = {
    # FluxPipeline passes custom ``sigmas`` (and ``mu``), which FlowMatchHeun's set_timesteps lacks.
    "flux": {"flow_heun"},
}


def make_scheduler(name: str | None, base_scheduler: Any, *, family: str | None = None) -> Any:
    """A new scheduler named ``name`` configured from ``base_scheduler.config``.

    Raises :class:`~fpo_diffusion.config.ConfigError` (a ``ValueError``) for an unknown name or one that does not match the family
    (a flow scheduler on a VP model or vice versa, or one the family's pipeline cannot drive,
    e.g. ``flow_heun`` with FLUX when ``family="flux"`` is given).
    """
    import inspect

    import diffusers

    if name is None or name == "default":
        return base_scheduler
    key = name.lower()
    flow_base = is_flow_scheduler(base_scheduler)
    if key in _VP:
        if flow_base:
            raise ConfigError(f"scheduler {name!r} is a VP (diffusion) scheduler but this model is a flow-matching "
                             f"model; use one of: {', '.join(_FLOW)}")
        cls_name, overrides = _VP[key]
    elif key in _FLOW:
        if not flow_base:
            raise ConfigError(f"scheduler {name!r} is a flow-matching scheduler but this model is a VP diffusion "
                             f"model; use one of: {', '.join(_VP)}")
        cls_name, overrides = _FLOW[key]
        overrides = dict(overrides)
        if cls_name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
            cfg = base_scheduler.config
            overrides.setdefault("flow_shift", float(cfg.get("shift", 1.0)))
            if cfg.get("use_dynamic_shifting", False):
                overrides["use_dynamic_shifting"] = True
    else:
        raise ConfigError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
    if family is not None and key in _FAMILY_UNSUPPORTED.get(family, ()):
        ok = [n for n in (_FLOW if flow_base else _VP) if n not in _FAMILY_UNSUPPORTED[family]]
        raise ConfigError(f"scheduler {name!r} is not supported by the {family} pipeline; use one of: {', '.join(ok)}")
    cls = getattr(diffusers, cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in base_scheduler.config.items() if k in accepted}
    return cls.from_config(config, **overrides)


def flow_sigmas(policy, steps: int, height: int, width: int) -> torch.Tensor:
    """The noise levels ``[S+1]`` (float64, last 0) of the policy's flow scheduler for ``steps`` sampler
    steps: ``FlowMatchEulerDiscreteScheduler`` with the model's own config (its shift; FLUX's
    resolution-dependent shift as ``FluxPipeline`` computes it). ``sigmas[j]`` is step ``j``'s time
    ``t`` (the pipeline's ``timesteps / 1000``)."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(policy.base_scheduler.config)
    kw = {}
    if sched.config.get("use_dynamic_shifting", False):  # FLUX: resolution-dependent shift, as FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        _, h, w = policy.latent_shape(height, width)
        c = sched.config
        kw["mu"] = calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256),
                                   c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                   c.get("max_shift", 1.15))
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(steps, device="cpu", **kw)
    sigmas = sched.sigmas.to(torch.float64).cpu()
    if len(sigmas) != steps + 1:
        raise ValueError(f"unexpected flow schedule of {len(sigmas)} sigmas for {steps} steps")
    return sigmas
