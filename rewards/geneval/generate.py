"""Generate GenEval samples in the official layout with any policy of ``fpo_diffusion.policies``.

``<out>/<index:05d>/metadata.jsonl`` (the prompt's metadata, one line) and
``<out>/<index:05d>/samples/<n:05d>.png``. Resumable: a prompt whose ``n_samples`` images all
exist is skipped; images are written atomically (temp file + rename), so a half-written PNG
never counts. A folder whose ``metadata.jsonl`` differs from the prompt it should hold is an
error (it belongs to another metadata file), never overwritten. Prompts are split across
ranks (``index % world == rank``); each image's seed is ``seed + index * n_samples + n``, so
results do not depend on the number of ranks or on resuming.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .metadata import GenEvalInputError, write_prompt_metadata


class SamplingPolicy(Protocol):
    """The part of ``fpo_diffusion.policies.base.Policy`` that generation uses."""

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]: ...

    def sample(self, cond: dict[str, torch.Tensor], generators: list[torch.Generator], *, steps: int,
               guidance_scale: float, height: int | None = None, width: int | None = None) -> torch.Tensor: ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenerateConfig:
    n_samples: int = 4
    """Images per prompt (official: 4)."""
    steps: int = 50
    guidance_scale: float = 9.0
    height: int | None = 512
    width: int | None = 512
    seed: int = 42
    batch_size: int = 4
    """Images per ``sample`` call (a prompt's images are split into batches of this size)."""


def prompt_folder(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"{index:05d}"


def sample_path(out_dir: str | Path, index: int, n: int) -> Path:
    return prompt_folder(out_dir, index) / "samples" / f"{n:05d}.png"


def is_done(out_dir: str | Path, index: int, n_samples: int) -> bool:
    """All ``n_samples`` images and the metadata of prompt ``index`` exist."""
    return (prompt_folder(out_dir, index) / "metadata.jsonl").is_file() and all(
        sample_path(out_dir, index, n).is_file() for n in range(n_samples))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> 8-bit RGB images (round to nearest)."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _prepare_folder(out_dir: Path, index: int, entry: dict) -> None:
    folder = prompt_folder(out_dir, index)
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        try:
            existing = json.loads(meta.read_text(encoding="utf-8").strip() or "null")
        except json.JSONDecodeError:
            existing = None
        if existing != entry:
            raise GenEvalInputError(f"{meta} holds another prompt than line {index + 1} of the metadata; "
                                    "use a fresh output folder")
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    if not meta.is_file():
        write_prompt_metadata(folder, entry)


def generate(policy: SamplingPolicy, metadata: list[dict], out_dir: str | Path, config: GenerateConfig = GenerateConfig(),
             rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", log: Any = None) -> list[int]:
    """Generate the prompts of this rank that are not finished; returns the indices generated."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for index in range(rank, len(metadata), world_size):
        entry = metadata[index]
        _prepare_folder(out, index, entry)
        if is_done(out, index, config.n_samples):
            continue
        cond = policy.encode_prompts([entry["prompt"]])
        todo = [n for n in range(config.n_samples) if not sample_path(out, index, n).is_file()]
        for start in range(0, len(todo), config.batch_size):
            ns = todo[start: start + config.batch_size]
            gens = [torch.Generator(device=device).manual_seed(config.seed + index * config.n_samples + n) for n in ns]
            batch_cond = {k: v.repeat_interleave(len(ns), dim=0) for k, v in cond.items()}
            x0 = policy.sample(batch_cond, gens, steps=config.steps, guidance_scale=config.guidance_scale,
                               height=config.height, width=config.width)
            for n, img in zip(ns, to_pil(policy.decode(x0))):
                path = sample_path(out, index, n)
                tmp = path.with_name(path.stem + ".tmp.png")
                img.save(tmp)
                tmp.replace(path)
        done.append(index)
        if log is not None:
            log(f"[{index + 1}/{len(metadata)}] {entry['prompt']}")
    return done


__all__ = ["SamplingPolicy", "GenerateConfig", "prompt_folder", "sample_path", "is_done", "to_pil", "generate"]
