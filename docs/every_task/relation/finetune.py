"""Continued pretraining of the shipped shapes model, with or without the text-side relation objective (issue 21).

    OMP_NUM_THREADS=1 python docs/every_task/relation/finetune.py ctrl 0   runs/relation   # the control
    OMP_NUM_THREADS=1 python docs/every_task/relation/finetune.py rel 0.5  runs/relation   # relation_weight 0.5
    # (2026-12-07) the same with relations stated in half of the two-object captions, 1500 steps:
    OMP_NUM_THREADS=1 python docs/every_task/relation/finetune.py rel50 0.5 runs/relation 0.5 1500
    # relations stated in every two-object caption, two-object scenes 60 % of the pool:
    OMP_NUM_THREADS=1 python docs/every_task/relation/finetune.py heavy 0.1 runs/relation \
        '{"p_position": 1.0, "p_all_classes": 1.0, "kinds": [0.1, 0.6, 0.1, 0.2]}' 1500

STEPS (default 1000) transformer-stage steps from the shipped weights (lr 5e-4, warm-up 200, cosine; EMA 0.99; a 10 000-scene
latent pool written with CAPTIONS, default the shipped CaptionStyle; seed 0), the shipped VAE; the pipeline is
written to OUTROOT/ARM/pipe. About 7.5 minutes per 1000 steps on one thread beside another job.
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch  # noqa: E402

from fpo_diffusion.shapes import pretrain as P  # noqa: E402
from fpo_diffusion.shapes.captions import CaptionStyle  # noqa: E402
from fpo_diffusion.shapes.plugin import DEFAULT_ASSET  # noqa: E402

arm, weight, root = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]) / sys.argv[1]
# CAPTIONS: the pool's p_position, or a JSON object of CaptionStyle fields
style = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
style = {"p_position": style} if isinstance(style, (int, float)) else style
style = CaptionStyle(**{k: tuple(v) if isinstance(v, list) else v for k, v in style.items()})
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 1000
torch.set_num_threads(1)
pipe, work = root / "pipe", root / "work"
if not (pipe / "vae").is_dir():
    pipe.mkdir(parents=True, exist_ok=True)
    shutil.copytree(DEFAULT_ASSET / "vae", pipe / "vae")
cfg = P.TransformerConfig(steps=steps, lr=5e-4, captions=style, pool_size=10000, ema_decay=0.99, init_pipeline=str(DEFAULT_ASSET),
                          relation_weight=weight, seed=0)
P.train_transformer(cfg, work, pipe)
