"""Position memorisation diagnostic (session 11): the four relations of one training class pair, both orders
(8 prompts; the one- and two-prompt files are its first line and its first two).

    python docs/every_task/session11/position_prompts.py OUT.jsonl
"""
import json, collections, sys
from fpo_diffusion.shapes.scenes import train_task_metadata, position
pos = train_task_metadata()["position"]
pairs = collections.Counter(frozenset((m["include"][0]["class"], m["include"][1]["class"])) for m in pos)
# the first class pair (sorted) with all 8 of its prompts in training, circle and ring left out (alike shapes)
full = sorted(sorted(p) for p, c in pairs.items() if c == 8)
pair = next(p for p in full if "circle" not in p and "ring" not in p)
n = 8
a, b = sorted(pair)
print("pair", a, b, "training prompts of it:", n)
train = {m["prompt"] for m in pos}
rows = [position(x, rel, y) for (x, y) in ((a, b), (b, a)) for rel in ("left of", "right of", "above", "below")]
print(sum(r["prompt"] in train for r in rows), "of", len(rows), "are training prompts")
out = sys.argv[1] if len(sys.argv) > 1 else "pos_memo.jsonl"
with open(out, "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
