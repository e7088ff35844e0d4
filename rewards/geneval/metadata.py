"""GenEval prompt metadata: load and validate ``evaluation_metadata.jsonl`` and per-prompt folders.

One JSON object per line: ``tag``, ``prompt``, ``include`` (clauses ``{class, count[, color]
[, position: [relation, index]]}``) and optional ``exclude`` (``{class, count}``). A malformed
line raises ``ValueError("<file>:<line>: <problem>")``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..textfile import JSONLineError, json_line, jsonl_lines, read_text
from .rules import COLORS, POSITIONS

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""The six GenEval tasks, in the official metadata's order."""


class GenEvalInputError(ValueError):
    """Bad user input (metadata, image folders, images, results files): one clear message."""


def _check_clause(clause: Any, i: int, kind: str, classnames: set[str] | None) -> str | None:
    if not isinstance(clause, dict):
        return f"{kind}[{i}] is not an object"
    cls, count = clause.get("class"), clause.get("count")
    if not isinstance(cls, str) or not cls:
        return f"{kind}[{i}] has no 'class'"
    if classnames is not None and cls not in classnames:
        known = (f"known: {', '.join(sorted(classnames))}" if len(classnames) <= 20
                 else f"not one of the detector's {len(classnames)} class names")
        return f"{kind}[{i}] class {cls!r} is not a known object name ({known})"
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"{kind}[{i}] 'count' must be a positive integer, got {count!r}"
    allowed = {"class", "count", "color", "position"} if kind == "include" else {"class", "count"}
    extra = set(clause) - allowed
    if extra:
        return f"{kind}[{i}] has unexpected keys {sorted(extra)}"
    if "color" in clause and clause["color"] not in COLORS:
        return f"{kind}[{i}] colour {clause['color']!r} is not one of {COLORS}"
    if "position" in clause:
        pos = clause["position"]
        if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in POSITIONS
                or isinstance(pos[1], bool) or not isinstance(pos[1], int)):
            return f"{kind}[{i}] 'position' must be [relation, index] with relation in {list(POSITIONS)}"
        if not 0 <= pos[1] < i:
            return f"{kind}[{i}] position target {pos[1]} is not an earlier include clause"
    return None


def validate_metadata(entry: Any, classnames: set[str] | None = None, tags: Any = None) -> str | None:
    """Problem with one metadata entry, or ``None`` when it is valid (a ``class`` outside ``classnames``
    and a ``tag`` outside ``tags`` are problems when those are given)."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("tag"), str) or not entry["tag"]:
        return "missing 'tag'"
    if tags is not None and entry["tag"] not in tags:
        return f"tag {entry['tag']!r} is not a GenEval task (one of {', '.join(tags)})"
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
        return "missing 'prompt'"
    for kind in ("include", "exclude"):
        clauses = entry.get(kind, [])
        if not isinstance(clauses, list):
            return f"'{kind}' must be a list"
        for i, c in enumerate(clauses):
            problem = _check_clause(c, i, kind, classnames)
            if problem:
                return problem
    if not entry.get("include"):
        return "'include' is empty"
    return None


def parse_metadata_line(line: str, where: str, classnames: set[str] | None = None) -> dict:
    """Parse and validate one line; errors name ``where`` (``file:line``)."""
    try:
        entry = json_line(line)
    except JSONLineError as e:
        raise GenEvalInputError(f"{where}: invalid JSON ({e})") from None
    problem = validate_metadata(entry, classnames)
    if problem:
        raise GenEvalInputError(f"{where}: invalid GenEval metadata: {problem}")
    return entry


def load_metadata(path: str | Path, classnames: list[str] | None = None) -> list[dict]:
    """All prompts of a metadata JSONL file (blank lines ignored), validated."""
    path = Path(path)
    text = read_text(path, "metadata file", GenEvalInputError)
    names = set(classnames) if classnames is not None else None
    out = [parse_metadata_line(line, f"{path}:{n}", names) for n, line in jsonl_lines(text)]
    if not out:
        raise GenEvalInputError(f"{path}: no prompts")
    return out


def read_prompt_metadata(folder: str | Path) -> dict:
    """The metadata of one prompt folder (``<folder>/metadata.jsonl``, one JSON object)."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise GenEvalInputError(f"missing {path}")
    lines = jsonl_lines(read_text(path, "metadata file", GenEvalInputError))
    if len(lines) != 1:
        raise GenEvalInputError(f"{path}: expected one JSON line, found {len(lines)}")
    n, line = lines[0]
    return parse_metadata_line(line, f"{path}:{n}")


def write_prompt_metadata(folder: str | Path, entry: dict) -> None:
    """Write ``<folder>/metadata.jsonl`` as the official generator does (one line)."""
    path = Path(folder) / "metadata.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text(json.dumps(entry) + "\n", encoding="utf-8")
    tmp.replace(path)


def with_exact_counts(meta: dict) -> dict:
    """``meta`` with GenEval's counting exclude clause (``count + 1``) for every asked class that has none: every
    asked class exactly as often as asked (GenEval itself excludes extra copies only in counting)."""
    asked: dict[str, int] = {}
    for q in meta.get("include", []):
        asked[q["class"]] = asked.get(q["class"], 0) + int(q["count"])
    excluded = {q["class"] for q in meta.get("exclude", [])}
    extra = [{"class": c, "count": n + 1} for c, n in asked.items() if c not in excluded]
    return {**meta, "exclude": [*meta.get("exclude", []), *extra]} if extra else meta


__all__ = ["TASKS", "GenEvalInputError", "validate_metadata", "parse_metadata_line", "load_metadata",
           "read_prompt_metadata", "write_prompt_metadata", "with_exact_counts"]
