"""Export a trained LoRA for stock diffusers pipelines.

    python launch/export_lora.py --run runs/fpo-shapes --out exported/ [--checkpoint latest|PATH] [--ema]
        [--merge | --format kohya]

Without ``--merge`` writes ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(out)``
accepts; with ``--merge`` fuses the LoRA and saves a whole pipeline with ``save_pretrained``; with
``--format kohya`` (SD/SDXL) writes ``<run name>.safetensors`` in the kohya-ss layout that
AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI load (and diffusers' ``load_lora_weights`` too).
"""
from __future__ import annotations

import argparse
import sys

from fpo_diffusion.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run's output_dir")
    p.add_argument("--out", required=True, help="new (or empty) folder to write to")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint folder")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema_decay must have been on)")
    p.add_argument("--merge", action="store_true", help="fuse the LoRA and save a full pipeline")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers",
                   help="diffusers (default) or kohya: one file in the kohya-ss layout for A1111/ComfyUI (SD, SDXL)")
    a = p.parse_args(argv)
    from fpo_diffusion.export import export_run

    out = export_run(a.run, a.out, a.checkpoint, ema=a.ema, merge=a.merge, format=a.format)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export_lora"))
