"""The shapes world's text-to-image model: its components' builders (a tiny ``AutoencoderKL``, two tiny CLIP text
encoders with projection, a tiny ``SD3Transformer2DModel``, the flow scheduler), the differentiable prompt encoding
the pipeline performs, and the stock ``StableDiffusion3Pipeline`` folder it is exported to and loaded from
(``DEFAULT_ASSET``, the shipped model). Training it is ``pretrain.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .plugin import DEFAULT_ASSET
from .world import CANVAS, CELL, GRID

LATENT_CHANNELS = 8
"""Channels of the VAE latent: one latent cell per grid cell."""


def build_vae():
    from diffusers import AutoencoderKL

    n_down = int(math.log2(CELL))
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (n_down + 1),
        up_block_types=("UpDecoderBlock2D",) * (n_down + 1),
        block_out_channels=(16, 32, 48, 64, 64)[: n_down + 1],
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        sample_size=CANVAS, scaling_factor=1.0, shift_factor=0.0,
    )


TOKEN_LEN = 32
"""CLIP context length of the shipped tokenizers (the longest caption has 24 tokens)."""
TEXT_DIM = 32


def build_tokenizer():
    from fpo_diffusion.tokenizers import clip_tokenizer

    return clip_tokenizer(model_max_length=TOKEN_LEN)


def build_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=TOKEN_LEN, projection_dim=TEXT_DIM,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg)


def build_transformer(seed: int, num_layers: int = 4, heads: int = 4, head_dim: int = 32):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=GRID, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=GRID,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def encode_text(tokenizer, te1, te2, prompts: list[str], n_zero: int = 256):
    """``(prompt_embeds, pooled)`` exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them
    with no T5 (``n_zero`` = its ``max_sequence_length``), but differentiable."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    embs, pooled = [], []
    for te in (te1, te2):
        out = te(ids, output_hidden_states=True)
        pooled.append(out[0])
        embs.append(out.hidden_states[-2])
    clip = torch.cat(embs, dim=-1)
    zeros = clip.new_zeros(clip.shape[0], n_zero, clip.shape[-1])
    return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)

def load_vae(out_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out_dir / "vae").eval()

def null_t5(dim: int = 2 * TEXT_DIM):
    """The SD3 policy's :func:`~fpo_diffusion.policies.sd3.null_t5` at this model's context width."""
    from fpo_diffusion.policies.sd3 import null_t5 as _null_t5

    return _null_t5(dim)


def export_pipeline(te1, te2, tr, out_dir: Path) -> None:
    """Write the stock ``StableDiffusion3Pipeline`` folder (VAE already in ``out_dir/vae``)."""
    from diffusers import StableDiffusion3Pipeline

    vae = load_vae(out_dir)
    tok = build_tokenizer()
    t5, t5_tok = null_t5()
    pipe = StableDiffusion3Pipeline(transformer=tr.eval(), scheduler=build_scheduler(), vae=vae,
                                    text_encoder=te1.eval(), tokenizer=tok, text_encoder_2=te2.eval(),
                                    tokenizer_2=copy_tok(tok), text_encoder_3=t5, tokenizer_3=t5_tok)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.to(torch.float16)  # half the bytes on disk; every component loads back as float32
    pipe.save_pretrained(out_dir)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        cfg_path = out_dir / name / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = "float32"  # transformers' dtype="auto" follows the config, diffusers defaults to float32
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_pipeline(path: str | Path = DEFAULT_ASSET, **kwargs):
    """``StableDiffusion3Pipeline.from_pretrained(path, **kwargs)``: the stock call (the folder is complete)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(path), **kwargs)


def copy_tok(tok):
    import copy

    return copy.deepcopy(tok)
