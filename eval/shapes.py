"""ShapesEval: score a model folder (optionally + LoRA) on the shapes world's held-out prompts.

    python eval/shapes.py                                  # the shipped model, test split
    python eval/shapes.py path/to/pipeline --lora runs/x/lora --out outputs/shapes_eval/x
    python eval/shapes.py --split validation ...           # for choosing hyper-parameters
    python eval/shapes.py --reconstructions                # the shipped VAE's reconstructions
    python eval/shapes.py --max-per-task 10 --images 2     # quick look
    python eval/shapes.py compare BASE/report.json OTHER/report.json [--out table.md]

Writes report.json / report.md / report.html, per-task grids and every image to ``--out``.
Every accuracy comes with its standard error; ``compare`` marks differences beyond 2 of them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _at_least_one(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def _unreadable_lora(folder: Path) -> str | None:
    """Why the LoRA folder cannot be loaded (checked before the pipeline loads), or ``None``."""
    if not folder.is_dir():
        return "not a folder (give the folder that holds pytorch_lora_weights.safetensors)"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "holds no .safetensors file (a diffusers LoRA folder holds pytorch_lora_weights.safetensors)"
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
        except Exception as e:  # safetensors raises its own error types for damaged headers
            return f"{f.name} cannot be read ({' '.join(str(e).split())[:160]}): is it damaged or truncated?"
        if not keys:
            return f"{f.name} holds no tensors"
    return None


def _compare(argv: list[str]) -> int:
    from fpo_diffusion.shapes import evaluate as E

    ap = argparse.ArgumentParser(prog="eval/shapes.py compare", description="Two ShapesEval reports side by side.")
    ap.add_argument("base", help="report.json (or its folder) of the reference model")
    ap.add_argument("other", help="report.json (or its folder) of the model to compare")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args(argv)
    summaries = []
    for p in (args.base, args.other):
        path = Path(p) / "report.json" if Path(p).is_dir() else Path(p)
        try:
            summaries.append(json.loads(path.read_text())["summary"])
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {path} is not a ShapesEval report.json ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    a, b = summaries
    if a.get("info", {}).get("split") != b.get("info", {}).get("split"):
        print("error: the two reports score different splits", file=sys.stderr)
        return 2
    table, _ = E.compare(a, b, (E.report_title(a.get("info", {})), E.report_title(b.get("info", {}))))
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        return _compare(argv[1:])
    import torch

    from fpo_diffusion.shapes import evaluate as E
    from fpo_diffusion.shapes.plugin import DEFAULT_ASSET
    from fpo_diffusion.cli import quiet_libraries

    quiet_libraries()  # not a warning per batch about the pipeline's one zero T5 token (the shipped model's trick)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(DEFAULT_ASSET), help="StableDiffusion3Pipeline folder")
    ap.add_argument("--lora", default=None, help="LoRA folder (diffusers format) to load into the pipeline")
    ap.add_argument("--out", default=None, help="report folder (default outputs/shapes_eval/<model name>)")
    ap.add_argument("--split", choices=list(E.SPLITS), default="test",
                    help="test (ShapesEval, default) or validation (for choosing hyper-parameters)")
    ap.add_argument("--images", type=_at_least_one, default=4, help="images per prompt entry")
    ap.add_argument("--max-per-task", type=_at_least_one, default=None, help="first N entries of each task only")
    ap.add_argument("--steps", type=_at_least_one, default=20)
    ap.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=_at_least_one, default=64)
    ap.add_argument("--threads", type=_at_least_one, default=1)
    ap.add_argument("--reconstructions", action="store_true", help="score the VAE's reconstructions instead")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    if not (model / "model_index.json").is_file() and not (args.reconstructions and (model / "vae").is_dir()):
        print(f"error: {model} is not a diffusers pipeline folder (no model_index.json)", file=sys.stderr)
        return 2
    if args.lora and not Path(args.lora).exists():
        print(f"error: LoRA folder {args.lora} does not exist", file=sys.stderr)
        return 2
    if args.lora and (why := _unreadable_lora(Path(args.lora))):
        print(f"error: --lora {args.lora}: {why}", file=sys.stderr)
        return 2
    name = model.name + ("_recon" if args.reconstructions else "") + (f"_{Path(args.lora).name}" if args.lora else "")
    out = Path(args.out or f"outputs/shapes_eval/{name}" + ("" if args.split == "test" else f"_{args.split}"))
    if (out / "report.json").exists() and not args.overwrite:
        print(f"error: {out}/report.json exists; pass --overwrite or another --out", file=sys.stderr)
        return 2
    from fpo_diffusion.checkpoint import WRITE_ERRORS, write_failure

    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.reconstructions:
            E.evaluate_reconstructions(model / "vae", out, n_images=args.images, max_per_task=args.max_per_task,
                                       seed=args.seed, split=args.split)
        else:
            E.evaluate_model(model, out, lora_dir=args.lora, n_images=args.images, max_per_task=args.max_per_task,
                             steps=args.steps, guidance_scale=args.cfg, seed=args.seed, batch_size=args.batch_size,
                             split=args.split)
    except WRITE_ERRORS as e:
        if not isinstance(e, OSError) and "write" not in str(e).lower() and "os error" not in str(e).lower():
            raise
        print(f"error: could not write the report to --out {out}: {write_failure(e)}", file=sys.stderr)
        return 2
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
