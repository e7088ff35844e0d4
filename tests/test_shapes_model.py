"""The shipped shapes text-to-image pipeline and the pieces of its pretraining."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fpo_diffusion.policies.sd3 import ZeroTokenBias
from fpo_diffusion.shapes import model as M
from fpo_diffusion.shapes import pretrain as P
from fpo_diffusion.shapes.plugin import DEFAULT_ASSET
from fpo_diffusion.shapes.world import CANVAS, GRID

ASSET = DEFAULT_ASSET


def test_zero_token_bias_equals_many_zero_tokens():
    """One all-zero context token with logit bias log(n) == the pipeline's n zero tokens."""
    torch.manual_seed(0)
    tok = M.build_tokenizer()
    te1, te2, tr = M.build_text_encoder(1), M.build_text_encoder(2), M.build_transformer(3, num_layers=2)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(2, M.LATENT_CHANNELS, GRID, GRID), torch.tensor([300.0, 800.0])
        prompts = ["a photo of a red circle", "a photo of two squares"]
        pe, pooled = M.encode_text(tok, te1, te2, prompts, 64)
        ref = tr(hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t, return_dict=False)[0]
        proc = ZeroTokenBias()
        proc.log_n = math.log(64)
        tr.set_attn_processor(proc)
        pe1, _ = M.encode_text(tok, te1, te2, prompts, 1)
        out = tr(hidden_states=x, encoder_hidden_states=pe1, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    assert torch.allclose(out, ref, atol=1e-5)


def test_vae_latent_cell_is_grid_cell():
    vae = M.build_vae()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, CANVAS, CANVAS)).latent_dist.mean
    assert z.shape == (1, M.LATENT_CHANNELS, GRID, GRID)


def _states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not _states_equal(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif k != "elapsed" and x != y:
            return False
    return True


@pytest.mark.slow
def test_pretraining_resumes_bit_for_bit(tmp_path):
    """Each stage, interrupted and re-run, ends with exactly the weights of the uninterrupted run."""
    import shutil

    out_a, out_b = tmp_path / "a" / "pipe", tmp_path / "b" / "pipe"
    quiet = lambda *_: None  # noqa: E731

    def whole_and_resumed(stage: str, train, config, pause: int, run: str = "", **kw) -> tuple[dict, dict]:
        """The stage's checkpoint after one whole call (run a) and after a call paused at ``pause`` and re-run (b)."""
        train(config(**kw), tmp_path / f"{run}a" / "work", out_a, log=quiet)
        with pytest.raises(P.StageIncomplete):
            train(config(**kw, pause_after=pause), tmp_path / f"{run}b" / "work", out_b, log=quiet)
        train(config(**kw), tmp_path / f"{run}b" / "work", out_b, log=quiet)
        return tuple(torch.load(tmp_path / f"{run}{x}" / "work" / stage / "ckpt.pt", weights_only=False) for x in "ab")

    va, vb = whole_and_resumed("vae", P.train_vae, P.VAEConfig, 4, steps=6, batch_size=4, seed=3)
    assert va["step"] == vb["step"] == 6 and _states_equal(va, vb)
    # the decoder stage on that VAE (both runs' VAEs are equal)
    da, db = whole_and_resumed("decoder", P.train_decoder, P.DecoderConfig, 3, steps=4, batch_size=4, seed=3)
    assert da["step"] == db["step"] == 4 and _states_equal(da, db)
    # the transformer stage on the same VAE
    shutil.copytree(out_a / "vae", out_b / "vae", dirs_exist_ok=True)
    tr_cfg = dict(steps=5, batch_size=4, pool_size=24, num_layers=1, seed=3)
    ta, tb = whole_and_resumed("transformer", P.train_transformer, P.TransformerConfig, 2, **tr_cfg)
    assert ta["step"] == tb["step"] == 5 and _states_equal(ta, tb)
    # with the relation objective on (its heads are part of the stage's state)
    ra, rb = whole_and_resumed("transformer", P.train_transformer, P.TransformerConfig, 1, run="r",
                               **{**tr_cfg, "steps": 3, "relation_weight": 0.5, "relation_batch": 4})
    assert any(k.startswith("rel.") for k in ra["model"]) and _states_equal(ra, rb)
    # and a different seed is a different run
    P.train_transformer(P.TransformerConfig(**{**tr_cfg, "seed": 4}), tmp_path / "c" / "work", out_a, log=quiet)
    other = torch.load(tmp_path / "c/work/transformer/ckpt.pt", weights_only=False)
    assert not _states_equal(ta["model"], other["model"])
    # a work folder's latent pool belongs to its captions: a re-run with others is refused, not silently reused
    from fpo_diffusion.errors import OutputExistsError
    from fpo_diffusion.shapes.captions import CaptionStyle

    with pytest.raises(OutputExistsError, match="other captions"):
        P.train_transformer(P.TransformerConfig(**{**tr_cfg, "seed": 4, "captions": CaptionStyle(p_position=0.5)}),
                            tmp_path / "c" / "work", out_a, log=quiet)
    # as does every other setting the pool is made of: its seed, its size, the VAE that encoded it
    for change, words in (({"seed": 5}, "seed 4"), ({"pool_size": 25}, "pool_size 24")):
        with pytest.raises(OutputExistsError, match=words):
            P.train_transformer(P.TransformerConfig(**{**tr_cfg, "seed": 4, **change}), tmp_path / "c" / "work",
                                out_a, log=quiet)
    vae = M.load_vae(out_a)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    vae.save_pretrained(tmp_path / "d" / "pipe" / "vae")
    with pytest.raises(OutputExistsError, match="another VAE"):
        P.train_transformer(P.TransformerConfig(**{**tr_cfg, "seed": 4}), tmp_path / "c" / "work",
                            tmp_path / "d" / "pipe", log=quiet)
    # the command line says so in one line, exit status 2, before any training
    import subprocess
    import sys

    argv = ["--stage", "transformer", "--steps", "1", "--work-dir", str(tmp_path / "c" / "work"), "--out", str(out_a)]
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "launch" / "pretrain_shapes.py"), *argv],
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.count("\n") == 0 and "pool_size 24" in err and "new work folder" in err, err


