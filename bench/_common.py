"""Shared helpers of the benchmarks: real architectures with random weights, timing, tables.

An :class:`~fpo_diffusion.algorithms.base.Algorithm` runs outside the loop on an
``AlgorithmContext.for_policy(cfg, policy)``.

Real architectures are built from their published configs (no download): the SD1.5 UNet
(``runwayml/stable-diffusion-v1-5``, ``unet/config.json``) and the SD3.5-Medium transformer
(``stabilityai/stable-diffusion-3.5-medium``, ``transformer/config.json``). They are put into
the tiny stock pipeline of their family (tiny VAE and text encoders: the benchmarks feed
latents and random text embeddings of the real widths directly).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
"""``unet/config.json`` of runwayml/stable-diffusion-v1-5 (860M parameters)."""

SD35M_TRANSFORMER_CONFIG = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "sample_size": 128,
}
"""``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium (2.5B parameters)."""

MODELS = ("tiny-sd", "tiny-sd3", "sd15", "sd35m")


def set_threads(n: int = 1) -> None:
    torch.set_num_threads(n)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_policy(name: str, *, dtype: torch.dtype = torch.float32, dev: torch.device | None = None):
    """``(policy, latent_shape(h, w) -> tuple, random_cond(n, text_len) -> Cond)`` for a benchmark model:
    ``tiny-sd``, ``tiny-sd3``, ``sd15`` / ``sd35m`` (real architectures, random weights) or ``shapes``."""
    dev = dev or device()
    if name == "shapes":  # the shipped shapes model (what the default job trains)
        from fpo_diffusion.embedded import load_model

        policy = load_model("sd3", "embedded:shapes", device=dev)
        policy.pipeline.to(dev, dtype)
    else:
        policy = _built_policy(name, dtype, dev)
    den = policy.denoiser
    ch = int(den.config.in_channels)
    if policy.family == "sd":
        width = int(den.config.cross_attention_dim)

        def cond(n: int, text_len: int = 77):
            return {"prompt_embeds": torch.randn(n, text_len, width, device=dev, dtype=dtype)}
    else:
        jd, pd = int(den.config.joint_attention_dim), int(den.config.pooled_projection_dim)

        def cond(n: int, text_len: int = 77):
            return {"prompt_embeds": torch.randn(n, text_len, jd, device=dev, dtype=dtype),
                    "pooled_prompt_embeds": torch.randn(n, pd, device=dev, dtype=dtype)}
    return policy, ch, cond


def _built_policy(name: str, dtype: torch.dtype, dev: torch.device):
    """A tiny pipeline, or one whose denoiser is a real architecture with random weights."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from fpo_diffusion.policies.sd import SDPolicy
    from fpo_diffusion.policies.sd3 import SD3Policy
    from fpo_diffusion.tiny import build_tiny_pipeline

    fam = "sd" if name in ("tiny-sd", "sd15") else "sd3"
    pipe = build_tiny_pipeline(fam, seed=0)
    torch.manual_seed(0)
    if name == "sd15":
        pipe.unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    elif name == "sd35m":
        pipe.transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG).eval()
    pipe.to(dev, dtype)
    return (SDPolicy if fam == "sd" else SD3Policy)(pipe)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run interleaved (``a b a b ...``) after ``warmup`` rounds."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def report(rows: list[dict], cols: list[str], json_path: str | None) -> list[dict]:
    """Print the rows as a Markdown table and, if asked, write them to ``json_path``."""
    import json

    print(markdown_table(rows, cols))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
