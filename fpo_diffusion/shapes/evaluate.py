"""ShapesEval: GenEval's six tasks on the shapes world, scored by the exact detector + GenEval rules.

``evaluate_model(model_dir, ...)`` samples a fixed prompt set of the split by combination
(``split="test"``: ShapesEval, ``scenes.test_metadata()``, 496 entries over 330 distinct
prompts; ``split="validation"``: ``scenes.validation_metadata()``, for choosing
hyper-parameters), never a training prompt, with a stock ``StableDiffusion3Pipeline``
(optionally with a LoRA), scores every image and writes a report (``report.json``,
``report.md``, ``report.html``, per-task grids, every image). ``evaluate_reconstructions``
scores the VAE's reconstructions of rendered scenes for the same prompts (the ceiling the
decoder allows).

Per-task accuracy = fraction of correct images, with its binomial standard error over images
``sqrt(p (1 - p) / n)`` (images of one prompt are correlated, so this is a lower bound on the
spread between prompt sets; it is the right yardstick between two models on the same prompts
and seeds); overall = unweighted mean of the six task accuracies (GenEval's definition), its
standard error ``sqrt(sum_t se_t^2) / 6``; correct-prompt rate = fraction of entries with at
least one correct image (GenEval's ``% correct prompts``). :func:`compare` puts two summaries
side by side and marks differences beyond 2 standard errors.
"""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fpo_diffusion.images import labelled_grid
from fpo_diffusion.policies.sd3 import fast_zero_tokens

from .detector import ShapesDetector, painted_share
from .scenes import TASKS, scene_for, test_metadata, validation_metadata

GRID_ENTRIES = 12
"""Entries per task shown in the grids."""


def load_pipeline(model_dir: str | Path, lora_dir: str | Path | None = None):
    from .model import load_pipeline as _load

    pipe = _load(model_dir, dtype=torch.float32)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance_scale: float = 4.5,
           fast: bool = True) -> list[Image.Image]:
    """One image per (prompt, seed); each image's noise comes from its own seeded generator,
    so results do not depend on batching. ``fast``: the zero-token shortcut of
    :func:`fast_zero_tokens` for this call only (same images as the stock call with the default
    ``max_sequence_length=256``)."""
    saved = pipe.transformer.attn_processors
    kw = fast_zero_tokens(pipe) if fast else {}
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    side = pipe.default_sample_size * pipe.vae_scale_factor
    try:
        with torch.no_grad():
            out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                       height=side, width=side, output_type="pil", **kw)
    finally:
        pipe.transformer.set_attn_processor(saved)
    return out.images


def _score(images, metas, detector):
    from rewards.geneval.rules import evaluate

    recs = []
    for img, m in zip(images, metas):
        r = evaluate(detector.detect(img), m, image=img)
        recs.append({"correct": bool(r.correct), "reason": r.reason, "clause_fraction": r.clause_fraction,
                     "painted_share": painted_share(img)})
    return recs


def summarise(records: list[dict]) -> dict:
    if not records:
        raise ValueError("no images to summarise")
    from rewards.geneval.summary import overall_score, task_scores

    scores = task_scores([r["tag"] for r in records], [int(bool(r["correct"])) for r in records])
    scores = {t: scores[t] for t in TASKS if t in scores}  # the official report order
    per_task = {}
    for t, sc in scores.items():
        rs = [r for r in records if r["tag"] == t]
        per_task[t] = {"accuracy": sc.accuracy, "se": sc.se, "images": sc.total,
                       "prompts": len({r["entry"] for r in rs}), "distinct_prompts": len({r["prompt"] for r in rs})}
    entries: dict[int, bool] = {}
    for r in records:
        entries[r["entry"]] = entries.get(r["entry"], False) or r["correct"]
    overall, overall_se = overall_score(scores)
    return {
        "overall": overall,
        "overall_se": overall_se,
        "per_task": per_task,
        "correct_images": float(np.mean([r["correct"] for r in records])),
        "correct_prompts": float(np.mean(list(entries.values()))),
        "images": len(records),
        "entries": len(entries),
        "mean_painted_share": float(np.mean([r["painted_share"] for r in records])),
    }


