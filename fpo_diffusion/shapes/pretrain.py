"""Pretraining of the shapes world's text-to-image model (logic behind ``launch/pretrain_shapes.py``).

Stages, each deterministic (seeded; every schedule is a function of the step, so a resumed
stage is bit-for-bit the uninterrupted one on CPU), resumable (checkpoint in
``work_dir/<stage>/ckpt.pt``), with a fixed length in ``steps`` and a wall-clock cap per call
(``minutes``: the stage checkpoints and stops; the same call continues it):

* ``vae``: a tiny ``AutoencoderKL`` whose latent cell is one grid cell (downsampling = 16),
  trained on rendered random scenes (L1 + L2 + small KL).
* ``transformer``: a tiny ``SD3Transformer2DModel`` (patch 1, joint attention) trained with
  rectified flow on normalised VAE latents, conditioned on two tiny jointly trained
  ``CLIPTextModelWithProjection`` encoders (no T5), on scenes with web-alt-text-like captions
  (``captions.CaptionStyle``: counts, positions and colour binding often left out), CFG dropout
  10 % (``CaptionStyle.p_empty``).
* ``relations`` (optional, :func:`relations_config`): the transformer stage continued from a finished pipeline
  with relation-stating captions and the text-side relation objective: a base model that ties relations to words.

Each finished stage writes its part of a stock ``StableDiffusion3Pipeline`` folder.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fpo_diffusion.errors import OutputExistsError
from fpo_diffusion.policies.sd3 import ZeroTokenBias

from .render import render_array, to_tensor_batch
from .captions import CaptionStyle, pretraining_example, random_scene
from .model import (LATENT_CHANNELS, TEXT_DIM, build_text_encoder, build_tokenizer, build_transformer, build_vae,
                    encode_text, export_pipeline, load_vae)
from .plugin import DEFAULT_ASSET
from .world import CELL, GRID

_BG_T = torch.tensor([c / 127.5 - 1.0 for c in (128, 128, 128)]).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# helpers: checkpoints, rng
# ---------------------------------------------------------------------------------------------
def _save_ckpt(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _batch_scenes(seed: int, step: int, batch: int, stream: int = 0):
    rng = np.random.default_rng([seed, stream, step])
    return [random_scene(rng) for _ in range(batch)], rng


def _progress(total_steps: int, done: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=int(total_steps), initial=int(done), desc=desc, unit="step", mininterval=10, smoothing=0.1)


class StageIncomplete(Exception):
    """A stage hit its wall-clock cap (``minutes``) before ``steps``: it is checkpointed; re-run to continue."""


def run_stage(name: str, cfg, ckpt: Path, *, state: Callable[[], dict], restore: Callable[[dict], None],
              step_fn: Callable[[int], dict[str, float]], log=print) -> int:
    """The loop every pretraining stage shares; returns the steps done (``cfg.steps``).

    Resumes from ``ckpt`` (``restore`` gets its saved dict), calls ``step_fn(step)`` for steps ``step`` ..
    ``cfg.steps - 1`` (its first scalar is logged as a running average, the others as they are),
    checkpoints ``state()`` with the step, the stage's compute time and torch's generator every ``cfg.ckpt_every_s`` seconds and at
    the end, and raises :class:`StageIncomplete` when ``cfg.minutes`` (wall clock of this call) or
    ``cfg.pause_after`` (steps of this call) stops it first: re-run to continue, bit for bit."""
    step, elapsed = 0, 0.0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        restore(st)
        if "torch_rng" in st:  # a stage that draws from torch's global generator (a VAE posterior sample)
            torch.set_rng_state(st["torch_rng"])
        step, elapsed = st["step"], st["elapsed"]
        log(f"[{name}] resumed at step {step} ({elapsed/60:.1f} min)")

    def save():
        _save_ckpt(ckpt, {**state(), "step": step, "elapsed": elapsed, "torch_rng": torch.get_rng_state()})

    pbar = _progress(cfg.steps, step, name)
    t_ck = t_call = time.time()
    avg = None
    stop = cfg.steps if cfg.pause_after is None else min(cfg.steps, step + cfg.pause_after)
    while step < stop and time.time() - t_call < cfg.minutes * 60.0:
        t0 = time.time()
        scalars = step_fn(step)
        step += 1
        dt = time.time() - t0
        elapsed += dt
        pbar.update(1)
        first, *rest = scalars.items()
        avg = first[1] if avg is None else 0.98 * avg + 0.02 * first[1]
        if step % 50 == 0:
            log(f"[{name}] step {step} t={elapsed/60:.1f}min {first[0]}={avg:.4f} "
                + " ".join(f"{k}={v:.2e}" if k == "lr" else f"{k}={v:.3f}" for k, v in rest)
                + f" {cfg.batch_size/dt:.0f} img/s")
        if time.time() - t_ck > cfg.ckpt_every_s:
            save()
            t_ck = time.time()
    pbar.close()
    save()
    if step < cfg.steps:
        raise StageIncomplete(f"[{name}] stopped at step {step}/{cfg.steps} ({elapsed/60:.1f} min); re-run to continue")
    return step


# ---------------------------------------------------------------------------------------------
# stage 1: VAE
# ---------------------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    steps: int = 1650
    """Steps of the stage."""
    schedule_steps: int | None = 3000
    """Length of the cosine learning-rate schedule (``None``: ``steps``); the VAE's reconstructions
    score 1.000 on ShapesEval's scenes by step ~1500, so the stage stops early in its schedule."""
    minutes: float = 1e9
    """Wall-clock cap of one call: checkpoint and stop (re-run to continue)."""
    pause_after: int | None = None
    """Stop this call after this many steps, like a wall-clock cap but deterministic (tests)."""
    batch_size: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-5
    fg_weight: float = 9.0
    aux_weight: float = 0.1
    seed: int = 0
    ckpt_every_s: float = 120.0
    init_from: str | None = None


