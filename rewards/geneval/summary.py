"""GenEval summary: the official ``summary_scores.py`` arithmetic plus Markdown/HTML reports.

* % correct images: mean of ``correct`` over rows;
* % correct prompts: rows grouped by their ``metadata`` string, a prompt is correct when
  any of its images is;
* per task (``tag``, in order of first appearance): mean of ``correct``;
* overall: unweighted mean of the task accuracies.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..textfile import JSONLineError, json_line, jsonl_lines, read_text
from .metadata import TASKS, GenEvalInputError


@dataclass
class TaskScore:
    """One task's scores over its images: ``correct`` is their sum (the number of correct images when the
    scores are GenEval's 0/1), ``total`` the number of images, ``sum_sq`` the sum of the squared scores."""

    correct: float = 0
    total: int = 0
    sum_sq: float = 0.0

    def add(self, score: float) -> None:
        self.correct += score
        self.sum_sq += score * score
        self.total += 1

    @property
    def accuracy(self) -> float:
        """The mean score (the accuracy for 0/1 scores)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def se(self) -> float:
        """Standard error of :attr:`accuracy` over the images: the scores' standard deviation over
        ``sqrt(total)`` (for 0/1 scores the binomial ``sqrt(p (1 - p) / n)``); NaN without images."""
        if not self.total:
            return float("nan")
        var = max(self.sum_sq / self.total - self.accuracy ** 2, 0.0)
        return (var / self.total) ** 0.5


def task_scores(tags: list[str], scores: list[float]) -> dict[str, TaskScore]:
    """Per task (``tag``, in order of first appearance): the scores of its images. The one per-task
    summary of ShapesEval, GenEval, the periodic evaluation and the learning benchmark."""
    if len(tags) != len(scores):
        raise ValueError(f"{len(tags)} tags for {len(scores)} scores")
    out: dict[str, TaskScore] = {}
    for t, v in zip(tags, scores):
        out.setdefault(t, TaskScore()).add(v)
    return out


def overall_score(tasks: dict[str, TaskScore]) -> tuple[float, float]:
    """``(overall, se)``: the unweighted mean of the task accuracies (the official GenEval score) and its
    standard error, the tasks' SEs in quadrature over the number of tasks; ``(0, nan)`` without tasks."""
    if not tasks:
        return 0.0, float("nan")
    k = len(tasks)
    return sum(t.accuracy for t in tasks.values()) / k, sum(t.se ** 2 for t in tasks.values()) ** 0.5 / k


@dataclass
class Summary:
    """Scores of one results file."""

    n_images: int
    n_prompts: int
    image_accuracy: float
    prompt_accuracy: float
    tasks: dict[str, TaskScore] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        """Unweighted mean of the task accuracies (the official GenEval score)."""
        return overall_score(self.tasks)[0]


def load_results(path: str | Path) -> list[dict]:
    """Rows of a results JSONL; a malformed line raises naming ``file:line``."""
    path = Path(path)
    rows = []
    for n, line in jsonl_lines(read_text(path, "results file", GenEvalInputError)):
        try:
            row = json_line(line)
        except JSONLineError as e:
            raise GenEvalInputError(f"{path}:{n}: invalid JSON ({e})") from None
        missing = [k for k in ("tag", "correct", "metadata") if k not in row] if isinstance(row, dict) else ["all"]
        if missing or not isinstance(row["correct"], bool):
            raise GenEvalInputError(f"{path}:{n}: not a GenEval result row (needs tag, correct: bool, metadata)")
        rows.append(row)
    if not rows:
        raise GenEvalInputError(f"{path}: no results")
    return rows


def summarize(rows: list[dict]) -> Summary:
    """The official summary arithmetic."""
    by_prompt: dict[str, bool] = {}
    for r in rows:
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(r["correct"])
    tasks = task_scores([r["tag"] for r in rows], [int(bool(r["correct"])) for r in rows])
    n = len(rows)
    return Summary(
        n_images=n, n_prompts=len(by_prompt),
        image_accuracy=sum(bool(r["correct"]) for r in rows) / n if n else 0.0,
        prompt_accuracy=sum(by_prompt.values()) / len(by_prompt) if by_prompt else 0.0,
        tasks=tasks,
    )


def format_text(s: Summary) -> str:
    """Plain-text summary in the layout of the official script."""
    lines = ["Summary", "=======", f"Total images: {s.n_images}", f"Total prompts: {s.n_prompts}",
             f"% correct images: {s.image_accuracy:.2%}", f"% correct prompts: {s.prompt_accuracy:.2%}", "",
             "Task breakdown", "=============="]
    lines += [f"{tag:<16} = {t.accuracy:.2%} ({t.correct} / {t.total})" for tag, t in s.tasks.items()]
    lines += ["", f"Overall score (avg. over tasks): {s.overall:.5f}"]
    missing = [t for t in TASKS if t not in s.tasks]
    if missing:
        lines.append(f"Warning: tasks without results: {', '.join(missing)} (overall averages the present ones)")
    return "\n".join(lines)


