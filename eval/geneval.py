"""GenEval: generate samples, score them as the official evaluator, summarise.

    python eval/geneval.py generate --model PATH --family sd --metadata evaluation_metadata.jsonl --out OUT
        [--lora DIR] [--n-samples 4] [--steps 50] [--cfg 9.0] [--height 512 --width 512] [--seed 42]
    python eval/geneval.py score OUT --detector MASK2FORMER_DIR [--outfile OUT/results.jsonl]
    python eval/geneval.py summary OUT/results.jsonl [OTHER/results.jsonl] [--names base lora] [--report DIR]

``generate`` splits prompts across ``accelerate launch`` ranks and resumes. ``--detector``
takes a ``Mask2FormerForUniversalSegmentation`` folder or ``module:attr`` (a detector object,
or a class/factory called without arguments; without it ``score`` says what to pass and exits 2).
Errors: one line on stderr, exit status 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.geneval.metadata import GenEvalInputError  # noqa: E402


def _dtype(name: str | None, device: str):
    import torch

    if name is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_detector(spec: str, device: str = "cpu"):
    """A detector from a Mask2Former folder or a ``module:attr`` spec."""
    if Path(spec).is_dir():
        import json

        try:  # a folder of another model (CLIP, a pipeline...) is refused here, not after a long load
            arch = json.loads((Path(spec) / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            arch = None  # no readable config: the detector says what is missing when it loads
        if arch is not None and not any("Mask2Former" in str(a) for a in arch):
            raise GenEvalInputError(f"--detector {spec} is not a Mask2Former folder (its config.json names "
                                    f"{', '.join(map(str, arch)) or 'no Mask2Former architecture'}); download "
                                    f"{DETECTOR_HUB_ID} or pass module:attr")
        from rewards.geneval.mask2former import Mask2FormerDetector

        return Mask2FormerDetector(spec, device=device)
    if ":" in spec:
        mod, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise GenEvalInputError(f"cannot import detector {spec!r}: {e}") from None
        det = obj() if isinstance(obj, type) else obj
        if not callable(det):
            raise GenEvalInputError(f"--detector {spec} is a {type(det).__name__}, not a detector (a callable taking a "
                                    f"list of images and returning their detections)")
        return det
    raise GenEvalInputError(f"detector {spec!r} is neither a Mask2Former folder nor module:attr")


def cmd_generate(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from fpo_diffusion import policies
    from rewards.geneval.generate import GenerateConfig, generate
    from rewards.geneval.metadata import load_metadata

    metadata = load_metadata(args.metadata)
    if args.lora is not None and not Path(args.lora).is_dir():
        raise GenEvalInputError(f"LoRA folder {args.lora} does not exist")
    state = PartialState()
    device = args.device or str(state.device)
    policy = policies.load_policy(args.family, args.model, dtype=_dtype(args.dtype, device), device=device)
    if args.lora is not None:
        policy.pipeline.load_lora_weights(args.lora)
    cfg = GenerateConfig(n_samples=args.n_samples, steps=args.steps, guidance_scale=args.cfg, height=args.height,
                         width=args.width, seed=args.seed, batch_size=args.batch_size)
    done = generate(policy, metadata, args.out, cfg, rank=state.process_index, world_size=state.num_processes,
                    device=device if not device.startswith("mps") else "cpu",
                    log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None)
    print(f"rank {state.process_index}: generated {len(done)} prompts into {args.out}")
    return 0


DETECTOR_HUB_ID = "facebook/mask2former-swin-small-coco-instance"
"""The Mask2Former Swin-S COCO instance checkpoint on the Hugging Face hub (``transformers`` format)."""


def cmd_score(args: argparse.Namespace) -> int:
    from rewards.geneval.rules import Thresholds
    from rewards.geneval.score import find_prompt_folders, score_images, write_results

    if args.detector is None:
        print(f"geneval score: error: pass --detector DIR, a Mask2Former folder (download it once: huggingface-cli "
              f"download {DETECTOR_HUB_ID} --local-dir DIR), or --detector module:attr", file=sys.stderr)
        return 2
    outfile = Path(args.outfile) if args.outfile else Path(args.imagedir) / "results.jsonl"
    if outfile.exists() and not args.overwrite:
        raise GenEvalInputError(f"{outfile} exists (pass --overwrite to replace it)")
    find_prompt_folders(args.imagedir)  # validate the whole tree before loading any model
    detector = load_detector(args.detector, args.device)
    from rewards.geneval.color import ClipColorClassifier

    color_fn = ClipColorClassifier(args.clip_model, args.clip_pretrained, device=args.device)
    th = Thresholds(detection=args.threshold, counting=args.counting_threshold, max_objects=args.max_objects,
                    nms=args.max_overlap, position=args.position_threshold)
    n = write_results(score_images(args.imagedir, detector, color_fn, th), outfile, overwrite=args.overwrite)
    print(f"scored {n} images -> {outfile}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from rewards.geneval.summary import format_text, load_results, summarize, write_report

    names = args.names or [Path(p).parent.name or Path(p).stem for p in args.results]
    if len(names) != len(args.results) or len(set(names)) != len(names):
        raise GenEvalInputError("--names needs one distinct name per results file")
    runs = {name: load_results(p) for name, p in zip(names, args.results)}
    for name, rows in runs.items():
        print(f"# {name}\n{format_text(summarize(rows))}\n")
    if args.report:
        out = Path(args.report)
        if (out / "report.md").exists() and not args.overwrite:
            raise GenEvalInputError(f"{out / 'report.md'} exists (pass --overwrite to replace it)")
        paths = write_report(runs, out)
        print(f"report: {paths['markdown']} and {paths['html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geneval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample images in the official layout")
    g.add_argument("--model", required=True, help="diffusers pipeline folder (or merged checkpoint)")
    g.add_argument("--family", default="auto", help="sd, sdxl, sd3, flux or auto")
    g.add_argument("--lora", default=None, help="LoRA folder in diffusers format")
    g.add_argument("--metadata", required=True, help="evaluation_metadata.jsonl")
    g.add_argument("--out", required=True)
    g.add_argument("--n-samples", type=int, default=4)
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--cfg", type=float, default=9.0)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--verbose", action="store_true")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("score", help="official per-image results JSONL")
    s.add_argument("imagedir")
    s.add_argument("--detector", default=None,
                   help=f"Mask2Former folder (a download of {DETECTOR_HUB_ID}) or module:attr")
    s.add_argument("--outfile", default=None, help="default: <imagedir>/results.jsonl")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--device", default="cpu")
    s.add_argument("--clip-model", default="ViT-L-14", help="open_clip model of the colour classifier")
    s.add_argument("--clip-pretrained", default="openai",
                   help="its open_clip weights (openai: OpenAI's ViT-L/14, fetched by open_clip on first use)")
    s.add_argument("--threshold", type=float, default=0.3)
    s.add_argument("--counting-threshold", type=float, default=0.9)
    s.add_argument("--max-objects", type=int, default=16)
    s.add_argument("--max-overlap", type=float, default=1.0)
    s.add_argument("--position-threshold", type=float, default=0.1)
    s.set_defaults(fn=cmd_score)

    m = sub.add_parser("summary", help="scores and report")
    m.add_argument("results", nargs="+")
    m.add_argument("--names", nargs="+", default=None)
    m.add_argument("--report", default=None, help="folder for report.md, report.html and failure grids")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=cmd_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (GenEvalInputError, FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"geneval {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
