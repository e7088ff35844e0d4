"""Stable Diffusion 1.x/2.x (``UNet2DConditionModel``), epsilon- and v-prediction.

VP schedule from the scheduler config: ``t in (0, 1)`` maps to the discrete training
timestep ``k = round(t * (T - 1))`` and ``x_t = sqrt(acp_k) x0 + sqrt(1 - acp_k) eps``;
the target is ``eps`` or ``v = sqrt(acp_k) eps - sqrt(1 - acp_k) x0``. ``x0`` is the scaled
latent the UNet sees (what the pipeline returns with ``output_type="latent"``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Cond
from .common import PipelinePolicy

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def alphas_cumprod_from_config(config: Any) -> torch.Tensor:
    """``alphas_cumprod`` (float64) of a VP scheduler config, as diffusers computes it."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config({k: v for k, v in dict(config).items()
                                       if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                "trained_betas", "rescale_betas_zero_snr")})
    return sched.alphas_cumprod.to(torch.float64)


class VPPolicyMixin:
    """VP noising shared by SD and SDXL."""

    pipeline: Any

    def _init_vp(self) -> None:
        cfg = self.pipeline.scheduler.config
        self.prediction_type = str(cfg.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (need epsilon or v_prediction)")
        self.alphas_cumprod = alphas_cumprod_from_config(cfg)
        self.num_train_timesteps = int(self.alphas_cumprod.numel())

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        """Discrete training timestep for ``t in (0, 1)`` (``t -> 1`` is noise)."""
        k = torch.round(t.double() * (self.num_train_timesteps - 1)).long()
        return k.clamp(0, self.num_train_timesteps - 1)

    def _noise(self, x0, t, eps):
        k = self.timestep_index(t)
        acp = self.alphas_cumprod.to(x0.device)[k]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        alpha = acp.sqrt().to(x0.dtype).reshape(shape)
        sigma = (1 - acp).sqrt().to(x0.dtype).reshape(shape)
        x_t = alpha * x0 + sigma * eps
        target = eps if self.prediction_type == "epsilon" else alpha * eps - sigma * x0
        return x_t, target, k


class SDPolicy(VPPolicyMixin, PipelinePolicy):
    """SD1.x/2.x behind the :class:`~fpo_diffusion.policies.base.Policy` contract.

    ``cond = {"prompt_embeds": [B, L, D]}``; ``x0 = [B, 4, H/8, W/8]`` scaled latents.
    """

    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_attr = "unet"
    default_lora_targets = UNET_LORA_TARGETS

    def __init__(self, pipeline: Any, *, height: int | None = None, width: int | None = None):
        super().__init__(pipeline, height=height, width=width)
        self._init_vp()

    @classmethod
    def _from_pretrained_kwargs(cls) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def _encode(self, prompts: list[str]) -> Cond:
        pe, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": pe}

    def _pipe_kwargs(self, cond, negative_cond, guidance_scale):
        kw = {"prompt_embeds": cond["prompt_embeds"], "guidance_scale": guidance_scale}
        if negative_cond is not None and guidance_scale > 1:
            kw["negative_prompt_embeds"] = negative_cond["prompt_embeds"]
        return kw

    def _unnormalise(self, x0):
        cfg = self.pipeline.vae.config
        mean, std = cfg.get("latents_mean", None), cfg.get("latents_std", None)
        if mean is not None and std is not None:
            m = torch.tensor(mean, device=x0.device).view(1, -1, 1, 1)
            s = torch.tensor(std, device=x0.device).view(1, -1, 1, 1)
            return x0 * s / cfg.scaling_factor + m
        return x0 / cfg.scaling_factor

    def _forward(self, model: nn.Module, x_t, model_time, cond):
        return model(x_t, model_time, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