def test_relations_stage_continues_the_shipped_model_and_refuses_to_overwrite_it(tmp_path):
    """The ``relations`` stage starts from the shipped pipeline's text encoders and transformer (two steps move
    them a little, not to a fresh model), exports a loadable pipeline, and its command line refuses an ``--out``
    that is the pipeline it starts from (one line, exit status 2, nothing trained)."""
    import dataclasses
    import shutil
    import subprocess
    import sys

    from diffusers import SD3Transformer2DModel

    cfg = P.relations_config()
    assert Path(cfg.init_pipeline) == ASSET and cfg.relation_weight > 0 and cfg.captions.p_position == 1.0
    out = tmp_path / "pipe"
    shutil.copytree(ASSET / "vae", out / "vae")
    small = dataclasses.replace(cfg, steps=2, batch_size=4, pool_size=16, relation_batch=4)
    P.train_transformer(small, tmp_path / "work", out, log=lambda *_: None)
    ship = SD3Transformer2DModel.from_pretrained(ASSET / "transformer").state_dict()
    new = SD3Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    moved = sum((new[k] - ship[k]).norm() ** 2 for k in ship) ** 0.5
    size = sum(ship[k].norm() ** 2 for k in ship) ** 0.5
    assert 0 < moved < 0.05 * size, (moved, size)
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "launch" / "pretrain_shapes.py"),
                           "--stage", "relations", "--out", str(ASSET)], capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "overwrite" in err, err


def test_null_t5_outputs_exact_zeros():
    enc, tok = M.null_t5()
    ids = tok(["a photo of a pink star and a brown heart"], padding="max_length", max_length=16,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids).last_hidden_state
    assert out.shape == (1, 16, 2 * M.TEXT_DIM) and torch.count_nonzero(out) == 0


