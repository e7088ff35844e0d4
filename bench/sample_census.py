"""What the images of a ShapesEval report really show, beyond right / wrong: a census of the detected objects.

A reward that rises is believed only after looking at the samples. This reads the images of one or more
``eval/shapes.py`` reports (``report.json`` and its ``images/``) with the shapes detector and counts, per task:

* objects per image (any class), and the share of images with more copies of the asked classes than asked;
* accuracy split into right with only the asked objects and right with extra copies (GenEval's rules read one
  detection per class outside counting, so extra copies can pass them: BENCHMARKS.md, "Position learns, by
  drawing extra copies"), and the accuracy under exact counts (the rule of the rewards' ``exact_counts`` option:
  every asked class exactly as often as asked), with its standard error over images;
* color_attr: how the two asked objects are coloured (both right, swapped, one colour on both, another colour, an
  asked object missing);
* colors: the colour read on the asked object when it is not the asked one (``orange -> yellow``: palette drift);
* colors and color_attr: the mean colour confidence of the asked objects in the right images (the shapes reward's
  ``color_confidence``: 1.0 for a clean render, 0.5 half way to another colour): a palette drifting before the
  verdicts fail;
* counting: the palette of the objects drawn (counting prompts name no colour).

    python bench/sample_census.py BASE_REPORT_DIR RUN_REPORT_DIR [...] [--labels base run] [--out census.json]

Prints a Markdown table per section, a column per report; ``--out`` writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import _common  # noqa: F401  (the repository root on sys.path, offline hub)
from PIL import Image

from fpo_diffusion.shapes.detector import analyse, detections
from fpo_diffusion.shapes.reward import color_clause_confidence
from rewards.geneval.metadata import with_exact_counts
from rewards.geneval.rules import Thresholds, evaluate, filter_detections

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
BINDING = ("both right", "swapped", "one colour on both", "another colour", "an asked object missing")


def _binding(meta: dict, found: list) -> str:
    """How the two asked objects of a color_attr image are coloured (``found``: ``(class, colour)`` pairs)."""
    a, b = meta["include"]
    ca = {col for cls, col in found if cls == a["class"]}
    cb = {col for cls, col in found if cls == b["class"]}
    if not ca or not cb:
        return "an asked object missing"
    if a["color"] in ca and b["color"] in cb:
        return "both right"
    if b["color"] in ca and a["color"] in cb:
        return "swapped"
    return "one colour on both" if ca & cb else "another colour"


def census(report_dir: Path, label: str | None = None) -> dict:
    """The census of one report folder: ``{"tasks": {tag: {...}}, "binding": {...}, "colors_misread": {...},
    "counting_palette": {...}}`` (shares of images or objects, rounded to 3 places)."""
    records = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))["records"]
    per: dict[str, dict[str, float]] = {}
    binding: collections.Counter = collections.Counter()
    misread: collections.Counter = collections.Counter()
    palette: collections.Counter = collections.Counter()
    n_tag: collections.Counter = collections.Counter()
    conf: dict[str, list[float]] = collections.defaultdict(list)  # colour confidence of right colour images
    for r in records:
        tag, meta = r["tag"], r["metadata"]
        image = Image.open(report_dir / r["file"])
        comps = analyse(image)  # once per image: the rules below and the census read the same components
        dets = detections(comps)
        found = [(c.shape, c.color) for c in comps if c.shape is not None]
        if evaluate(dets, meta, image=image).correct != bool(r["correct"]):  # the report's own rules, re-applied
            raise SystemExit(f"{report_dir}: {r['file']} scores differently from its report; not a shapes report?")
        asked = {q["class"] for q in meta["include"]}
        want = sum(int(q["count"]) for q in meta["include"])
        extra = sum(1 for cls, _ in found if cls in asked) > want
        s = per.setdefault(tag, collections.defaultdict(float))
        n_tag[tag] += 1
        s["objects per image"] += len(found)
        s["extra copies of the asked classes"] += extra
        s["accuracy"] += bool(r["correct"])
        s["right with only the asked objects"] += bool(r["correct"]) and not extra
        s["right with extra copies"] += bool(r["correct"]) and extra
        s["accuracy, exact counts"] += evaluate(dets, with_exact_counts(meta), image=image).correct
        if tag == "color_attr" and len(meta["include"]) == 2:
            binding[_binding(meta, found)] += 1
        elif tag == "colors":
            (q,) = meta["include"]
            got = sorted({col for cls, col in found if cls == q["class"]})
            if q["color"] not in got:
                misread[f"{q['color']} -> {'/'.join(got) or 'none'}"] += 1
        elif tag == "counting":
            palette.update(col for _, col in found)
        if tag in ("colors", "color_attr") and r["correct"]:
            conf[tag].append(color_clause_confidence(comps, filter_detections(dets, meta.get("tag"), Thresholds()), meta))

    def shares(c: collections.Counter, n: int) -> dict[str, float]:
        return {k: round(v / n, 3) for k, v in c.most_common()} if n else {}

    tasks = {t: {k: round(v / n_tag[t], 3) for k, v in s.items()} | {"images": n_tag[t]} for t, s in per.items()}
    for t, v in conf.items():
        tasks[t]["colour confidence, right images"] = round(sum(v) / len(v), 3)
    for t, s in tasks.items():
        p = s["accuracy, exact counts"]
        s["accuracy, exact counts: SE"] = round(math.sqrt(p * (1 - p) / s["images"]), 3)
    if set(tasks) == set(TASKS):  # GenEval's overall: the mean of the six task accuracies
        exact = [tasks[t]["accuracy, exact counts"] for t in TASKS]
        se = [tasks[t]["accuracy, exact counts: SE"] for t in TASKS]
        tasks["overall"] = {"accuracy": round(sum(tasks[t]["accuracy"] for t in TASKS) / len(TASKS), 3),
                            "accuracy, exact counts": round(sum(exact) / len(TASKS), 3),
                            "accuracy, exact counts: SE": round(math.sqrt(sum(x * x for x in se)) / len(TASKS), 3)}
    return {"report": str(report_dir), "label": label or report_dir.name, "tasks": tasks,
            "binding": shares(binding, sum(binding.values())),
            "colors_misread": {k: v for k, v in misread.most_common()} | {"of images": n_tag["colors"]},
            "counting_palette": shares(palette, sum(palette.values()))}


def _table(title: str, rows: list[str], cols: list[dict], cell) -> str:
    lines = [f"\n### {title}\n", "| | " + " | ".join(c["label"] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {r} | " + " | ".join(cell(c, r) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def render(results: list[dict]) -> str:
    out = []
    for tag in dict.fromkeys(t for c in results for t in c["tasks"]):
        keys = list(dict.fromkeys(k for c in results for k in c["tasks"].get(tag, {})))
        out.append(_table(tag, keys, results, lambda c, k, t=tag: f"{c['tasks'].get(t, {}).get(k, '')}"))
    if any(c["binding"] for c in results):
        out.append(_table("color_attr: how the two asked objects are coloured (share of images)", list(BINDING),
                          results, lambda c, k: f"{c['binding'].get(k, 0.0)}"))
    keys = list(dict.fromkeys(k for c in results for k in c["colors_misread"] if k != "of images"))
    if keys:
        out.append(_table("colors: the asked colour read as another (images)", keys, results,
                          lambda c, k: f"{c['colors_misread'].get(k, 0)} / {c['colors_misread']['of images']}"))
    keys = list(dict.fromkeys(k for c in results for k in c["counting_palette"]))
    if keys:
        out.append(_table("counting: palette of the objects drawn (share of objects)", keys, results,
                          lambda c, k: f"{c['counting_palette'].get(k, 0.0)}"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="eval/shapes.py output folders (report.json + images/)")
    ap.add_argument("--labels", nargs="+", help="a column name per report (default: the folder names)")
    ap.add_argument("--out", type=Path, help="write the census as JSON here (an existing file is not overwritten)")
    a = ap.parse_args(argv)
    missing = [str(r) for r in a.reports if not (r / "report.json").is_file()]
    if missing:
        ap.error(f"not an eval/shapes.py report folder (no report.json): {', '.join(missing)}")
    if a.labels is not None and len(a.labels) != len(a.reports):
        ap.error(f"--labels: {len(a.labels)} names for {len(a.reports)} reports")
    if a.out is not None and a.out.exists():
        ap.error(f"--out {a.out} exists; choose a new path")
    results = [census(r, lab) for r, lab in zip(a.reports, a.labels or [None] * len(a.reports))]
    print(render(results))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