def _task_order(summaries: list[Summary]) -> list[str]:
    """Official tasks in the official order, then any other tags in order of appearance."""
    order = [t for t in TASKS if any(t in s.tasks for s in summaries)]
    for s in summaries:
        for t in s.tasks:
            if t not in order:
                order.append(t)
    return order


def comparison_table(summaries: dict[str, Summary]) -> list[list[str]]:
    """Rows ``[metric, run1, run2, ..., (delta)]`` with a header row; delta = last - first when two runs."""
    names = list(summaries)
    ss = list(summaries.values())
    two = len(ss) == 2
    header = ["task"] + names + (["delta"] if two else [])
    rows = [header]

    def add(label: str, vals: list[float | None]) -> None:
        cells = [f"{v:.4f}" if v is not None else "-" for v in vals]
        if two:
            cells.append(f"{vals[1] - vals[0]:+.4f}" if None not in vals else "-")
        rows.append([label] + cells)

    for tag in _task_order(ss):
        add(tag, [s.tasks[tag].accuracy if tag in s.tasks else None for s in ss])
    add("overall", [s.overall for s in ss])
    add("correct images", [s.image_accuracy for s in ss])
    add("correct prompts", [s.prompt_accuracy for s in ss])
    return rows


def failure_grid(rows: list[dict], tag: str, out: Path, max_images: int = 16, thumb: int = 128, cols: int = 4) -> int:
    """A PNG grid of failed images of one task, each captioned with its prompt; returns how many were drawn.

    Images that no longer exist are drawn as a grey tile captioned ``missing: <file>``.
    """
    failed = [r for r in rows if r["tag"] == tag and not r["correct"]][:max_images]
    if not failed:
        return 0
    cap = 30
    n_rows = -(-len(failed) // cols)
    grid = Image.new("RGB", (cols * thumb, n_rows * (thumb + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for i, r in enumerate(failed):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + cap)
        caption = str(r.get("prompt", ""))
        try:
            with Image.open(r["filename"]) as im:
                tile = im.convert("RGB")
                tile.thumbnail((thumb, thumb))
        except Exception:
            tile = Image.new("RGB", (thumb, thumb), (200, 200, 200))
            caption = f"missing: {Path(str(r.get('filename'))).name}"
        grid.paste(tile, (x, y))
        for j, chunk in enumerate((caption[:22], caption[22:44])):
            draw.text((x + 2, y + thumb + 2 + 13 * j), chunk, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return len(failed)


def write_report(runs: dict[str, list[dict]], out_dir: str | Path, max_failures: int = 16) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``failures/<run>_<task>.png`` grids; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(rows) for name, rows in runs.items()}
    table = comparison_table(summaries)
    grids: dict[str, list[tuple[str, Path, int]]] = {}
    for name, rows in runs.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        for tag in _task_order([summaries[name]]):
            p = out / "failures" / f"{safe}_{tag}.png"
            n = failure_grid(rows, tag, p, max_failures)
            if n:
                grids.setdefault(name, []).append((tag, p, n))
    md = ["# GenEval report", ""]
    md += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    for name, s in summaries.items():
        md += ["", f"## {name}", "", "```", format_text(s), "```"]
        for tag, p, n in grids.get(name, []):
            md += ["", f"### Failures: {tag} ({n} shown)", "", f"![{tag}]({p.relative_to(out).as_posix()})"]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    h = ["<!doctype html><meta charset='utf-8'><title>GenEval report</title>", "<h1>GenEval report</h1>", "<table border=1>"]
    h += ["<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table[0]) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table[1:]]
    h.append("</table>")
    for name, s in summaries.items():
        h += [f"<h2>{html.escape(name)}</h2>", f"<pre>{html.escape(format_text(s))}</pre>"]
        for tag, p, n in grids.get(name, []):
            h += [f"<h3>Failures: {html.escape(tag)} ({n} shown)</h3>",
                  f"<img src='{html.escape(p.relative_to(out).as_posix())}'>"]
    (out / "report.html").write_text("\n".join(h) + "\n", encoding="utf-8")
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    for name, gs in grids.items():
        for tag, p, _ in gs:
            paths[f"{name}/{tag}"] = p
    return paths


__all__ = ["TaskScore", "Summary", "task_scores", "overall_score", "load_results", "summarize", "format_text",
           "comparison_table", "failure_grid", "write_report"]