def _cell_targets(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell: shape index (0 = empty) and colour index (0 = empty), ``[B, GRID, GRID]``."""
    from .world import COLORS, SHAPES

    sh = torch.zeros(len(scenes), GRID, GRID, dtype=torch.long)
    co = torch.zeros(len(scenes), GRID, GRID, dtype=torch.long)
    for i, sc in enumerate(scenes):
        for o in sc:
            sh[i, o.cell[0], o.cell[1]] = SHAPES.index(o.shape) + 1
            co[i, o.cell[0], o.cell[1]] = COLORS.index(o.color) + 1
    return sh, co


def _weighted_reconstruction(x: torch.Tensor, xr: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """L1 + L2 reconstruction error with every pixel of a grid cell that holds an object weighted ``1 + fg_weight``
    (objects cover ~10 % of the pixels)."""
    fg = (x - _BG_T).abs().amax(1, keepdim=True).gt(0.05).float()
    w = 1.0 + fg_weight * F.interpolate(F.max_pool2d(fg, CELL), scale_factor=CELL, mode="nearest")
    return (w * ((xr - x).abs() + (xr - x) ** 2)).mean() / w.mean()


def train_vae(cfg: VAEConfig, work_dir: Path, out_dir: Path = DEFAULT_ASSET, log=print) -> Path:
    from .world import COLORS, SHAPES

    torch.manual_seed(cfg.seed)
    vae = build_vae()
    if cfg.init_from:
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(cfg.init_from).state_dict())
        log(f"[vae] initialised from {cfg.init_from}")
    # auxiliary per-cell probes (not part of the saved VAE): make every latent cell say which
    # shape and colour its grid cell holds, so the decoder has a code to draw from
    aux = torch.nn.ModuleDict({"shape": torch.nn.Conv2d(LATENT_CHANNELS, len(SHAPES) + 1, 1),
                               "color": torch.nn.Conv2d(LATENT_CHANNELS, len(COLORS) + 1, 1)})
    opt = torch.optim.AdamW(list(vae.parameters()) + list(aux.parameters()), lr=cfg.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"[vae] {n_params/1e6:.2f}M parameters, {cfg.steps} steps")
    vae.train()

    def state() -> dict:
        return {"model": vae.state_dict(), "opt": opt.state_dict(), "aux": aux.state_dict()}

    def restore(st: dict) -> None:
        vae.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])
        if "aux" in st:
            aux.load_state_dict(st["aux"])

    def step_fn(step: int) -> dict[str, float]:
        # cosine decay over the schedule, short warmup
        frac = min(1.0, step / (cfg.schedule_steps or cfg.steps))
        lr = cfg.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes, _ = _batch_scenes(cfg.seed, step, cfg.batch_size)
        x = to_tensor_batch([render_array(s) for s in scenes])
        post = vae.encode(x).latent_dist
        z = post.sample()
        xr = vae.decode(z).sample
        # objects cover ~10 % of the pixels: weight up every pixel of a cell that holds an object
        # (corners included, so a circle drawn as a square costs as much as a wrong colour)
        rec = _weighted_reconstruction(x, xr, cfg.fg_weight)
        kl = 0.5 * (post.mean ** 2 + post.var - 1.0 - post.logvar).mean()
        t_sh, t_co = _cell_targets(scenes)
        ce = F.cross_entropy(aux["shape"](z), t_sh) + F.cross_entropy(aux["color"](z), t_co)
        loss = rec + cfg.kl_weight * kl + cfg.aux_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"rec": rec.item(), "kl": kl.item(), "ce": ce.item(), "lr": lr}

    step = run_stage("vae", cfg, work_dir / "vae" / "ckpt.pt", state=state, restore=restore, step_fn=step_fn, log=log)
    vae.eval()
    # latent statistics -> scaling/shift factors
    with torch.no_grad():
        scenes, _ = _batch_scenes(cfg.seed, 0, 512, stream=1)
        z = vae.encode(to_tensor_batch([render_array(s) for s in scenes])).latent_dist.mean
        shift = float(z.mean()); scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    (out_dir / "vae").mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(out_dir / "vae")  # diffusers loads it back as float32
    log(f"[vae] done: {step} steps, {step*cfg.batch_size} images, saved to {out_dir/'vae'} "
        f"(scaling_factor={scale:.4f}, shift_factor={shift:.4f})")
    return out_dir / "vae"


# ---------------------------------------------------------------------------------------------
# stage 1b: decoder fine-tune (encoder frozen)
# ---------------------------------------------------------------------------------------------
@dataclass
class DecoderConfig:
    steps: int = 3000
    minutes: float = 1e9
    pause_after: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    fg_weight: float = 9.0
    seed: int = 0
    ckpt_every_s: float = 120.0


def train_decoder(cfg: DecoderConfig, work_dir: Path, out_dir: Path = DEFAULT_ASSET, log=print) -> Path:
    """Fine-tune only the VAE's decoder (``post_quant_conv`` + ``decoder``) on posterior samples of
    the frozen encoder, so latents (and the transformer trained on them) stay valid while the
    decoder learns to draw crisper shapes. Overwrites ``out_dir/vae`` when done."""
    torch.manual_seed(cfg.seed)
    vae = load_vae(out_dir)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    vae.encoder.eval()
    vae.decoder.train()

    def restore(st: dict) -> None:
        vae.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])

    def step_fn(step: int) -> dict[str, float]:
        frac = step / cfg.steps
        lr = cfg.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes, _ = _batch_scenes(cfg.seed, step, cfg.batch_size, stream=3)
        x = to_tensor_batch([render_array(s) for s in scenes])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        loss = _weighted_reconstruction(x, vae.decode(z).sample, cfg.fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return {"rec": loss.item(), "lr": lr}

    step = run_stage("decoder", cfg, work_dir / "decoder" / "ckpt.pt", restore=restore, step_fn=step_fn, log=log,
                     state=lambda: {"model": vae.state_dict(), "opt": opt.state_dict()})
    vae.eval()
    vae.to(torch.float16).save_pretrained(out_dir / "vae")
    log(f"[decoder] done: {step} steps; saved to {out_dir / 'vae'} (encoder and scaling factors unchanged)")
    return out_dir / "vae"


# ---------------------------------------------------------------------------------------------
# stage 2: text encoders + transformer
# ---------------------------------------------------------------------------------------------
@dataclass
class TransformerConfig:
    steps: int = 4000
    """Length of the stage (the learning-rate schedule runs over it)."""
    minutes: float = 1e9
    """Wall-clock cap of one call: checkpoint and stop (re-run to continue)."""
    pause_after: int | None = None
    """Stop this call after this many steps (deterministic; tests)."""
    batch_size: int = 64
    lr: float = 6e-4
    seed: int = 0
    pool_size: int = 40000
    ema_decay: float = 0.999
    num_layers: int = 4
    ckpt_every_s: float = 120.0
    device: str = "cpu"
    init_from: str | None = None  # a transformer-stage ckpt.pt whose EMA weights start this run
    # all-zero "T5" tokens the pipeline appends (its max_sequence_length): 256 (the default) half
    # of the time, else log-uniform in [1, 256] (see ZeroTokenBias)
    zero_tokens_default: int = 256
    init_pipeline: str | None = None
    """A pipeline folder (e.g. the shipped model) whose text encoders and transformer start this run: continued
    pretraining. Its transformer's layer count must be ``num_layers``."""
    relation_weight: float = 0.0
    """Weight of the text-side relation objective (0: off, the shipped model's recipe). The diffusion loss gives
    the encoders little reason to tell "a star left of a heart" from "a star right of a heart" (a caption states
    one of several true relations, and either noun order describes the scene); this contrastive loss does: an
    embedding of the encoders' output must pick a two-object scene's true relation caption over the same caption
    with the relation flipped and over the other scenes' captions (:func:`relation_loss`)."""
    relation_batch: int = 32
    """Two-object scenes with a stated relation per step for the relation objective (>= 2)."""
    captions: CaptionStyle = field(default_factory=CaptionStyle)
    """How the latent pool's captions are written (the shipped model: the defaults, web-alt-text-like)."""

    def __post_init__(self):
        if not 0.0 <= self.relation_weight < math.inf:
            raise ValueError(f"relation_weight must be finite and >= 0, got {self.relation_weight}")
        if self.relation_batch < 2:
            raise ValueError(f"relation_batch must be >= 2 (the other scenes are negatives), got {self.relation_batch}")


def _vae_fingerprint(vae) -> str:
    """A digest of the VAE's weights: a latent pool is only valid for the VAE that encoded it."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _pool_spec(cfg: TransformerConfig, vae) -> dict:
    """Every setting that defines the latent pool's contents."""
    return {"seed": cfg.seed, "pool_size": cfg.pool_size, "captions": asdict(cfg.captions),
            "vae": _vae_fingerprint(vae)}


def _build_pool(cfg: TransformerConfig, vae, path: Path, log=print):
    spec = _pool_spec(cfg, vae)
    if path.is_file():
        pool = torch.load(path, weights_only=False)
        # a pool written before its spec was recorded: only its caption style (defaults if absent) and size are known
        recorded = pool.get("spec") or {"captions": pool.get("captions", asdict(CaptionStyle())),
                                        "pool_size": len(pool["prompts"])}
        differ = [k for k in recorded if recorded[k] != spec.get(k)]
        if differ:
            names = {"captions": "other captions", "vae": "another VAE"}
            what = ", ".join(names.get(k, f"{k} {recorded[k]!r} (this run: {spec[k]!r})") for k in differ)
            raise OutputExistsError(f"the latent pool {path} was written with {what}: use a new work folder "
                                    "(--work-dir)")
        return pool
    rng = np.random.default_rng([cfg.seed, 7])
    prompts, arrays = [], []
    for _ in range(cfg.pool_size):
        scene, text = pretraining_example(rng, cfg.captions)
        prompts.append(text)
        arrays.append(render_array(scene))
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(arrays), 256):
            d = vae.encode(to_tensor_batch(arrays[i:i + 256])).latent_dist
            means.append(d.mean); stds.append(d.std)
    pool = {"prompts": prompts, "mean": torch.cat(means), "std": torch.cat(stds), "spec": spec}
    _save_ckpt(path, pool)
    log(f"[transformer] latent pool: {len(prompts)} scenes, {len(set(prompts))} distinct prompts")
    return pool


FLIPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
"""Each relation word and its opposite: flipping it makes a two-object relation caption false."""
RELATION_STYLE = CaptionStyle(p_all_classes=1.0, p_position=1.0, p_empty=0.0, kinds=(0.0, 1.0, 0.0, 0.0))
"""Captions of the relation objective: two objects of different classes, their relation always stated."""


def flip_relation(text: str) -> str:
    """``text`` with its relation word replaced by the opposite one (one relation per caption)."""
    import re

    return re.sub(r"\b(left of|right of|above|below)\b", lambda m: FLIPPED[m.group(1)], text, count=1)


def scene_layout(scenes) -> torch.Tensor:
    """``[B, (classes + colours) * 3]``: for each class and each colour, whether the scene holds it and the mean row
    and column of the objects that have it (in [0, 1]): a scene's layout in the terms captions speak of."""
    from .world import COLORS, SHAPES

    x = torch.zeros(len(scenes), len(SHAPES) + len(COLORS), 3)
    for i, sc in enumerate(scenes):
        for k in range(len(SHAPES) + len(COLORS)):
            objs = [o for o in sc if (o.shape == SHAPES[k] if k < len(SHAPES) else o.color == COLORS[k - len(SHAPES)])]
            if objs:
                x[i, k] = torch.tensor([1.0, sum(o.cell[0] for o in objs) / len(objs) / max(1, GRID - 1),
                                        sum(o.cell[1] for o in objs) / len(objs) / max(1, GRID - 1)])
    return x.flatten(1)


