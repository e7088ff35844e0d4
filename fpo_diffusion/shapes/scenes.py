"""ShapesEval 2: GenEval-format metadata for the six tasks, the split by combination, and the scene
that satisfies a prompt's metadata (the pretraining captions are ``captions.py``).

Metadata dicts have exactly the format of GenEval's ``evaluation_metadata.jsonl`` lines::

    {"tag": "position", "include": [{"class": "heart", "count": 1},
     {"class": "star", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a star left of a heart"}

**The split** (:func:`split`) is by *combination*, fixed and seeded: every prompt of GenEval's
six templates in this world is grouped by what it combines (a class; an unordered pair of
classes; a class and a count; a class and a colour; an unordered pair of classes with every
relation and order; an unordered pair of coloured classes), and whole groups go to ``test``
(ShapesEval), ``validation`` (for choosing hyper-parameters) or ``train`` (the RL prompts).
No test or validation prompt string is a training prompt, and every class, colour, count and
relation of the test set occurs in training prompts (both checked when the split is built and
pinned by tests). ``single_object`` holds out every class's prompt (as GenEval's 80 are all its
classes): classes reach training only inside the other five tasks, and its validation entries
are the same 12 prompts at other seeds (the one place validation and test share strings).
``counting`` has only 36 prompts in a 12-class world (18 test, 6 validation, 12 train).

"""
from __future__ import annotations

import itertools
import json
from functools import lru_cache

import numpy as np

