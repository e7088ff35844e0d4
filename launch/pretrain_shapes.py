"""Pretrain the shapes world's text-to-image model (DESIGN.md, "The embedded world").

    python launch/pretrain_shapes.py --stage vae --minutes 15
    python launch/pretrain_shapes.py --stage decoder --minutes 20      # optional: decoder only, encoder frozen
    python launch/pretrain_shapes.py --stage transformer --minutes 60

Each stage is seeded, resumable (re-run the same command: it continues from
``--work-dir/<stage>/ckpt.pt``) and stops after ``--minutes`` of training. The result is a stock
``StableDiffusion3Pipeline`` folder (default ``fpo_diffusion/assets/shapes_sd3``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _apply_overrides(cfg, args) -> None:
    """The command-line budget, batch size and learning rate of any stage's config."""
    if args.minutes is not None:
        cfg.minutes = args.minutes
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if args.lr:
        cfg.lr = args.lr


def main(argv: list[str] | None = None) -> int:
    import torch

    from fpo_diffusion.shapes import pretrain as P

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "decoder", "transformer"], required=True)
    ap.add_argument("--minutes", type=float, default=None, help="training time budget of the stage")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: leave cores to others)")
    ap.add_argument("--work-dir", default="runs/pretrain_shapes", help="stage checkpoints (resume from here)")
    ap.add_argument("--out", default=str(P.DEFAULT_ASSET), help="pipeline folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-from", default=None, help="vae stage: start from this AutoencoderKL folder; transformer stage: from this stage ckpt.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work_dir)
    if args.stage == "vae":
        cfg = P.VAEConfig(seed=args.seed, init_from=args.init_from)
        _apply_overrides(cfg, args)
        P.train_vae(cfg, work, out)
    elif args.stage == "decoder":
        if not (out / "vae" / "config.json").is_file():
            print(f"error: no trained VAE at {out / 'vae'}; run --stage vae first", file=sys.stderr)
            return 2
        cfg = P.DecoderConfig(seed=args.seed)
        _apply_overrides(cfg, args)
        P.train_decoder(cfg, work, out)
    else:
        if not (out / "vae" / "config.json").is_file():
            print(f"error: no trained VAE at {out / 'vae'}; run --stage vae first", file=sys.stderr)
            return 2
        cfg = P.TransformerConfig(seed=args.seed, device=args.device, init_from=args.init_from)
        _apply_overrides(cfg, args)
        P.train_transformer(cfg, work, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