def compare(base: dict, other: dict, names: tuple[str, str] = ("base", "other")) -> tuple[str, dict]:
    """Markdown table of two summaries (same prompt set) and the per-row verdicts.

    A difference counts when it exceeds 2 standard errors of the difference,
    ``sqrt(se_a^2 + se_b^2)`` (unpaired: conservative for two models on the same seeds).
    """
    rows, verdict = [], {}
    keys = [t for t in TASKS if t in base["per_task"] and t in other["per_task"]] + ["overall"]
    for k in keys:
        if k == "overall":
            a, sa, b, sb = base["overall"], base["overall_se"], other["overall"], other["overall_se"]
        else:
            a, sa = base["per_task"][k]["accuracy"], base["per_task"][k]["se"]
            b, sb = other["per_task"][k]["accuracy"], other["per_task"][k]["se"]
        d, sd = b - a, math.sqrt(sa ** 2 + sb ** 2)
        z = d / sd if sd > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
        verdict[k] = {"base": a, "other": b, "diff": d, "se": sd, "z": z, "beyond_2se": abs(z) > 2}
        mark = ("**yes**" if abs(z) > 3 else "yes") if abs(z) > 2 else "no"
        name = f"**{k}**" if k == "overall" else k
        rows.append(f"| {name} | {a:.3f} ± {sa:.3f} | {b:.3f} ± {sb:.3f} | {d:+.3f} ± {sd:.3f} | {z:+.1f} | {mark} |")
    head = [f"| task | {names[0]} | {names[1]} | difference | z | beyond 2 SE |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows), verdict


def write_report(out_dir: Path, records: list[dict], images: list[Image.Image], info: dict, n_images: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    for r, im in zip(records, images):
        r["file"] = f"images/{r['entry']:04d}_{r['index']}.png"
        im.save(out_dir / r["file"])
    summary = summarise(records)
    summary["info"] = info
    grids = {}
    for t in TASKS:
        rs = [(r, im) for r, im in zip(records, images) if r["tag"] == t]
        if not rs:
            continue
        seen: list[int] = []
        for r, _ in rs:
            if r["entry"] not in seen and r["prompt"] not in [x["prompt"] for x, _ in rs if x["entry"] in seen]:
                seen.append(r["entry"])
            if len(seen) >= GRID_ENTRIES:
                break
        sel = [(r, im) for r, im in rs if r["entry"] in seen]
        tiles = [im for _, im in sel]  # one row per entry, its images upscaled 2x
        labelled_grid([tiles[i:i + n_images] for i in range(0, len(tiles), n_images)],
                      min_side=2 * max(tiles[0].size), pad=2).save(out_dir / f"grid_{t}.png")
        grids[t] = {"file": f"grid_{t}.png", "rows": [[r["prompt"], [x["correct"] for x, _ in sel if x["entry"] == r["entry"]]]
                                                       for r, _ in sel if r["index"] == 0]}
    summary["grids"] = grids
    (out_dir / "report.json").write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    title = report_title(info)
    lines = [f"# {title}", "",
             f"{summary['images']} images, {summary['entries']} prompt entries x {n_images} images; "
             + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("model", "lora")), "",
             "| task | accuracy ± SE | images | entries | distinct prompts |", "|---|---|---|---|---|"]
    for t, v in summary["per_task"].items():
        lines.append(f"| {t} | {v['accuracy']:.3f} ± {v['se']:.3f} | {v['images']} | {v['prompts']} | "
                     f"{v['distinct_prompts']} |")
    lines += [f"| **overall** | **{summary['overall']:.3f}** ± {summary['overall_se']:.3f} | | | |", "",
              f"correct images: {summary['correct_images']:.3f}; correct prompts (any of {n_images}): "
              f"{summary['correct_prompts']:.3f}; mean painted share: {summary['mean_painted_share']:.3f}", ""]
    for t, g in grids.items():
        lines += [f"## {t}", "", f"![{t}]({g['file']})", ""]
        lines += [f"{i+1}. {p} — {''.join('✓' if c else '✗' for c in cs)}" for i, (p, cs) in enumerate(g["rows"])]
        lines.append("")
    (out_dir / "report.md").write_text("\n".join(lines))
    h = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>body{{font-family:sans-serif}}"
         "td,th{padding:2px 8px;vertical-align:top}img.s{width:96px;image-rendering:pixelated}"
         "figure{display:inline-block;margin:1px;width:102px;font-size:10px;color:#a22}"
         ".ok{border:3px solid #2a2}.bad{border:3px solid #c22}</style>",
         f"<h1>{html.escape(title)}</h1><p>" + html.escape(", ".join(f"{k}={v}" for k, v in info.items())) + "</p>"
         "<table><tr><th>task<th>accuracy ± SE<th>images</tr>"]
    for t, v in summary["per_task"].items():
        h.append(f"<tr><td>{t}<td>{v['accuracy']:.3f} ± {v['se']:.3f}<td>{v['images']}</tr>")
    h.append(f"<tr><td><b>overall</b><td><b>{summary['overall']:.3f}</b> ± {summary['overall_se']:.3f}<td></tr></table>")
    h.append(f"<p>correct prompts: {summary['correct_prompts']:.3f}; mean painted share: "
             f"{summary['mean_painted_share']:.3f}</p>")
    for t in grids:
        h.append(f"<h2>{t}</h2><table>")
        entries = []
        for r in records:
            if r["tag"] == t and r["entry"] not in entries:
                entries.append(r["entry"])
        for e in entries[:GRID_ENTRIES]:
            rs = [r for r in records if r["entry"] == e]
            cells = "".join(f"<figure><img class='s {'ok' if r['correct'] else 'bad'}' src='{r['file']}' "
                            f"title='{html.escape(r['reason'] or 'correct')}'><figcaption>"
                            f"{html.escape(r['reason']).replace(chr(10), '<br>')}</figcaption></figure>" for r in rs)
            h.append(f"<tr><td>{html.escape(rs[0]['prompt'])}<td>{cells}</tr>")
        h.append("</table>")
    (out_dir / "report.html").write_text("\n".join(h))
    return summary