def relation_heads(dim: int = 64) -> torch.nn.ModuleDict:
    """The relation objective's two small heads (not part of the exported pipeline): a text head on the encoders'
    output (its token states as the transformer sees them, mean-pooled, and the pooled projection) and a scene
    head on :func:`scene_layout`."""
    from .world import COLORS, SHAPES

    return torch.nn.ModuleDict({
        "text": torch.nn.Linear(4 * TEXT_DIM, dim),
        "scene": torch.nn.Sequential(torch.nn.Linear((len(SHAPES) + len(COLORS)) * 3, 256), torch.nn.GELU(),
                                     torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, dim))})


def relation_loss(heads, tok, te1, te2, scenes, captions: list[str], temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE of each scene against its caption, its caption with the relation flipped, and the other scenes'
    captions: the encoders must carry which relation a caption states, since only that separates the first two."""
    flipped = [flip_relation(c) for c in captions]
    pe, pooled = encode_text(tok, te1, te2, captions + flipped, 0)
    t = F.normalize(heads["text"](torch.cat([pe.mean(1), pooled], -1)), dim=-1)
    v = F.normalize(heads["scene"](scene_layout(scenes)), dim=-1)
    logits = v @ t.T / temperature  # [B, 2B]: columns 0..B-1 the true captions, B..2B-1 the flipped ones
    n = len(scenes)
    pair = torch.stack([logits.diagonal(), logits[:, n:].diagonal()], 1)  # each scene: its caption vs its flip
    return F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(pair, torch.zeros(n, dtype=torch.long))


RELATIONS_CAPTIONS = CaptionStyle(p_all_classes=1.0, p_position=1.0, p_count=0.6, kinds=(0.1, 0.5, 0.25, 0.15))
"""The ``relations`` stage's captions: every class named, a two-object scene's relation always stated, a count
given 60 % of the time; half the scenes two objects of different classes, a quarter 2-4 of one class."""


def relations_config(init_pipeline: str | Path = DEFAULT_ASSET, seed: int = 0) -> TransformerConfig:
    """Continued pretraining that ties relations (and counts) to the words: the ``relations`` stage of
    ``launch/pretrain_shapes.py``. From the text encoders and transformer of ``init_pipeline`` (default the shipped
    model), 4500 steps at lr 5e-4 (warm-up 200, cosine), EMA 0.99, a 10 000-scene pool captioned with
    :data:`RELATIONS_CAPTIONS`, the text-side relation objective at weight 0.1. Why: the shipped captions state a
    relation in 2.4 % of cases, and a base model that draws the asked relation no more often than its opposite gives
    RL nothing relation-conditional to reinforce (BENCHMARKS.md, "Position"); this base draws it far more often
    than the opposite, and RL then lifts position on held-out prompts."""
    return TransformerConfig(steps=4500, lr=5e-4, captions=RELATIONS_CAPTIONS, pool_size=10000, ema_decay=0.99,
                             init_pipeline=str(init_pipeline), relation_weight=0.1, seed=seed)


def load_pretrained_modules(modules: torch.nn.ModuleDict, path: str | Path) -> None:
    """The text encoders and transformer of the pipeline folder ``path`` into ``modules`` (te1, te2, tr)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    modules["te1"].load_state_dict(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder").state_dict())
    modules["te2"].load_state_dict(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2").state_dict())
    modules["tr"].load_state_dict(SD3Transformer2DModel.from_pretrained(path / "transformer").state_dict())


def train_transformer(cfg: TransformerConfig, work_dir: Path, out_dir: Path = DEFAULT_ASSET, log=print) -> Path:
    import copy

    vae = load_vae(out_dir)
    sf, sh = float(vae.config.scaling_factor), float(vae.config.shift_factor)
    pool = _build_pool(cfg, vae, work_dir / "transformer" / "pool.pt", log)
    tok = build_tokenizer()
    te1, te2 = build_text_encoder(cfg.seed + 1), build_text_encoder(cfg.seed + 2)
    tr = build_transformer(cfg.seed + 3, num_layers=cfg.num_layers)
    modules = torch.nn.ModuleDict({"te1": te1, "te2": te2, "tr": tr})
    if cfg.relation_weight > 0:
        torch.manual_seed(cfg.seed + 5)
        modules["rel"] = relation_heads()
    if cfg.init_pipeline:
        load_pretrained_modules(modules, cfg.init_pipeline)
        log(f"[transformer] initialised from the pipeline {cfg.init_pipeline}")
    if cfg.init_from:  # (a checkpoint without the relation heads leaves them as initialised)
        missing, unexpected = modules.load_state_dict(torch.load(cfg.init_from, weights_only=False)["ema"], strict=False)
        if unexpected or any(not k.startswith("rel.") for k in missing):
            raise ValueError(f"init_from {cfg.init_from} does not fit this transformer stage (missing "
                             f"{[k for k in missing if not k.startswith('rel.')][:3]}, unexpected {unexpected[:3]})")
        log(f"[transformer] initialised from the EMA weights of {cfg.init_from}")
    ema = copy.deepcopy(modules).requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    n_tr = sum(p.numel() for p in tr.parameters())
    n_te = sum(p.numel() for p in te1.parameters()) * 2
    log(f"[transformer] transformer {n_tr/1e6:.2f}M + text encoders {n_te/1e6:.2f}M parameters, "
        f"{cfg.steps} steps")
    N = len(pool["prompts"])
    zproc = ZeroTokenBias()
    tr.set_attn_processor(zproc)  # training copy only; ``ema`` keeps the stock processor
    modules.train()

    def restore(st: dict) -> None:
        modules.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])

    def step_fn(step: int) -> dict[str, float]:
        frac = step / cfg.steps
        lr = cfg.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([cfg.seed, 11, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = torch.from_numpy(rng.integers(0, N, size=cfg.batch_size))
        prompts = [pool["prompts"][i] for i in idx.tolist()]  # CFG dropout is in the captions (p_empty)
        z0 = pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["mean"][idx].shape, generator=gen)
        z0 = (z0 - sh) * sf
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))  # logit-normal(0, 1)
        t = torch.where(torch.rand(cfg.batch_size, generator=gen) < 0.1, torch.rand(cfg.batch_size, generator=gen), t)
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * z0 + tt * eps
        log_n = math.log(cfg.zero_tokens_default)
        zproc.log_n = log_n if rng.random() < 0.5 else float(rng.uniform(0.0, log_n))
        pe, pooled = encode_text(tok, te1, te2, prompts, 1)
        v = tr(hidden_states=xt, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t * 1000,
               return_dict=False)[0]
        loss = F.mse_loss(v, eps - z0)
        scalars = {"loss": loss.item()}
        if cfg.relation_weight > 0:
            rel_scenes, rel_captions = [], []
            for _ in range(cfg.relation_batch):
                sc, text = pretraining_example(rng, RELATION_STYLE)
                rel_scenes.append(sc)
                rel_captions.append(text)
            rel = relation_loss(modules["rel"], tok, te1, te2, rel_scenes, rel_captions)
            loss = loss + cfg.relation_weight * rel
            scalars["relation"] = rel.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe_, pm in zip(ema.parameters(), modules.parameters()):
                pe_.lerp_(pm, 1 - d)
        return {**scalars, "lr": lr}

    step = run_stage("transformer", cfg, work_dir / "transformer" / "ckpt.pt", restore=restore, step_fn=step_fn,
                     log=log, state=lambda: {"model": modules.state_dict(), "ema": ema.state_dict(),
                                             "opt": opt.state_dict()})
    export_pipeline(ema["te1"], ema["te2"], ema["tr"], out_dir)
    log(f"[transformer] done: {step} steps, {step*cfg.batch_size} samples; pipeline saved to {out_dir}")
    return out_dir
