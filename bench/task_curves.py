"""Training reward and held-out score per task, side by side: what a run learns and what generalises.

Reads run folders written by ``launch/train.py`` with a periodic evaluation (``eval.*``) on GenEval-tagged prompts
(``eval.every=N eval.prompts=embedded:shapes-validation``; ``eval.at_start`` gives the starting point):

* training reward per task and iteration, from ``samples.jsonl`` (every sample's ``tag`` and reward);
* held-out score per task with its standard error, from ``metrics.jsonl`` (``eval/task/*``, ``eval/task_se/*``).

Writes a plot (a panel per task, one colour per run; dashed: training reward, solid with error bars:
held-out) and a Markdown table per run: each task's training reward over the first and last
``--window`` iterations and its held-out score at the start and the end, the change in SE units;
and the curves themselves as JSON beside the plot.

    python bench/task_curves.py RUN [RUN ...] --out docs/task_curves.png [--labels a b] [--window 5]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import _common  # noqa: F401  (the repository root on sys.path, offline hub)
from rewards.geneval.summary import TaskScore, overall_score

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def read_run(run: Path) -> dict:
    """``{"train": {task: {iteration: mean reward}}, "eval": {task: [(iteration, score, se)]}}`` of a run folder."""
    sums: dict[str, dict[int, list[float]]] = {}
    for r in _rows(run / "samples.jsonl"):
        if r.get("tag"):
            s = sums.setdefault(r["tag"], {}).setdefault(int(r["iteration"]), [0.0, 0])
            s[0] += float(r["reward"])
            s[1] += 1
    train = {t: {it: v[0] / v[1] for it, v in sorted(d.items())} for t, d in sums.items()}
    held: dict[str, list[tuple[int, float, float]]] = {}
    overall: list[tuple[int, float, float]] = []
    counts = _eval_counts(run)
    for r in _rows(run / "metrics.jsonl"):
        tasks = [k[len("eval/task/"):] for k in r if k.startswith("eval/task/")]
        scores = {}
        for t in tasks:
            p = float(r[f"eval/task/{t}"])
            se = r.get(f"eval/task_se/{t}")  # older runs: the binomial SE over the task's evaluation images
            if se is None:
                n = counts.get(t, 0)
                se = TaskScore(p * n, n, p * n).se if n else math.nan
            scores[t] = _Logged(p, float(se))
            held.setdefault(t, []).append((int(r["iteration"]), p, float(se)))
        if tasks:  # GenEval's overall score: the mean of the task accuracies, and its SE
            overall.append((int(r["iteration"]), *overall_score(scores)))
    if overall:
        held["overall"] = overall
    return {"train": train, "eval": held}


class _Logged:
    """A task's logged score and SE, read where ``overall_score`` reads a ``TaskScore``."""

    def __init__(self, accuracy: float, se: float):
        self.accuracy, self.se = accuracy, se


def _eval_counts(run: Path) -> dict[str, int]:
    """Evaluation images per task of a run (from its ``config.yaml``), for runs that predate ``eval/task_se``."""
    try:
        from fpo_diffusion.config_io import load_config
        from fpo_diffusion.prompts import load_prompts
        from fpo_diffusion.config import PromptConfig

        e = load_config(str(run / "config.yaml"), []).eval
        items = load_prompts(PromptConfig(source=e.prompts, column=e.column, tags=e.tags))
    except Exception:  # noqa: BLE001 - a run without a loadable config: no fallback SE
        return {}
    items = items[: e.max_prompts] if e.max_prompts else items
    out: dict[str, int] = {}
    for it in items:
        tag = (it.metadata or {}).get("tag")
        if tag:
            out[tag] = out.get(tag, 0) + e.images_per_prompt
    return out


def _mean(d: dict[int, float], its: list[int]) -> float:
    vals = [d[i] for i in its if i in d]
    return sum(vals) / len(vals) if vals else float("nan")


def summary(name: str, data: dict, window: int) -> str:
    """A Markdown table of one run: training reward first/last ``window`` iterations, held-out start/end."""
    lines = [f"### {name}", "", "| task | training reward, first -> last iterations | held-out start | held-out end "
             "| change (SE) |", "|---|---|---|---|---|"]
    for t in (*TASKS, "overall"):
        tr = data["train"].get(t, {})
        its = sorted(tr)
        train = (f"{_mean(tr, its[:window]):.3f} -> {_mean(tr, its[-window:]):.3f}" if its else "(not trained)")
        h = data["eval"].get(t, [])
        if h:
            (_, a, sa), (_, b, sb) = h[0], h[-1]
            se = math.sqrt(sa * sa + sb * sb)
            z = (b - a) / se if se > 0 else float("nan")
            lines.append(f"| {t} | {train} | {a:.3f} ± {sa:.3f} | {b:.3f} ± {sb:.3f} | {b - a:+.3f} ({z:+.1f}) |")
        else:
            lines.append(f"| {t} | {train} | | | |")
    return "\n".join(lines) + "\n"


def plot(runs: list[tuple[str, dict]], out: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (*TASKS, "overall")
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), sharex=True)
    for ax, task in zip(axes.flat, panels):
        for k, (name, data) in enumerate(runs):
            color = f"C{k}"
            tr = data["train"].get(task)
            if tr:
                its = sorted(tr)
                smooth = [_mean(tr, [j for j in its if i - window < j <= i]) for i in its]
                ax.plot(its, smooth, "--", color=color, alpha=0.7, label=f"{name}: training (mean of {window})")
            h = data["eval"].get(task)
            if h:
                ax.errorbar([x[0] for x in h], [x[1] for x in h], yerr=[x[2] for x in h], color=color, marker="o",
                            capsize=3, label=f"{name}: held-out ± SE")
        ax.set_title(task)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1:-1]:
        for h_, l_ in zip(*ax.get_legend_handles_labels()):
            if l_ not in labels:
                handles.append(h_)
                labels.append(l_)
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=8)
    fig.supxlabel("iteration (-1: before training)")
    fig.suptitle("training reward (dashed) and held-out score (solid) per task")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (output_dir of launch/train.py)")
    ap.add_argument("--labels", nargs="*", help="a name per run (default: the folder names)")
    ap.add_argument("--out", type=Path, required=True, help="the plot (.png); the table goes beside it (.md)")
    ap.add_argument("--window", type=int, default=5, help="iterations averaged for the training curve (>= 1)")
    args = ap.parse_args(argv)
    if args.window < 1:
        ap.error("--window must be >= 1")
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        ap.error(f"no metrics.jsonl in {', '.join(missing)}")
    runs = [(n, read_run(r)) for n, r in zip(labels, args.runs)]
    plot(runs, args.out, args.window)
    table = "\n".join(summary(n, d, args.window) for n, d in runs)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    curves = {n: {"train": {t: {str(i): v for i, v in d.items()} for t, d in data["train"].items()},
                  "eval": data["eval"]} for n, data in runs}
    args.out.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')} (the curves)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