from .render import Obj, Scene
from .world import COLORS, MAX_OBJECTS, NUMBERS, SHAPES, article, cells, plural

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks, in the official report order."""
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNTS: tuple[int, ...] = (2, 3, 4)
"""Counting prompts ask for 2, 3 or 4 objects (GenEval's counts)."""
SPLIT_SEED = 20_261_202
"""Seed of the split (a new seed is a new benchmark: do not change it)."""

TEST_SIZES = {"single_object": 12, "two_object": 64, "counting": 18, "colors": 60, "position": 96, "color_attr": 80}
"""Distinct test prompts per task (GenEval: 80, 99, 80, 94, 100, 100); single_object and counting are
bounded by the world (12 and 36 prompts in all)."""
VALIDATION_SIZES = {"single_object": 12, "two_object": 20, "counting": 6, "colors": 20, "position": 48,
                    "color_attr": 40}
"""Distinct validation prompts per task (single_object: the test prompts, other seeds)."""
TEST_ENTRIES_PER_TASK = 80
"""ShapesEval entries per task (prompts cycle when a task has fewer; each entry gets its own seeds)."""
VALIDATION_ENTRIES_PER_TASK = 40
"""Validation entries per task."""


def _a(word: str) -> str:
    return f"{article(word)} {word}"


# ---------------------------------------------------------------------------------------------
# metadata builders (GenEval phrasing)
# ---------------------------------------------------------------------------------------------
def single_object(shape: str) -> dict:
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of {_a(shape)}"}


def two_object(a: str, b: str) -> dict:
    return {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {_a(a)} and {_a(b)}"}


def counting(shape: str, n: int) -> dict:
    return {"tag": "counting", "include": [{"class": shape, "count": n}], "exclude": [{"class": shape, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(shape, n)}"}


def colors(shape: str, color: str) -> dict:
    return {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
            "prompt": f"a photo of {_a(color)} {shape}"}


def position(a: str, rel: str, b: str) -> dict:
    """``a`` is ``rel`` ``b`` (GenEval order: the reference object first, the placed object second)."""
    return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {_a(a)} {rel} {_a(b)}"}


def color_attr(a: str, ca: str, b: str, cb: str) -> dict:
    return {"tag": "color_attr", "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {_a(ca)} {a} and {_a(cb)} {b}"}


def _pairs() -> list[tuple[str, str]]:
    return list(itertools.combinations(SHAPES, 2))


def combination_groups() -> dict[str, list[list[dict]]]:
    """Every prompt of the six tasks, grouped by the combination it asks for (deterministic order)."""
    return {
        "single_object": [[single_object(s)] for s in SHAPES],
        "two_object": [[two_object(a, b), two_object(b, a)] for a, b in _pairs()],
        "counting": [[counting(s, n)] for s in SHAPES for n in COUNTS],
        "colors": [[colors(s, c)] for s in SHAPES for c in COLORS],
        "position": [[position(x, r, y) for x, y in ((a, b), (b, a)) for r in RELATIONS] for a, b in _pairs()],
        "color_attr": [[color_attr(a, ca, b, cb), color_attr(b, cb, a, ca)] for a, b in _pairs()
                       for ca in COLORS for cb in COLORS if ca != cb],
    }


def _take(groups: list[list[dict]], n: int, rng: np.random.Generator, one_order: bool) -> tuple[list[dict], list[list[dict]]]:
    """Whole groups until ``n`` prompts (``one_order``: one random member per group); the rest."""
    out, i = [], 0
    while len(out) < n and i < len(groups):
        g = groups[i]
        out.extend([g[int(rng.integers(len(g)))]] if one_order else g)
        i += 1
    return out[:n] if one_order else out, groups[i:]


def vocabulary(metas: list[dict]) -> dict[str, set]:
    """The classes, colours, counts and relations a list of metadata uses."""
    v = {"class": set(), "color": set(), "count": set(), "relation": set()}
    for m in metas:
        for r in m["include"]:
            v["class"].add(r["class"])
            if r.get("color"):
                v["color"].add(r["color"])
            if m["tag"] == "counting":
                v["count"].add(int(r["count"]))
            if r.get("position"):
                v["relation"].add(r["position"][0])
    return v


@lru_cache(maxsize=1)
def _split_json() -> str:
    for attempt in range(100):
        rng = np.random.default_rng([SPLIT_SEED, attempt])
        out = {"test": {}, "validation": {}, "train": {}}
        for task, groups in combination_groups().items():
            order = rng.permutation(len(groups))
            groups = [groups[int(i)] for i in order]
            one_order = task == "color_attr"  # 5940 combinations: one phrasing each in test / validation
            if task == "single_object":
                out["test"][task] = [g[0] for g in groups]
                out["validation"][task] = [g[0] for g in groups]
                out["train"][task] = []
                continue
            out["test"][task], rest = _take(groups, TEST_SIZES[task], rng, one_order)
            out["validation"][task], rest = _take(rest, VALIDATION_SIZES[task], rng, one_order)
            out["train"][task] = [m for g in rest for m in g]
        train = [m for ms in out["train"].values() for m in ms]
        test = [m for ms in out["test"].values() for m in ms]
        vt, vtr = vocabulary(test), vocabulary(train)
        if all(vt[k] <= vtr[k] for k in vt):
            return json.dumps(out)
    raise RuntimeError("no split covers the test vocabulary")  # pragma: no cover


def split() -> dict[str, dict[str, list[dict]]]:
    """``{"test" | "validation" | "train": {task: [metadata, ...]}}``: distinct prompts per task (fresh copies)."""
    return json.loads(_split_json())


def test_and_validation_prompts() -> set[str]:
    """Every test and validation prompt string (never a training prompt)."""
    s = split()
    return {m["prompt"] for part in ("test", "validation") for ms in s[part].values() for m in ms}


def _entries(part: str, per_task: int) -> list[dict]:
    s = split()[part]
    out = []
    for task in TASKS:
        ms = s[task]
        out.extend(json.loads(json.dumps(ms[i % len(ms)])) for i in range(max(per_task, len(ms)) if ms else 0))
    return out


def test_metadata(min_per_task: int = TEST_ENTRIES_PER_TASK) -> list[dict]:
    """The fixed ShapesEval test set: each task's test prompts cycled to ``min_per_task`` entries, task order.

    Default: 480 entries over 330 distinct prompts. Entries of a task with few distinct prompts
    repeat; each entry gets its own seeds at evaluation.
    """
    return _entries("test", min_per_task)


def validation_metadata(min_per_task: int = VALIDATION_ENTRIES_PER_TASK) -> list[dict]:
    """The validation set (for hyper-parameters; never report it as the result): 240 entries by default."""
    return _entries("validation", min_per_task)


def train_task_metadata() -> dict[str, list[dict]]:
    """The six tasks' training prompts (empty for single_object: all 12 are held out)."""
    return split()["train"]


TRAINING_ENTRIES_PER_TASK = 400
"""Entries per task of :func:`training_metadata` (five tasks: single_object is all held out)."""
TRAINING_TASK_MIX = {"position": 0.35, "counting": 0.25, "color_attr": 0.25, "two_object": 0.10, "colors": 0.05}
"""The task mix of the RL prompt set ``embedded:shapes`` (``plugin.training_prompts``): the weights Flow-GRPO gives
GenEval's tasks in its training prompts, the hard tasks (position, counting, colour binding) first."""


@lru_cache(maxsize=1)
def _training_metadata() -> tuple[str, ...]:
    rng = np.random.default_rng([SPLIT_SEED, 1])
    out = []
    for task in TASKS:
        ms = train_task_metadata()[task]
        if not ms:
            continue
        order = rng.permutation(len(ms))
        n = TRAINING_ENTRIES_PER_TASK
        out.extend(json.dumps(ms[int(order[i % len(ms)])]) for i in range(n))
    return tuple(out)


def training_metadata() -> list[dict]:
    """The RL training prompts in equal shares per task (``embedded:shapes`` recomposes them to
    :data:`TRAINING_TASK_MIX`; ``embedded:shapes-counting`` keeps the counting ones).

    :data:`TRAINING_ENTRIES_PER_TASK` entries for each task that has training prompts (two_object,
    counting, colors, position, color_attr: equal shares; small tasks repeat their prompts),
    GenEval's own templates, never a test or validation prompt. Deterministic, so every rank and
    every resumed run sees the same list.
    """
    return [json.loads(m) for m in _training_metadata()]


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------
def scene_for(meta: dict, rng: np.random.Generator, max_tries: int = 1000) -> Scene:
    """A random scene that satisfies ``meta`` exactly: the asked-for objects and nothing else.

    Unspecified colours are random; cells are random, re-drawn until every ``position``
    clause holds under GenEval's own geometry (``rules.relative_position`` on the drawn boxes).
    """
    from rewards.geneval.rules import relative_position

    inc = meta["include"]
    n = sum(int(r["count"]) for r in inc)
    if n > MAX_OBJECTS:
        raise ValueError(f"{meta['prompt']!r} asks for {n} objects; the world holds at most {MAX_OBJECTS}")
    all_cells = cells()
    for _ in range(max_tries):
        idx = rng.choice(len(all_cells), size=n, replace=False)
        groups, objs, k = [], [], 0
        for r in inc:
            g = []
            for _ in range(int(r["count"])):
                col = r.get("color") or COLORS[int(rng.integers(len(COLORS)))]
                g.append(Obj(r["class"], col, all_cells[int(idx[k])]))
                k += 1
            groups.append(g)
            objs.extend(g)
        ok = True
        for r, g in zip(inc, groups):
            if r.get("position"):
                rel, tgt = r["position"]
                ok = ok and all(rel in relative_position(o.box(), t.box()) for o in g for t in groups[int(tgt)])
        if ok:
            return objs
    raise RuntimeError(f"could not place a scene for {meta['prompt']!r}")


__all__ = [
    "TASKS", "RELATIONS", "COUNTS", "single_object", "two_object", "counting", "colors", "position", "color_attr",
    "combination_groups", "split", "vocabulary", "test_metadata", "validation_metadata", "test_and_validation_prompts",
    "train_task_metadata", "training_metadata", "TRAINING_TASK_MIX", "scene_for",
]
