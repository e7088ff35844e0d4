"""Scene generator: GenEval-format metadata for the six tasks, prompts, scenes, splits.

Metadata dicts have exactly the format of GenEval's ``evaluation_metadata.jsonl`` lines::

    {"tag": "position", "include": [{"class": "square", "count": 1},
     {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a circle left of a square"}

The held-out split (:func:`heldout_metadata`) is fixed: it holds *every* prompt of the three
colour-free tasks whose prompt spaces are tiny in this world (single_object: 4 prompts,
two_object: 12, counting: 12), half of ``colors`` and ``position`` and 40 % of
``color_attr`` (chosen by a stable hash). Training prompts (:func:`sample_training`) come from
the rest of the six tasks plus training-only phrasings: the colour-free tasks paraphrased
("an image of a circle", "a picture of two squares", "a circle and a cross", "a photo of one
circle") and coloured variants ("a photo of two red circles", "a photo of a red circle and a
square", "a photo of a red circle left of a blue square"). They never equal a held-out prompt,
so a held-out score measures transfer to unseen prompt strings (for the colour-free tasks: the
"a photo of ..." template, seen in training only with colours or positions).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from functools import lru_cache

import numpy as np

from .render import Obj, Scene
from .world import COLORS, MAX_OBJECTS, NUMBERS, SHAPES, article, cells, plural

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks, in the official report order."""
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
HELDOUT_MIN_PER_TASK = 52
"""Each task gets at least this many held-out entries (prompts cycle when a task has fewer)."""


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


def all_task_metadata() -> dict[str, list[dict]]:
    """Every prompt of the six tasks in this world, per task (deterministic order)."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    return {
        "single_object": [single_object(s) for s in SHAPES],
        "two_object": [two_object(a, b) for a, b in pairs],
        "counting": [counting(s, n) for s in SHAPES for n in (2, 3, 4)],
        "colors": [colors(s, c) for s in SHAPES for c in COLORS],
        "position": [position(a, r, b) for a, b in pairs for r in RELATIONS],
        "color_attr": [color_attr(a, ca, b, cb) for a, b in pairs for ca in COLORS for cb in COLORS if ca != cb],
    }


def _canonical(meta: dict) -> str:
    """Key shared by prompts that differ only in the order of their two objects."""
    inc = meta["include"]
    if meta["tag"] in ("two_object", "color_attr"):
        inc = sorted(inc, key=lambda r: json.dumps(r, sort_keys=True))
    return meta["tag"] + json.dumps(inc, sort_keys=True) if meta["tag"] != "position" else meta["prompt"]


def _hash01(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


HELDOUT_FRACTION = {"single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 0.5, "position": 0.5, "color_attr": 0.4}


@lru_cache(maxsize=1)
def _split() -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    held, train = {}, {}
    for task, metas in all_task_metadata().items():
        f = HELDOUT_FRACTION[task]
        held[task] = [m for m in metas if _hash01("shapes-heldout-v1:" + _canonical(m)) < f]
        train[task] = [m for m in metas if _hash01("shapes-heldout-v1:" + _canonical(m)) >= f]
    return held, train


def heldout_prompts() -> set[str]:
    """The distinct held-out prompt strings."""
    return {m["prompt"] for ms in _split()[0].values() for m in ms}


def heldout_metadata(min_per_task: int = HELDOUT_MIN_PER_TASK) -> list[dict]:
    """The fixed ShapesEval prompt set: every held-out prompt, each task cycled to >= ``min_per_task`` entries.

    Returns copies in task order; entries of a task with few distinct prompts repeat (they get
    different seeds at evaluation). Default: 506 entries, 319 distinct prompts.
    """
    out = []
    for task in TASKS:
        ms = _split()[0][task]
        n = max(min_per_task, len(ms))
        out.extend(json.loads(json.dumps(ms[i % len(ms)])) for i in range(n))
    return out


def train_task_metadata() -> dict[str, list[dict]]:
    """The six tasks' prompts that are *not* held out (empty for single_object/two_object/counting)."""
    return _split()[1]


# ---------------------------------------------------------------------------------------------
# training-only phrasings (never equal to a GenEval-task prompt)
# ---------------------------------------------------------------------------------------------
PARAPHRASES: tuple[str, ...] = ("an image of", "a picture of", "a drawing of", "")
"""Training-only prefixes for the colour-free tasks (the held-out prompts all say "a photo of")."""


def _prefixed(prefix: str, rest: str) -> str:
    return f"{prefix} {rest}".strip()


