"""Pretrain the shapes world's text-to-image model (ShapesEval 2; docs/architecture.md, "The shapes world").

    python launch/pretrain_shapes.py --out DIR                 # every stage: vae, then transformer
    python launch/pretrain_shapes.py --out DIR --stage vae     # one stage (also: decoder, transformer)
    python launch/pretrain_shapes.py --out DIR --stage transformer --init-pipeline fpo_diffusion/assets/shapes_sd3 \
        --steps 1000 --lr 2e-4 --relation-weight 0.1           # continue pretraining with the relation objective
                                                               # (DIR/vae: a copy of the shipped VAE)
    python launch/pretrain_shapes.py --out DIR --stage relations   # the relation-aware base: the shipped model
                                                               # continued 4500 steps with relation captions and
                                                               # the relation objective (about 30 minutes)

Seeded and deterministic (a resumed stage is bit-for-bit the uninterrupted one on CPU). Each
stage has a fixed number of steps; ``--minutes`` caps one call's wall-clock: the stage
checkpoints under ``--work-dir/<stage>/ckpt.pt`` and stops, and the same command continues it.
Progress is shown per stage. The result is a stock ``StableDiffusion3Pipeline`` folder
(default ``fpo_diffusion/assets/shapes_sd3``; the shipped one was made by this command with
the defaults, see the README).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _apply_overrides(cfg, args) -> None:
    """The command-line length, batch size and learning rate of any stage's config."""
    if args.steps is not None:
        cfg.steps = args.steps
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if args.lr:
        cfg.lr = args.lr


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def main(argv: list[str] | None = None) -> int:
    import torch

    from fpo_diffusion.shapes import pretrain as P
    from fpo_diffusion.shapes.plugin import DEFAULT_ASSET

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "vae", "decoder", "transformer", "relations"], default="all",
                    help="all (default) = vae, then transformer; relations = continued pretraining of a finished "
                         "pipeline (--init-pipeline, default the shipped model) that ties relations to words")
    ap.add_argument("--minutes", type=_positive(float), default=None,
                    help="wall-clock cap of this call (stops with a checkpoint; re-run to continue)")
    ap.add_argument("--steps", type=_positive(int), default=None, help="length of the stage (one stage only)")
    ap.add_argument("--threads", type=_positive(int), default=1,
                    help="torch CPU threads (default 1: one thread is robust to other jobs on the cores)")
    ap.add_argument("--work-dir", default=None, help="stage checkpoints (resume from here); default OUT/../.pretrain-OUTNAME")
    ap.add_argument("--out", default=str(DEFAULT_ASSET), help="pipeline folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=_positive(int), default=None)
    ap.add_argument("--lr", type=_positive(float), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-pipeline", default=None, metavar="DIR",
                    help="transformer stage: start the text encoders and transformer from this pipeline folder "
                         "(continued pretraining, e.g. of the shipped model)")
    ap.add_argument("--relation-weight", type=float, default=0.0,
                    help="transformer stage: weight of the text-side relation objective (0: off, the shipped recipe)")
    args = ap.parse_args(argv)
    if args.stage == "all" and (args.steps or args.batch_size or args.lr):
        ap.error("--steps/--batch-size/--lr apply to one stage: pass --stage too")
    if args.stage not in ("transformer", "relations") and args.init_pipeline:
        ap.error("--init-pipeline applies to the transformer and relations stages: pass --stage")
    if args.stage != "transformer" and args.relation_weight:
        ap.error("--relation-weight applies to the transformer stage (the relations stage sets its own)")
    if not 0.0 <= args.relation_weight < float("inf"):
        ap.error(f"--relation-weight must be finite and >= 0, got {args.relation_weight}")
    if args.init_pipeline and not (Path(args.init_pipeline) / "transformer" / "config.json").is_file():
        ap.error(f"--init-pipeline {args.init_pipeline}: not a pipeline folder with a transformer")
    if args.stage == "relations":
        args.init_pipeline = args.init_pipeline or str(DEFAULT_ASSET)
        if Path(args.out).resolve() == Path(args.init_pipeline).resolve():
            print(f"error: --out {args.out}: the relations stage would overwrite the pipeline it starts from; "
                  "pass another folder", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.parent / f".pretrain-{out.name}"
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    stages = ["vae", "transformer"] if args.stage == "all" else [args.stage]
    stage_table = {  # stage -> (its config, its training function); "relations" is a transformer stage
        "vae": (P.VAEConfig, P.train_vae), "decoder": (P.DecoderConfig, P.train_decoder),
        "transformer": (P.TransformerConfig, P.train_transformer),
        "relations": (lambda seed: P.relations_config(args.init_pipeline, seed), P.train_transformer)}
    t0 = time.time()
    try:
        for stage in stages:
            if stage == "relations" and not (out / "vae" / "config.json").is_file():
                import shutil  # the VAE is the starting pipeline's, unchanged

                shutil.copytree(Path(args.init_pipeline) / "vae", out / "vae", dirs_exist_ok=True)
            if stage != "vae" and not (out / "vae" / "config.json").is_file():
                print(f"error: no trained VAE at {out / 'vae'}; run --stage vae first", file=sys.stderr)
                return 2
            make_config, train = stage_table[stage]
            cfg = make_config(seed=args.seed)
            if stage in ("transformer", "relations"):
                cfg.device = args.device
            if stage == "transformer":
                cfg.init_pipeline, cfg.relation_weight = args.init_pipeline, args.relation_weight
            _apply_overrides(cfg, args)
            if deadline is not None:
                cfg.minutes = max(0.0, (deadline - time.time()) / 60.0)
            train(cfg, work, out)
    except P.StageIncomplete as e:
        print(f"{e} (work dir {work})")
        return 3
    print(f"pretraining done in {(time.time() - t0) / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    from fpo_diffusion.cli import run_cli

    raise SystemExit(run_cli(main, prog="pretrain_shapes.py"))