def report_title(info: dict) -> str:
    """What a report scored: model, LoRA and split."""
    t = f"ShapesEval ({info.get('split', 'test')}): {info.get('model', '')}"
    return t + (f" + LoRA {info['lora']}" if info.get("lora") else "")


SPLITS = {"test": test_metadata, "validation": validation_metadata}
SEED_OFFSET = {"test": 0, "validation": 500_000_000}
"""Image seeds of the validation split are offset, so its single_object entries (the test prompts) get other noise."""


def _entries(max_per_task: int | None, split: str = "test"):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    metas = SPLITS[split]()
    if max_per_task is not None:
        kept, count = [], {}
        for i, m in enumerate(metas):
            if count.get(m["tag"], 0) < max_per_task:
                kept.append((i, m)); count[m["tag"]] = count.get(m["tag"], 0) + 1
        return kept
    return list(enumerate(metas))


def evaluate_model(model_dir: str | Path, out_dir: str | Path, lora_dir: str | Path | None = None, n_images: int = 4,
                   max_per_task: int | None = None, steps: int = 20, guidance_scale: float = 4.5, seed: int = 0,
                   batch_size: int = 64, fast: bool = True, split: str = "test", log: Callable = print) -> dict:
    """Sample and score a split's prompt set; write the report to ``out_dir``; return the summary."""
    from tqdm import tqdm

    if n_images < 1 or steps < 1 or batch_size < 1 or (max_per_task is not None and max_per_task < 1):
        raise ValueError("n_images, steps, batch_size and max_per_task must be >= 1")
    pipe = load_pipeline(model_dir, lora_dir)
    jobs = [(e, m, k) for e, m in _entries(max_per_task, split) for k in range(n_images)]
    det = ShapesDetector()
    records, images = [], []
    t0 = time.time()
    for i in tqdm(range(0, len(jobs), batch_size), desc="shapes-eval", mininterval=10):
        chunk = jobs[i:i + batch_size]
        seeds = [SEED_OFFSET[split] + seed * 1_000_003 + e * 97 + k for e, _, k in chunk]
        ims = sample(pipe, [m["prompt"] for _, m, _ in chunk], seeds, steps, guidance_scale, fast)
        for (e, m, k), s, im, r in zip(chunk, seeds, ims, _score(ims, [m for _, m, _ in chunk], det)):
            r.update({"entry": e, "index": k, "seed": s, "tag": m["tag"], "prompt": m["prompt"], "metadata": m})
            records.append(r); images.append(im)
    info = {"model": str(model_dir), "lora": str(lora_dir) if lora_dir else None, "split": split, "steps": steps,
            "sampler": type(pipe.scheduler).__name__, "guidance_scale": guidance_scale, "seed": seed,
            "images_per_entry": n_images, "seconds": round(time.time() - t0, 1)}
    summary = write_report(Path(out_dir), records, images, info, n_images)
    log(format_summary(summary))
    return summary


def evaluate_reconstructions(vae_dir: str | Path, out_dir: str | Path, n_images: int = 4, max_per_task: int | None = None,
                             seed: int = 0, sample_posterior: bool = False, split: str = "test",
                             log: Callable = print) -> dict:
    """Score the VAE's reconstructions of rendered held-out scenes (one scene per image)."""
    from diffusers import AutoencoderKL

    from .render import render_array, to_tensor_batch

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    jobs = [(e, m, k) for e, m in _entries(max_per_task, split) for k in range(n_images)]
    det = ShapesDetector()
    records, images = [], []
    for i in range(0, len(jobs), 256):
        chunk = jobs[i:i + 256]
        arrays = [render_array(scene_for(m, np.random.default_rng([seed, e, k]))) for e, m, k in chunk]
        with torch.no_grad():
            d = vae.encode(to_tensor_batch(arrays)).latent_dist
            z = d.sample(torch.Generator().manual_seed(seed + i)) if sample_posterior else d.mean
            x = vae.decode(z).sample
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        ims = [Image.fromarray(a) for a in x]
        for (e, m, k), im, r in zip(chunk, ims, _score(ims, [m for _, m, _ in chunk], det)):
            r.update({"entry": e, "index": k, "seed": seed, "tag": m["tag"], "prompt": m["prompt"], "metadata": m})
            records.append(r); images.append(im)
    info = {"model": f"VAE reconstructions: {vae_dir}", "split": split,
            "posterior": "sample" if sample_posterior else "mean"}
    summary = write_report(Path(out_dir), records, images, info, n_images)
    log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    rows = [f"{t:14s} {v['accuracy']:.3f} ± {v['se']:.3f}  ({v['images']} images)" for t, v in summary["per_task"].items()]
    return "\n".join(rows + [f"{'overall':14s} {summary['overall']:.3f} ± {summary['overall_se']:.3f}",
                             f"correct prompts {summary['correct_prompts']:.3f}, painted share "
                             f"{summary['mean_painted_share']:.3f}"])


__all__ = ["evaluate_model", "evaluate_reconstructions", "load_pipeline", "sample", "fast_zero_tokens", "summarise",
           "write_report", "format_summary", "compare", "report_title", "SPLITS"]
