"""``heavy`` continued for 3000 more transformer-stage steps (4500 in all), from its own stage checkpoint (the
relation heads included), on a fresh pool (seed 1) with the same captions (issue 21, 2026-12-07).

    OMP_NUM_THREADS=1 python docs/every_task/relation/finetune.py heavy 0.1 ROOT \\
        '{"p_position": 1.0, "p_all_classes": 1.0, "kinds": [0.1, 0.6, 0.1, 0.2]}' 1500
    OMP_NUM_THREADS=1 python docs/every_task/relation/2026-12-07/heavy_long.py ROOT   # about 22 minutes on one thread

The pipeline is written to ROOT/heavy_long/pipe.
"""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
import torch  # noqa: E402

from fpo_diffusion.shapes import pretrain as P  # noqa: E402
from fpo_diffusion.shapes.captions import CaptionStyle  # noqa: E402

torch.set_num_threads(1)
root = Path(sys.argv[1])
pipe, work = root / "heavy_long" / "pipe", root / "heavy_long" / "work"
if not (pipe / "vae").is_dir():
    pipe.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "heavy" / "pipe" / "vae", pipe / "vae")
style = CaptionStyle(p_position=1.0, p_all_classes=1.0, kinds=(0.1, 0.6, 0.1, 0.2))
cfg = P.TransformerConfig(steps=3000, lr=5e-4, captions=style, pool_size=10000, ema_decay=0.99, relation_weight=0.1,
                          init_from=str(root / "heavy" / "work" / "transformer" / "ckpt.pt"), seed=1)
P.train_transformer(cfg, work, pipe)
