"""The shipped shapes text-to-image pipeline and the pieces of its pretraining."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fpo_diffusion.shapes import pretrain as P

ASSET = P.DEFAULT_ASSET


def test_zero_token_bias_equals_many_zero_tokens():
    """One all-zero context token with logit bias log(n) == the pipeline's n zero tokens."""
    torch.manual_seed(0)
    tok = P.build_tokenizer()
    te1, te2, tr = P.build_text_encoder(1), P.build_text_encoder(2), P.build_transformer(3, num_layers=2)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(2, P.LATENT_CHANNELS, 3, 3), torch.tensor([300.0, 800.0])
        prompts = ["a photo of a red circle", "a photo of two squares"]
        pe, pooled = P.encode_text(tok, te1, te2, prompts, 64)
        ref = tr(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t, return_dict=False)[0]
        proc = P.ZeroTokenBias()
        proc.log_n = math.log(64)
        tr.set_attn_processor(proc)
        pe1, _ = P.encode_text(tok, te1, te2, prompts, 1)
        out = tr(hidden_states=x, encoder_hidden_states=pe1, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    assert torch.allclose(out, ref, atol=1e-5)


def test_vae_latent_cell_is_grid_cell():
    vae = P.build_vae()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 48, 48)).latent_dist.mean
    assert z.shape == (1, P.LATENT_CHANNELS, 3, 3)




def test_shipped_pipeline_loads_and_samples_deterministically():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSET), text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=4.5, output_type="latent")
    a = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    img = pipe("a photo of a blue square", generator=torch.Generator().manual_seed(0), num_inference_steps=4,
               output_type="pil").images[0]
    assert img.size == (48, 48)


def test_shipped_assets_are_small():
    total = sum(f.stat().st_size for f in ASSET.parent.rglob("*") if f.is_file())
    assert total <= 30 * 2**20


def test_fast_sampling_matches_stock_pipeline():
    from fpo_diffusion.shapes.evaluate import load_pipeline, sample

    pipe = load_pipeline(ASSET)
    g = torch.Generator().manual_seed(3)
    ref = pipe(["a photo of a red circle"], num_inference_steps=3, guidance_scale=4.5, generator=g,
               output_type="pil").images[0]
    fast = sample(pipe, ["a photo of a red circle"], [3], steps=3, guidance_scale=4.5)[0]
    assert np.abs(np.asarray(ref, dtype=int) - np.asarray(fast, dtype=int)).max() <= 1
