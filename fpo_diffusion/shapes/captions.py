"""The pretraining data of the shapes world: random scenes and web-alt-text-like captions.

**Pretraining captions** (:func:`pretraining_example`) behave like web alt-text: they always
name the classes, but state counts, positions and which colour belongs to which object only
some of the time (:class:`CaptionStyle`, the documented knobs). That is the deficit RL has to
fix, as on real models. The benchmark's prompts and split are ``scenes.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import Obj, Scene
from .world import COLORS, MAX_OBJECTS, NUMBERS, SHAPES, article, cells, plural


def random_scene(rng: np.random.Generator, n: int | None = None) -> Scene:
    """Unconstrained scene: ``n`` (default uniform 0..MAX_OBJECTS) objects, any shapes/colours/cells."""
    if n is None:
        n = int(rng.integers(0, MAX_OBJECTS + 1))
    all_cells = cells()
    idx = rng.choice(len(all_cells), size=n, replace=False)
    return [Obj(SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))], all_cells[int(i)]) for i in idx]


@dataclass(frozen=True)
class CaptionStyle:
    """How often a pretraining caption states what GenEval tests (the base model's deficit).

    Classes are always named; the rest is stated with these probabilities, otherwise left out
    (counts become a bare plural, relations become "and", colours are dropped or listed apart
    from their objects).
    """

    p_all_classes: float = 0.75
    """A caption names every class in the scene; otherwise just one of them (alt-text often names
    only the main object)."""
    p_color: float = 0.6
    """A caption names the objects' colours."""
    p_bind: float = 0.15
    """Given colours and two or more objects: each colour is written next to its object ("a red star
    and a blue heart"); otherwise the colours are listed after the objects ("a star and a heart, blue and red")."""
    p_count: float = 0.25
    """A class drawn 2-4 times is given its number ("three stars"); otherwise a bare plural ("stars")."""
    p_position: float = 0.1
    """A two-object scene's relation is stated ("a star left of a heart"); otherwise "a star and a heart"."""
    p_photo: float = 0.6
    """The caption starts with "a photo of" (else "an image of", "a picture of" or nothing)."""
    p_empty: float = 0.1
    """The caption is empty (classifier-free guidance dropout)."""
    kinds: tuple[float, float, float, float] = (0.25, 0.3, 0.2, 0.25)
    """Scene kinds: one object, two objects of different classes, 2-4 objects of one class, 1-4 of any class."""

    def __post_init__(self):
        for name in ("p_all_classes", "p_color", "p_bind", "p_count", "p_position", "p_photo", "p_empty"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"CaptionStyle.{name} must be in [0, 1], got {v}")
        if len(self.kinds) != 4 or min(self.kinds) < 0 or sum(self.kinds) <= 0:
            raise ValueError(f"CaptionStyle.kinds must be 4 non-negative weights, got {self.kinds}")


PREFIXES: tuple[str, ...] = ("an image of", "a picture of", "")


def _noun_phrase(shape: str, n: int, color: str | None, style: CaptionStyle, rng) -> str:
    word = plural(shape, n)
    if color:
        word = f"{color} {word}"
    if n == 1:
        return f"{article(word)} {word}"
    return f"{NUMBERS[n]} {word}" if rng.random() < style.p_count else word


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: np.random.Generator, style: CaptionStyle = CaptionStyle()) -> str:
    """An alt-text-like caption of ``scene`` (see :class:`CaptionStyle`); never wrong, often incomplete."""
    from rewards.geneval.rules import relative_position

    if not scene or rng.random() < style.p_empty:
        return ""
    if len({o.shape for o in scene}) > 1 and rng.random() >= style.p_all_classes:
        named = sorted({o.shape for o in scene})[int(rng.integers(len({o.shape for o in scene})))]
        scene = [o for o in scene if o.shape == named]  # the caption speaks of one class only
    by_class: dict[str, list[Obj]] = {}
    for o in scene:
        by_class.setdefault(o.shape, []).append(o)
    with_color = rng.random() < style.p_color
    groups = list(by_class.items())
    # a colour can sit next to its noun only when every object of the class has that colour
    uniform = {s: len({o.color for o in g}) == 1 for s, g in groups}
    bind = with_color and (len(scene) == 1 or rng.random() < style.p_bind) and all(uniform.values())
    if len(scene) == 2 and len(groups) == 2 and rng.random() < style.p_position:
        a, b = scene
        rels = sorted(relative_position(a.box(), b.box()))
        if rels:
            rel = rels[int(rng.integers(len(rels)))]
            na = _noun_phrase(a.shape, 1, a.color if bind else None, style, rng)
            nb = _noun_phrase(b.shape, 1, b.color if bind else None, style, rng)
            body = f"{na} {rel} {nb}"
            if with_color and not bind:
                body += ", " + " and ".join(sorted(sorted({a.color, b.color}), key=lambda _: rng.random()))
            return _prefix(body, style, rng)
    parts = [_noun_phrase(s, len(g), g[0].color if bind else None, style, rng) for s, g in groups]
    body = _join(parts)
    if with_color and not bind:
        cols = sorted({o.color for o in scene})
        rng.shuffle(cols)
        body += ", " + _join(cols)
    return _prefix(body, style, rng)


def _prefix(body: str, style: CaptionStyle, rng) -> str:
    if rng.random() < style.p_photo:
        return f"a photo of {body}"
    return f"{PREFIXES[int(rng.integers(len(PREFIXES)))]} {body}".strip()


def pretraining_scene(rng: np.random.Generator, style: CaptionStyle = CaptionStyle()) -> Scene:
    """A random scene of one of the four kinds of :attr:`CaptionStyle.kinds`."""
    w = np.asarray(style.kinds, dtype=np.float64)
    kind = int(rng.choice(4, p=w / w.sum()))
    all_cells = cells()
    if kind == 0:
        n, shapes = 1, [SHAPES[int(rng.integers(len(SHAPES)))]]
    elif kind == 1:
        n = 2
        shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=2, replace=False)]
    elif kind == 2:
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        shapes = [SHAPES[int(rng.integers(len(SHAPES)))]] * n
    else:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(n)]
    same_color = kind == 2 and rng.random() < 0.5
    col = COLORS[int(rng.integers(len(COLORS)))]
    idx = rng.choice(len(all_cells), size=n, replace=False)
    return [Obj(s, col if same_color else COLORS[int(rng.integers(len(COLORS)))], all_cells[int(i)])
            for s, i in zip(shapes, idx)]


def pretraining_example(rng: np.random.Generator, style: CaptionStyle = CaptionStyle()) -> tuple[Scene, str]:
    """One pretraining pair: a scene and its alt-text caption."""
    scene = pretraining_scene(rng, style)
    return scene, caption(scene, rng, style)


__all__ = ["CaptionStyle", "PREFIXES", "caption", "pretraining_example", "pretraining_scene", "random_scene"]
