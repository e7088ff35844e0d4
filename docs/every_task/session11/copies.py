"""copies.py PROMPTS.jsonl N [LORA]: N images per prompt at seeds 1000+ (10 steps, CFG 4.5): right by GenEval's rule,
right with exact counts (every asked class exactly as often as asked), objects per image (session 11)."""
import sys, json
import torch
torch.set_num_threads(1)
from fpo_diffusion.shapes.evaluate import load_pipeline, sample
from fpo_diffusion.shapes.plugin import DEFAULT_ASSET
from fpo_diffusion.shapes.detector import ShapesDetector
from fpo_diffusion.shapes.reward import shapes_score
metas = [json.loads(l) for l in open(sys.argv[1])]
n = int(sys.argv[2]); lora = sys.argv[3] if len(sys.argv) > 3 else None
pipe = load_pipeline(DEFAULT_ASSET, lora)
det = ShapesDetector()
for m in metas:
    imgs = sample(pipe, [m["prompt"]] * n, list(range(1000, 1000 + n)), steps=10)
    ok = sum(shapes_score(im, m)[0] > 0.5 for im in imgs)
    ex = sum(shapes_score(im, m, exact_counts=True)[0] > 0.5 for im in imgs)
    objs = sum(sum(len(v) for v in det.detect(im).values()) for im in imgs) / n
    print(f"{m['prompt']}: right {ok}/{n}, right with exact counts {ex}/{n}, objects per image {objs:.2f}")
