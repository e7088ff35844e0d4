"""SDXL (``UNet2DConditionModel`` with ``text_time`` added conditions, two text encoders).

Same VP noising as :mod:`.sd`. ``cond = {"prompt_embeds": [B, L, 2048], "pooled_prompt_embeds":
[B, 1280]}``; the added time ids ``(orig_h, orig_w, 0, 0, h, w)`` are rebuilt from the latent
size in :meth:`SDXLPolicy.cfm_loss`, exactly as the pipeline builds them when sampling
(``original_size = target_size = (height, width)``, no crop).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Cond
from .sd import SDPolicy


class SDXLPolicy(SDPolicy):
    """SDXL behind the :class:`~fpo_diffusion.policies.base.Policy` contract."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    @classmethod
    def _from_pretrained_kwargs(cls) -> dict[str, Any]:
        return {}

    def _encode(self, prompts: list[str]) -> Cond:
        pe, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def _pipe_kwargs(self, cond, negative_cond, guidance_scale):
        kw = {"prompt_embeds": cond["prompt_embeds"], "pooled_prompt_embeds": cond["pooled_prompt_embeds"],
              "guidance_scale": guidance_scale}
        if negative_cond is not None and guidance_scale > 1:
            kw["negative_prompt_embeds"] = negative_cond["prompt_embeds"]
            kw["negative_pooled_prompt_embeds"] = negative_cond["pooled_prompt_embeds"]
        return kw

    def time_ids(self, batch: int, h_latent: int, w_latent: int) -> torch.Tensor:
        """SDXL micro-conditioning ``[B, 6]`` for an image of the latent's size."""
        h, w = h_latent * self.vae_scale_factor, w_latent * self.vae_scale_factor
        ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=self.dtype)
        return ids.unsqueeze(0).expand(batch, 6)

    def _forward(self, model: nn.Module, x_t, model_time, cond):
        added = {"text_embeds": cond["pooled_prompt_embeds"],
                 "time_ids": self.time_ids(x_t.shape[0], x_t.shape[-2], x_t.shape[-1])}
        return model(x_t, model_time, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                     return_dict=False)[0]
