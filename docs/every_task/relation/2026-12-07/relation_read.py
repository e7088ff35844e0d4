"""How often a model draws a position prompt's relation, and how often its opposite (issue 21).

    python docs/every_task/relation/2026-12-07/relation_read.py EVAL_DIR/report.json ...

Reads the per-image records of ``eval/shapes.py``'s report: for each position entry ("a ring left of an
arrow"), whether both objects were found and their relation read, whether the asked relation holds (the
task's score) and whether the opposite one does ("right of": diagonal layouts can hold neither). A model
that ignores the relation words draws both equally often.
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from fpo_diffusion.shapes.pretrain import FLIPPED  # noqa: E402  (each relation and its opposite)

for path in sys.argv[1:]:
    records = [r for r in json.load(open(path))["records"] if r["tag"] == "position"]
    read = right = opposite = 0
    diff = []  # per image: asked relation holds minus opposite holds
    for r in records:
        wanted = r["metadata"]["include"][1]["position"][0]
        if r["correct"]:
            read += 1
            right += 1
            diff.append(1)
            continue
        found = re.search(r"found (.*) target", r["reason"])
        if found:
            read += 1
            opp = FLIPPED[wanted] in {s.strip() for s in found.group(1).split(" and ")}
            opposite += opp
            diff.append(-int(opp))
        else:
            diff.append(0)
    n = len(records)
    mean = sum(diff) / n
    se = (sum((d - mean) ** 2 for d in diff) / (n - 1) / n) ** 0.5
    print(f"{path}: {n} images; both objects found and their relation read {read / n:.3f}; "
          f"the asked relation {right / n:.3f}; the opposite relation {opposite / n:.3f} "
          f"(difference {mean:+.3f} +- {se:.3f})")