def test_shipped_pipeline_loads_with_the_stock_calls():
    """No extra arguments: ``StableDiffusion3Pipeline`` and ``DiffusionPipeline`` load the folder, and
    sample exactly what the T5-less pipeline samples (the null T5's zeros are the pipeline's own)."""
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    kw = dict(num_inference_steps=3, guidance_scale=4.5, output_type="latent")
    outs = []
    for pipe in (StableDiffusion3Pipeline.from_pretrained(str(ASSET)), DiffusionPipeline.from_pretrained(str(ASSET)),
                 StableDiffusion3Pipeline.from_pretrained(str(ASSET), text_encoder_3=None, tokenizer_3=None)):
        assert type(pipe).__name__ == "StableDiffusion3Pipeline"
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe("a photo of a pink star", generator=torch.Generator().manual_seed(0), **kw).images)
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], outs[2], atol=1e-6)


def test_shipped_pipeline_loads_and_samples_deterministically():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSET))
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=4.5, output_type="latent")
    a = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe("a photo of a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    img = pipe("a photo of a blue square", generator=torch.Generator().manual_seed(0), num_inference_steps=4,
               output_type="pil").images[0]
    assert img.size == (CANVAS, CANVAS)


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


def test_flip_relation_makes_a_relation_caption_false():
    import numpy as np

    from rewards.geneval.rules import relative_position

    rng = np.random.default_rng(0)
    for _ in range(50):
        scene, text = P.pretraining_example(rng, P.RELATION_STYLE)
        a, b = scene
        said = [r for r in P.FLIPPED if f" {r} " in text]
        assert len(said) == 1 and said[0] in relative_position(a.box(), b.box())
        flipped = P.flip_relation(text)
        assert flipped != text and flipped.replace(P.FLIPPED[said[0]], said[0], 1) == text
        assert P.FLIPPED[said[0]] not in relative_position(a.box(), b.box())


@pytest.mark.slow
def test_the_relation_objective_teaches_the_shipped_encoders_relations():
    """300 steps of the relation objective alone on the shipped text encoders: the encoded sequence (what the
    transformer sees) moves more than twice as much between opposite relations, and on scenes it never saw the
    true caption outscores its flipped twin (chance: 0.5)."""
    import numpy as np
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = M.build_tokenizer()
    te1 = CLIPTextModelWithProjection.from_pretrained(DEFAULT_ASSET / "text_encoder").float()
    te2 = CLIPTextModelWithProjection.from_pretrained(DEFAULT_ASSET / "text_encoder_2").float()
    heads = P.relation_heads()
    opt = torch.optim.AdamW([{"params": [*te1.parameters(), *te2.parameters()], "lr": 1e-3},
                             {"params": heads.parameters(), "lr": 3e-3}])
    pairs = [("a photo of a star left of a heart", "a photo of a star right of a heart"),
             ("a cross above a moon", "a cross below a moon"), ("a circle right of a diamond", "a circle left of a diamond")]

    def separation() -> float:
        with torch.no_grad():
            pe, _ = M.encode_text(tok, te1, te2, [p for pair in pairs for p in pair], 0)
        return float(sum((pe[2 * i] - pe[2 * i + 1]).norm() / pe[2 * i].norm() for i in range(len(pairs))) / len(pairs))

    held = np.random.default_rng(99)
    held_out = [P.pretraining_example(held, P.RELATION_STYLE) for _ in range(128)]

    def true_over_flipped() -> float:
        scenes, captions = [s for s, _ in held_out], [c for _, c in held_out]
        with torch.no_grad():
            pe, pooled = M.encode_text(tok, te1, te2, captions + [P.flip_relation(c) for c in captions], 0)
            t = torch.nn.functional.normalize(heads["text"](torch.cat([pe.mean(1), pooled], -1)), dim=-1)
            v = torch.nn.functional.normalize(heads["scene"](P.scene_layout(scenes)), dim=-1)
        n = len(scenes)
        return float(((v * t[:n]).sum(-1) > (v * t[n:]).sum(-1)).float().mean())

    before = separation()
    rng = np.random.default_rng(1)
    for _ in range(300):
        batch = [P.pretraining_example(rng, P.RELATION_STYLE) for _ in range(32)]
        loss = P.relation_loss(heads, tok, te1, te2, [s for s, _ in batch], [c for _, c in batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert separation() > 2 * before
    assert true_over_flipped() > 0.65
