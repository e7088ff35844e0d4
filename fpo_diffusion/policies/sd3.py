"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``), rectified flow.

``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, the transformer gets ``timestep = t * 1000``
(as the pipeline passes the scheduler's ``sigma * 1000``). ``x0`` is the *normalised* latent
the transformer sees (what the pipeline returns with ``output_type="latent"``, before
``x / scaling_factor + shift_factor``). T5 is optional: without ``text_encoder_3`` the
pipeline pads with zeros of ``max_sequence_length`` tokens.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Cond
from .common import PipelinePolicy

SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowPolicyMixin:
    """Rectified-flow noising shared by SD3 and FLUX."""

    prediction_type = "flow"

    def _noise(self, x0, t, eps):
        tt = t.reshape((-1,) + (1,) * (x0.dim() - 1))
        return (1 - tt) * x0 + tt * eps, eps - x0, t


class SD3Policy(FlowPolicyMixin, PipelinePolicy):
    """SD3/3.5 behind the :class:`~fpo_diffusion.policies.base.Policy` contract.

    ``cond = {"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}``.
    """

    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    default_lora_targets = SD3_LORA_TARGETS
    policy_kwargs = ("height", "width", "max_sequence_length")

    def __init__(self, pipeline: Any, *, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256):
        super().__init__(pipeline, height=height, width=width)
        self.max_sequence_length = int(max_sequence_length)

    def _encode(self, prompts: list[str]) -> Cond:
        pe, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def _pipe_kwargs(self, cond, negative_cond, guidance_scale):
        kw = {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
              "guidance_scale": guidance_scale, "max_sequence_length": self.max_sequence_length}
        if guidance_scale > 1:
            neg = negative_cond if negative_cond is not None else self.negative_cond(cond["prompt_embeds"].shape[0])
            kw["negative_prompt_embeds"] = neg["prompt_embeds"].to(self.device, self.dtype)
            kw["negative_pooled_prompt_embeds"] = neg["pooled_prompt_embeds"].to(self.device, self.dtype)
        return kw

    def _forward(self, model: nn.Module, x_t, model_time, cond):
        # float32 (float64 for float64 models) timesteps, as the pipeline passes sigma * 1000
        return model(hidden_states=x_t, timestep=model_time * 1000,
                     encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_prompt_embeds"],
                     return_dict=False)[0]
