"""Before/after figures for a training run on the shapes model.

    python eval/compare_shapes.py RUN_DIR BEFORE_EVAL AFTER_EVAL --out docs/default_run

RUN_DIR is a training output folder (its ``metrics.jsonl``); BEFORE_EVAL / AFTER_EVAL are
``eval/shapes.py`` report folders of the base model and of the run's LoRA (same seeds).
Writes ``curves.png`` (training reward, own-sample CFM loss ratio, foreground share, and the
training reward per GenEval task when the run's ``samples.jsonl`` records task tags),
``before_<task>.png`` / ``after_<task>.png`` (the same held-out prompts and seeds side by side,
a green or red frame for correct / wrong), ``comparison.md`` (per-task table with the change)
and copies of ``metrics.jsonl`` and both ``report.json`` (as ``shapes_eval_{before,after}.json``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ENTRIES_PER_GRID = 12


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def task_curves(samples: list[dict], window: int = 25) -> dict[str, tuple[list[float], list[float]]]:
    """Mean training reward per task over consecutive ``window``-iteration blocks:
    ``{tag: (block centres, means)}``; samples without a ``tag`` are left out."""
    sums: dict[str, dict[int, list[float]]] = {}
    for s in samples:
        if s.get("tag"):
            acc = sums.setdefault(s["tag"], {}).setdefault(s["iteration"] // window, [0.0, 0])
            acc[0] += s["reward"]
            acc[1] += 1
    return {tag: ([(b + 0.5) * window for b in sorted(blocks)], [blocks[b][0] / blocks[b][1] for b in sorted(blocks)])
            for tag, blocks in sums.items()}


def reward_title(run: Path) -> str:
    """The training-reward panel's title, naming the run's reward as its ``config.yaml`` sets it: the shapes
    reward with its ``mode`` (``strict``: 0/1 per image, the default; ``partial``: partial credit)."""
    import yaml

    try:
        reward = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("reward") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return "training reward"
    names = list(reward.get("weights") or {})
    if names == ["shapes"]:
        mode = ((reward.get("options") or {}).get("shapes") or {}).get("mode", "strict")
        return "training reward (shapes, " + ("partial credit)" if mode == "partial" else f"{mode}: 0/1)")
    return f"training reward ({', '.join(names)})" if names else "training reward"


def curves(metrics: list[dict], path: Path, samples: list[dict] | None = None,
           reward_label: str = "training reward") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [m["iteration"] for m in metrics]
    panels = [("reward/mean", reward_label),
              ("policy/cfm_loss_ratio_to_start", "own-sample CFM loss / start"),
              ("policy/foreground_share", "foreground share")]
    per_task = task_curves(samples or [])
    n_axes = len(panels) + bool(per_task)
    fig, axes = plt.subplots(1, n_axes, figsize=(4.2 * n_axes, 3.4))
    for ax, (key, title) in zip(axes, panels):
        ys = [m.get(key, float("nan")) for m in metrics]
        ax.plot(it, ys, color="0.75", lw=0.8)
        ax.plot(it, _smooth(ys), color="C0", lw=1.8, label="10-iteration mean")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if per_task:
        ax = axes[-1]
        for tag, (xs, ys) in sorted(per_task.items()):
            ax.plot(xs, ys, marker="o", ms=3, label=tag)
        ax.set_title("training reward per task (25-iteration means)")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].axhline(1.5, color="C3", ls=":", lw=1)
    axes[1].axhline(1 / 1.5, color="C3", ls=":", lw=1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grids(before: Path, after: Path, out: Path, tasks: list[str]) -> None:
    from PIL import Image, ImageOps

    from fpo_diffusion.images import labelled_grid

    runs = [(name, folder, json.loads((folder / "report.json").read_text())["records"])
            for name, folder in (("before", before), ("after", after))]
    by_entry = {name: {} for name, _, _ in runs}  # run -> entry -> records in image order
    for name, _, recs in runs:
        for r in sorted(recs, key=lambda r: (r["entry"], r["index"])):
            by_entry[name].setdefault(r["entry"], []).append(r)
    for task in tasks:
        entries = list(dict.fromkeys(r["entry"] for r in runs[0][2] if r["tag"] == task))[:ENTRIES_PER_GRID]
        for name, folder, _ in runs:
            rows = [by_entry[name][e] for e in entries]
            framed = [ImageOps.expand(Image.open(folder / r["file"]).convert("RGB").resize((96, 96), Image.NEAREST),
                                      border=3, fill=(40, 170, 40) if r["correct"] else (200, 40, 40))
                      for row in rows for r in row]
            n = len(rows[0])
            labelled_grid([framed[i:i + n] for i in range(0, len(framed), n)], min_side=1,
                          pad=2).save(out / f"{name}_{task}.png")


def table(before: dict, after: dict) -> str:
    lines = ["| task | base model | + LoRA | change |", "|---|---|---|---|"]
    for t, v in before["per_task"].items():
        a = after["per_task"][t]["accuracy"]
        lines.append(f"| {t} | {v['accuracy']:.3f} | {a:.3f} | {a - v['accuracy']:+.3f} |")
    b, a = before["overall"], after["overall"]
    lines.append(f"| **overall** | **{b:.3f}** | **{a:.3f}** | **{a - b:+.3f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tasks", nargs="+", default=["single_object", "two_object", "counting", "colors", "position",
                                                   "color_attr"])
    a = ap.parse_args(argv)
    for p in (a.run / "metrics.jsonl", a.before / "report.json", a.after / "report.json"):
        if not p.is_file():
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
    a.out.mkdir(parents=True, exist_ok=True)
    metrics = [json.loads(ln) for ln in (a.run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    samples_file = a.run / "samples.jsonl"
    samples = ([json.loads(ln) for ln in samples_file.read_text().splitlines() if ln.strip()]
               if samples_file.is_file() else [])
    if samples and not any("tag" in x for x in samples):  # runs from before samples.jsonl recorded the task
        from fpo_diffusion.shapes.scenes import training_metadata

        tags = {m["prompt"]: m["tag"] for m in training_metadata()}
        samples = [{**x, "tag": tags.get(x["prompt"])} for x in samples]
    curves(metrics, a.out / "curves.png", samples, reward_title(a.run))
    grids(a.before, a.after, a.out, a.tasks)
    sb = json.loads((a.before / "report.json").read_text())["summary"]
    sa = json.loads((a.after / "report.json").read_text())["summary"]
    (a.out / "comparison.md").write_text(table(sb, sa) + "\n")
    shutil.copyfile(a.run / "metrics.jsonl", a.out / "metrics.jsonl")
    shutil.copyfile(a.before / "report.json", a.out / "shapes_eval_before.json")
    shutil.copyfile(a.after / "report.json", a.out / "shapes_eval_after.json")
    print(table(sb, sa))
    return 0


if __name__ == "__main__":
    sys.exit(main())
