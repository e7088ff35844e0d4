"""FLUX.1 (``FluxTransformer2DModel``), rectified flow with packed latents.

**x0 is kept unpacked**: ``[B, C, H/8, W/8]`` normalised latents (the pipeline's packed
``output_type="latent"`` result is unpacked in :meth:`FluxPolicy.sample`). :meth:`cfm_loss`
packs ``x_t`` into 2x2 patches for the transformer and unpacks the prediction; packing is a
permutation, so the per-dimension mean loss is the same in either layout.

``x_t = (1 - t) x0 + t eps``, target ``eps - x0``; the transformer gets ``timestep = t`` (it
scales by 1000 inside), ``txt_ids`` zeros and ``img_ids`` from the latent grid, as the pipeline.

Guidance: ``guidance`` (policy attribute, default 3.5, FluxPipeline's ``guidance_scale``; in a
training config ``sampling.distilled_guidance``) is the *embedded* (distilled) guidance of
FLUX.1-dev-style models; it is used for both sampling and the CFM loss, so the two agree.
``sample(guidance_scale=...)`` > 1 turns on true classifier-free guidance (the pipeline's
``true_cfg_scale``) with the empty prompt (or ``negative_cond``) as the negative.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Cond
from .common import PipelinePolicy
from .sd3 import SD3_LORA_TARGETS, FlowPolicyMixin

FLUX_LORA_TARGETS = SD3_LORA_TARGETS
"""The same joint-attention projections as SD3 (image and text streams)."""


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]`` (FluxPipeline's packing)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``h x w``."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


class FluxPolicy(FlowPolicyMixin, PipelinePolicy):
    """FLUX.1 behind the :class:`~fpo_diffusion.policies.base.Policy` contract.

    ``cond = {"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}``; ``x0`` unpacked.
    """

    family = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_attr = "transformer"
    default_lora_targets = FLUX_LORA_TARGETS
    policy_kwargs = ("height", "width", "max_sequence_length", "guidance")

    def __init__(self, pipeline: Any, *, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 512, guidance: float = 3.5):
        super().__init__(pipeline, height=height, width=width)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance = float(guidance)

    def _default_size(self) -> tuple[int, int]:
        s = int(self.pipeline.default_sample_size) * self.vae_scale_factor
        return s, s

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.height, width or self.width
        c = int(self.denoiser.config.in_channels) // 4
        # FluxPipeline rounds the latent grid to a multiple of 2 (packing).
        return (c, 2 * (h // (self.vae_scale_factor * 2)), 2 * (w // (self.vae_scale_factor * 2)))

    def _encode(self, prompts: list[str]) -> Cond:
        pe, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.device, num_images_per_prompt=1,
                                                    max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def _pipe_kwargs(self, cond, negative_cond, guidance_scale):
        kw = {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
              "guidance_scale": self.guidance, "max_sequence_length": self.max_sequence_length}
        if guidance_scale > 1:
            neg = negative_cond if negative_cond is not None else self.negative_cond(cond["prompt_embeds"].shape[0])
            kw["negative_prompt_embeds"] = neg["prompt_embeds"].to(self.device, self.dtype)
            kw["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"].to(self.device, self.dtype)
            kw["true_cfg_scale"] = guidance_scale
        return kw

    def _from_pipe_latents(self, latents, height, width):
        _, h, w = self.latent_shape(height, width)
        return unpack_latents(latents, h, w)

    def _forward(self, model: nn.Module, x_t, model_time, cond):
        b, _, h, w = x_t.shape
        img_ids = self.pipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, self.dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x_t.device, dtype=self.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = model(hidden_states=pack_latents(x_t), timestep=model_time.to(self.dtype), guidance=guidance,
                    pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def set_distilled_guidance(self, scale: float) -> None:
        self.guidance = float(scale)
