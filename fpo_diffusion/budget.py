"""What the run's sizes need, checked before the run starts (issue 17, item 7): how much memory one
iteration holds, and image sizes the model's pipeline accepts.

``train.prompts_per_iteration * train.group_size`` samples are drawn every iteration and kept
until its update ends: their final latents, their text conditions, their ``(t, eps)`` pairs (or
the sampler's trajectory for the step-wise baselines) and their decoded images, plus the prompt
plan on every rank. A size that cannot fit (``train.group_size=1000000000``) is refused with one
line before anything is loaded onto the device or written, instead of failing deep inside torch.
"""
from __future__ import annotations

import os

from .config import Config, ConfigError


def physical_memory() -> int | None:
    """Bytes of RAM of this machine (``None`` where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def iteration_bytes(cfg: Config, latent_numel: int, cond_bytes: int, image_pixels: int, world: int) -> int:
    """Bytes one rank holds for one iteration's samples (a lower estimate: activations not included)."""
    t = cfg.train
    n_global = t.prompts_per_iteration * t.group_size
    n_local = -(-n_global // max(world, 1))
    per_latent = 4 * latent_numel  # float32
    held = 1 + cfg.fpo.n_mc  # x0 and the (t, eps) pairs
    if cfg.algorithm in ("flow_grpo", "ddpo"):
        held = 1 + cfg.sampling.steps  # x0 and the sampler's trajectory
    per_sample = per_latent * held + cond_bytes + 3 * image_pixels
    return 8 * n_global + n_local * per_sample  # the prompt plan (int64, on every rank) + the samples


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_iteration_memory(cfg: Config, latent_numel: int, cond_bytes: int, image_pixels: int, world: int,
                           available: int | None = None) -> int:
    """The estimate of :func:`iteration_bytes`; :class:`ConfigError` when it exceeds ``available``
    (default: this machine's RAM)."""
    need = iteration_bytes(cfg, latent_numel, cond_bytes, image_pixels, world)
    have = physical_memory() if available is None else available
    if have is not None and need > have:
        t = cfg.train
        raise ConfigError(f"train.prompts_per_iteration x train.group_size = {t.prompts_per_iteration} x {t.group_size} "
                          f"samples per iteration need about {_gb(need)} on each of {world} rank(s) (latents, noise "
                          f"pairs, text conditions, images), more than this machine's {_gb(have)}; lower them")
    return need


ROLLOUT_WARN_IMAGES = 10_000
"""Images one rank samples per iteration above which the run says so before loading (:func:`rollout_size_warning`)."""


def rollout_size_warning(cfg: Config, world: int) -> str | None:
    """One line when an iteration samples more than :data:`ROLLOUT_WARN_IMAGES` images per rank, else ``None``.

    The memory estimate counts what the samples hold, not how long drawing them takes: ``train.group_size=100000``
    fits in a few GiB and then samples for hours before the first line of output."""
    t = cfg.train
    n_global = t.prompts_per_iteration * t.group_size
    n_local = -(-n_global // max(world, 1))
    if n_local <= ROLLOUT_WARN_IMAGES:
        return None
    calls = n_local * cfg.sampling.steps
    return (f"warning: an iteration samples train.prompts_per_iteration x train.group_size = {t.prompts_per_iteration} "
            f"x {t.group_size} = {n_global:,} images ({n_local:,} on each of {world} rank(s), {calls:,} denoiser "
            f"steps at sampling.steps={cfg.sampling.steps}): the first rollout alone may take hours before anything "
            f"is logged; group sizes are usually 4-24 (train.group_size) with 8-64 prompts per iteration")


def latent_cell(policy) -> int:
    """Pixels per latent cell side that the policy's pipeline needs image sizes to be multiples of
    (the VAE's downsampling times the transformer's patch; FLUX packs 2 x 2 latents)."""
    pipe = policy.pipeline
    patch = getattr(pipe, "patch_size", None) or getattr(getattr(policy.denoiser, "config", None), "patch_size", None)
    if type(pipe).__name__.startswith("Flux"):
        patch = 2
    return int(policy.vae_scale_factor) * int(patch or 1)


def check_image_size(height: int | None, width: int | None, policy) -> None:
    """:class:`ConfigError` unless ``sampling.height`` / ``sampling.width`` are multiples of :func:`latent_cell`
    (the stock pipeline would refuse them later with a traceback, or round them silently)."""
    cell = latent_cell(policy)
    for name, v in (("height", height), ("width", width)):
        if v is not None and v % cell:
            lo, hi = max(cell, v // cell * cell), (v // cell + 1) * cell
            raise ConfigError(f"sampling.{name}={v} is not a multiple of {cell} (this model's latent cell in pixels); "
                              f"use {lo} or {hi}")


__all__ = ["ROLLOUT_WARN_IMAGES", "check_image_size", "check_iteration_memory", "iteration_bytes", "latent_cell",
           "physical_memory", "rollout_size_warning"]
