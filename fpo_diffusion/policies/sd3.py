"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``), rectified flow.

``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, the transformer gets ``timestep = t * 1000``
(as the pipeline passes the scheduler's ``sigma * 1000``). ``x0`` is the *normalised* latent
the transformer sees (what the pipeline returns with ``output_type="latent"``, before
``x / scaling_factor + shift_factor``). T5 is optional: without ``text_encoder_3`` the
pipeline pads with zeros of ``max_sequence_length`` tokens.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Cond
from .common import PipelinePolicy

SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""Default LoRA targets: the joint attention's projections of the image stream and the text stream."""


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
        if self.max_sequence_length > 1 and has_null_t5(pipeline):
            # a model trained without T5 (the shapes world and any copy of it): its T5 context is
            # ``max_sequence_length`` identical zero tokens; one biased token is exactly equivalent and far cheaper
            fast_zero_tokens(pipeline, self.max_sequence_length)
            self.max_sequence_length = 1

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

    def complete_for_saving(self) -> None:
        """A T5-less pipeline (the embedded shapes model) gets the null T5 (:func:`complete_t5_less`)."""
        complete_t5_less(self.pipeline)


class ZeroTokenBias:
    """Joint-attention processor for SD3 without T5: one all-zero "T5" token stands for ``n``.

    With no T5 the pipeline appends ``max_sequence_length`` identical all-zero tokens to the
    context. Identical tokens keep identical states through every block, so ``n`` copies act
    exactly like one copy whose attention logit is raised by ``log(n)`` (``log_n``): the same
    outputs for a fraction of the cost (checked numerically in the tests).
    """

    def __init__(self):
        self.log_n = 0.0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b = hidden_states.shape[0]
        n_img = hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        mask = q.new_zeros(1, 1, 1, k.shape[2])
        mask[..., -1] = self.log_n
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h.transpose(1, 2).reshape(b, -1, h.shape[1] * h.shape[-1])
        h, c = h[:, :n_img], h[:, n_img:]
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        h = attn.to_out[1](attn.to_out[0](h))
        return h, c


def has_null_t5(pipe) -> bool:
    """True when the pipeline's T5 is a :func:`null_t5` (its final norm is zero, so its output is exactly zero for
    every prompt) and every attention of the transformer is joint (no SD3.5 dual-attention layers), so
    :func:`fast_zero_tokens` applies exactly. A pipeline without a T5 keeps the stock path."""
    norm = getattr(getattr(getattr(pipe, "text_encoder_3", None), "encoder", None), "final_layer_norm", None)
    if norm is None or bool(norm.weight.detach().any()):
        return False
    return not tuple(getattr(pipe.transformer.config, "dual_attention_layers", ()) or ())


def fast_zero_tokens(pipe, max_sequence_length: int = 256) -> dict:
    """Make a T5-less SD3 pipeline cheap to sample, with identical results.

    The pipeline appends ``max_sequence_length`` identical all-zero tokens; one token whose
    attention logit is raised by ``log(n)`` is exactly equivalent. Installs :class:`ZeroTokenBias`
    on ``pipe.transformer``; call the pipeline (or build the policy) with ``max_sequence_length=1``
    afterwards. Returns the kwargs to pass.
    """
    proc = ZeroTokenBias()
    proc.log_n = math.log(max_sequence_length)
    pipe.transformer.set_attn_processor(proc)
    return {"max_sequence_length": 1}


def null_t5(dim: int):
    """``(T5EncoderModel, T5TokenizerFast)`` whose every output is exactly zero.

    For an SD3 model used without T5, where the pipeline fills the T5 part of the context with zeros
    (``dim`` = the transformer's ``joint_attention_dim``): a one-layer T5 with a zero final norm gives
    exactly those zeros, and makes a saved folder a complete SD3 pipeline that
    ``StableDiffusion3Pipeline.from_pretrained(path)`` and ``DiffusionPipeline.from_pretrained(path)``
    load with no extra arguments (diffusers refuses a folder whose ``text_encoder_3`` is null). The tokenizer
    knows three tokens (``<pad>``, ``</s>``, ``<unk>``) and reads every prompt as empty (just
    ``</s>``), so no prompt is ever "truncated".
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tk = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)], unk_id=2))
    tk.normalizer = normalizers.Replace(Regex(r"[\s\S]+"), "")
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    enc = T5EncoderModel(T5Config(vocab_size=3, d_model=dim, d_kv=8, d_ff=8, num_layers=1, num_heads=1))
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()
    return enc.eval(), tok


def complete_t5_less(pipe) -> None:
    """Give a T5-less SD3 pipeline the :func:`null_t5` before ``save_pretrained``, so the folder loads with the
    stock call; the pipeline samples exactly as before (zeros are what it fed without T5)."""
    if getattr(pipe, "text_encoder_3", None) is None and hasattr(pipe, "transformer"):
        enc, tok = null_t5(int(pipe.transformer.config.joint_attention_dim))
        pipe.register_modules(text_encoder_3=enc.to(pipe.transformer.device), tokenizer_3=tok)