def _extra(rng: np.random.Generator) -> dict:
    k = int(rng.integers(6))
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    c = COLORS[int(rng.integers(len(COLORS)))]
    others = [x for x in SHAPES if x != s]
    pre = PARAPHRASES[int(rng.integers(len(PARAPHRASES)))]
    if k == 0:  # one uncoloured object: "an image of a circle", "a photo of one circle"
        text = f"a photo of one {s}" if rng.random() < 0.25 else _prefixed(pre, _a(s))
        return {"tag": "single_object", "include": [{"class": s, "count": 1}], "prompt": text}
    if k == 1:  # counting, coloured ("a photo of two red circles") or paraphrased ("an image of two circles")
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        if rng.random() < 0.5:
            return {"tag": "counting", "include": [{"class": s, "count": n, "color": c}],
                    "exclude": [{"class": s, "count": n + 1}], "prompt": f"a photo of {NUMBERS[n]} {c} {plural(s, n)}"}
        return {"tag": "counting", "include": [{"class": s, "count": n}], "exclude": [{"class": s, "count": n + 1}],
                "prompt": _prefixed(pre, f"{NUMBERS[n]} {plural(s, n)}")}
    b = others[int(rng.integers(len(others)))]
    if k == 2:  # two uncoloured objects, paraphrased
        return {"tag": "two_object", "include": [{"class": s, "count": 1}, {"class": b, "count": 1}],
                "prompt": _prefixed(pre, f"{_a(s)} and {_a(b)}")}
    if k == 3:  # one object coloured, the other not
        if rng.random() < 0.5:
            return {"tag": "two_object", "include": [{"class": s, "count": 1, "color": c}, {"class": b, "count": 1}],
                    "prompt": f"a photo of {_a(c)} {s} and {_a(b)}"}
        return {"tag": "two_object", "include": [{"class": b, "count": 1}, {"class": s, "count": 1, "color": c}],
                "prompt": f"a photo of {_a(b)} and {_a(c)} {s}"}
    if k == 4:  # uncoloured position, paraphrased
        rel = RELATIONS[int(rng.integers(4))]
        return {"tag": "position", "include": [{"class": b, "count": 1}, {"class": s, "count": 1, "position": [rel, 0]}],
                "prompt": _prefixed(pre, f"{_a(s)} {rel} {_a(b)}")}
    # coloured position
    cb = COLORS[int(rng.integers(len(COLORS)))]
    rel = RELATIONS[int(rng.integers(4))]
    return {"tag": "position", "include": [{"class": b, "count": 1, "color": cb},
                                           {"class": s, "count": 1, "color": c, "position": [rel, 0]}],
            "prompt": f"a photo of {_a(c)} {s} {rel} {_a(cb)} {b}"}


TRAIN_MIX = {"colors": 0.12, "position": 0.13, "color_attr": 0.2, "extra": 0.55}


def sample_training(rng: np.random.Generator) -> dict:
    """One training metadata dict (never a held-out prompt)."""
    keys = list(TRAIN_MIX)
    k = keys[int(rng.choice(len(keys), p=np.array(list(TRAIN_MIX.values())) / sum(TRAIN_MIX.values())))]
    held = heldout_prompts()
    while True:
        if k == "extra":
            m = _extra(rng)
        else:
            ms = train_task_metadata()[k]
            m = json.loads(json.dumps(ms[int(rng.integers(len(ms)))]))
        if m["prompt"] not in held:
            return m


TRAINING_SET_SIZE = 2048
"""Entries of :func:`training_metadata` (the RL prompt set of ``prompts.source: embedded:shapes``)."""


@lru_cache(maxsize=1)
def _training_metadata() -> tuple[str, ...]:
    rng = np.random.default_rng(20_251_126)
    return tuple(json.dumps(sample_training(rng)) for _ in range(TRAINING_SET_SIZE))


def training_metadata() -> list[dict]:
    """The fixed RL training prompt set: :data:`TRAINING_SET_SIZE` draws of :func:`sample_training`.

    Covers all six tasks in the proportions of :data:`TRAIN_MIX` (the pretraining mix: the
    colour-free tasks only through training-only phrasings), never a held-out prompt; prompts
    drawn more than once keep their share. Deterministic (a fixed seed), so every rank and every
    resumed run sees the same list.
    """
    return [json.loads(m) for m in _training_metadata()]


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------
def random_scene(rng: np.random.Generator, n: int | None = None) -> Scene:
    """Unconstrained scene: ``n`` (default uniform 0..MAX_OBJECTS) objects, any shapes/colours/cells."""
    if n is None:
        n = int(rng.integers(0, MAX_OBJECTS + 1))
    all_cells = cells()
    idx = rng.choice(len(all_cells), size=n, replace=False)
    return [Obj(SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))], all_cells[int(i)]) for i in idx]


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
            if "position" in r:
                rel, tgt = r["position"]
                ok = ok and all(rel in relative_position(o.box(), t.box()) for o in g for t in groups[int(tgt)])
        if ok:
            return objs
    raise RuntimeError(f"could not place a scene for {meta['prompt']!r}")


__all__ = [
    "TASKS", "RELATIONS", "single_object", "two_object", "counting", "colors", "position", "color_attr",
    "all_task_metadata", "heldout_metadata", "heldout_prompts", "train_task_metadata", "sample_training",
    "training_metadata",
    "random_scene", "scene_for",
]
