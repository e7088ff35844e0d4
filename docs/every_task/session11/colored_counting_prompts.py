"""Training prompt files: embedded:shapes with a fraction of its counting entries naming a colour (session 11).

    python docs/every_task/session11/colored_counting_prompts.py FRACTION OUT.jsonl   # 1.0 and 0.5 were run

The colour of each coloured counting entry is one whose (class, colour) pair is a training `colors` combination,
so no held-out class-colour combination enters training."""
import json, sys
import numpy as np
from fpo_diffusion.shapes.plugin import training_prompts
from fpo_diffusion.shapes.scenes import train_task_metadata, test_and_validation_prompts
from fpo_diffusion.shapes.world import NUMBERS, plural

frac = float(sys.argv[1]); out = sys.argv[2]
allowed = {}
for m in train_task_metadata()["colors"]:
    r = m["include"][0]
    allowed.setdefault(r["class"], []).append(r["color"])
rng = np.random.default_rng(11)
held = test_and_validation_prompts()
rows, n_col = [], 0
for m in training_prompts():
    if m["tag"] == "counting" and rng.random() < frac:
        r = m["include"][0]
        cols = allowed.get(r["class"], [])
        if cols:
            c = cols[int(rng.integers(len(cols)))]
            n = r["count"]
            m = {"tag": "counting", "include": [{"class": r["class"], "count": n, "color": c}],
                 "exclude": m["exclude"], "prompt": f"a photo of {NUMBERS[n]} {c} {plural(r['class'], n)}"}
            n_col += 1
    assert m["prompt"] not in held
    rows.append(m)
with open(out, "w") as f:
    for m in rows:
        f.write(json.dumps(m) + "\n")
print(len(rows), "rows,", n_col, "coloured counting;", {k: len(v) for k, v in allowed.items()})
