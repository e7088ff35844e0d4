"""The ``shapes`` reward: the shapes world's exact detector + GenEval's rules.

Options:

* ``mode="strict"`` (default): 1.0 when every GenEval clause holds (exactly the ShapesEval
  per-image score), else 0.0.
* ``mode="partial"``: the fraction of ``include`` clauses that hold (a clause holds only for a
  detected object of the right shape, and colour / position where asked), halved when an
  ``exclude`` clause fails (too many objects in counting). Exclude clauses give no credit on
  their own, so an empty canvas scores 0. (Not the ``geneval`` reward's ``strict=False`` score, the
  clause fraction ``RuleResult.clause_fraction``, which counts exclude clauses like include clauses.)
* ``paint_penalty`` (default 0.5 in ``partial`` mode, 0.0 in ``strict`` mode): subtracted times
  ``min(1, stray / 144)``, where ``stray`` is the number of foreground pixels that do not belong
  to a detected object of an asked-for shape (144 = one full square object). Paint spread over
  the frame, blobs and unrequested shapes therefore cost reward; the detector itself never
  credits paint (it is not an object).
* ``color_weight`` (default 0.0: off): weight ``w`` of a dense colour term, ``w * (c - 1)`` added to the reward,
  where ``c`` is the mean :func:`~fpo_diffusion.shapes.detector.color_confidence` of the objects the rules read
  for each clause that asks a colour (a missing object counts 0; prompts that ask no colour are untouched). A
  real detector's colour label comes with a probability; the exact detector's verdict is 0/1 and nearly always
  right on the colour tasks, so their groups are all-correct (zero advantage) and give no gradient while the
  palette drifts (measured: orange drawn yellow as counting is learned; BENCHMARKS.md). The term grades how
  surely each object is its colour, so those groups keep a signal. Range ``[0, 1]``.
* ``thresholds``: GenEval ``rules.Thresholds`` (or a dict of its fields); official defaults.
* ``exact_counts`` (default ``False``: GenEval's rules): every asked class must appear exactly as often as
  asked, in every task, not only in counting. GenEval's position, two-object and colour-binding rules read
  the best-scored detection of each class and ignore further copies; the exact detector scores every clean
  object 1.0, so ties go to the official ``argsort`` order (the last copy in raster order), and a policy that
  draws extra copies can place one where the rule looks (measured: position-only RL from a base that draws
  relations rose 0.52 -> 0.70 on test while the share of images with extra copies went 0.03 -> 0.97;
  BENCHMARKS.md). ``True`` adds, for every asked
  class without one, GenEval's counting exclude clause (``count + 1``): an extra copy fails the image.

Range: strict ``[-paint_penalty - color_weight, 1]`` (``[0, 1]`` by default); partial ``[-0.5, 1]`` by default.
Every image needs its GenEval-format metadata (``include``/``exclude``/``tag``), as produced by
``fpo_diffusion.shapes.scenes``. Part of the shapes world: it registers itself in the reward
registry through the ``fpo_diffusion.rewards`` entry point (``rewards`` never imports it).
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from rewards.base import Reward, RewardError
from rewards.geneval.metadata import with_exact_counts
from rewards.registry import register_reward

from .detector import Component, analyse, color_confidence, detections, painted_share

STRAY_SCALE = 144.0


def color_clause_confidence(comps: list[Component], kept: dict, meta: dict) -> float | None:
    """The mean :func:`~fpo_diffusion.shapes.detector.color_confidence` of the objects the colour clauses of
    ``meta`` read (``kept``: the rules' filtered detections of ``comps``; the first ``count`` of the class, a missing
    one counting 0); ``None`` when no clause asks a colour."""
    median = {id(c.mask): c.median_rgb for c in comps}
    confs = []
    for q in meta.get("include", []):
        if "color" in q:
            found = kept.get(q["class"], [])[:int(q["count"])]
            confs += [color_confidence(median[id(d.mask)], q["color"]) for d in found]
            confs += [0.0] * (int(q["count"]) - len(found))
    return sum(confs) / len(confs) if confs else None


def shapes_score(image: Image.Image, meta: dict, mode: str = "strict", paint_penalty: float = 0.0,
                 thresholds=None, exact_counts: bool = False, color_weight: float = 0.0) -> tuple[float, dict]:
    """Score one image; returns ``(reward, info)`` with the rules' result and the stray-paint count."""
    from rewards.geneval.rules import Thresholds, evaluate, filter_detections

    thresholds = thresholds or Thresholds()
    if exact_counts:
        meta = with_exact_counts(meta)
    comps = analyse(image)
    dets = detections(comps)
    res = evaluate(dets, meta, image=image, thresholds=thresholds)
    n_inc = len(meta.get("include", []))
    if mode == "strict":
        r = 1.0 if res.correct else 0.0
    elif mode == "partial":
        inc = res.clauses[:n_inc]
        exc = res.clauses[n_inc:]
        r = (sum(inc) / len(inc)) if inc else float(res.correct)
        if not all(exc):
            r *= 0.5
    else:
        raise ValueError(f"reward 'shapes': mode must be 'strict' or 'partial', got {mode!r}")
    asked = {q["class"] for q in meta.get("include", [])}
    kept = filter_detections(dets, meta.get("tag"), thresholds)
    fg = sum(c.area for c in comps)
    wanted = sum(c.area for c in comps if c.shape in asked and any(c.mask is d.mask for d in kept.get(c.shape, [])))
    stray = float(fg - wanted)
    r -= paint_penalty * min(1.0, stray / STRAY_SCALE)
    color_conf = color_clause_confidence(comps, kept, meta)
    if color_weight and color_conf is not None:
        r += color_weight * (color_conf - 1.0)
    return float(r), {"correct": res.correct, "reason": res.reason, "clauses": res.clauses, "stray_px": stray,
                      "painted_share": painted_share(image), "color_confidence": color_conf}


@register_reward("shapes")
class ShapesReward(Reward):
    """Strict (0/1) or partial-credit GenEval score of the shapes world, minus a stray-paint penalty."""

    range = (-0.5, 1.0)
    batch_size = 64

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = None, *, mode: str = "strict",
                 paint_penalty: float | None = None, thresholds: Any = None, exact_counts: bool = False,
                 color_weight: float = 0.0, **kwargs: Any):
        super().__init__(device=device, batch_size=batch_size, **kwargs)
        from rewards.geneval.rules import Thresholds

        if mode not in ("strict", "partial"):
            raise ValueError(f"reward 'shapes': mode must be 'strict' or 'partial', got {mode!r}")
        self.mode = mode
        self.paint_penalty = float(paint_penalty if paint_penalty is not None else (0.5 if mode == "partial" else 0.0))
        if isinstance(thresholds, dict):
            thresholds = Thresholds(**thresholds)
        self.thresholds = thresholds or Thresholds()
        if isinstance(color_weight, bool) or not isinstance(color_weight, (int, float)) or not 0 <= color_weight <= 1:
            raise ValueError(f"reward 'shapes': color_weight must be a number in [0, 1], got {color_weight!r}")
        self.color_weight = float(color_weight)
        self.range = (-self.paint_penalty - self.color_weight, 1.0)
        if not isinstance(exact_counts, bool):
            raise ValueError(f"reward 'shapes': exact_counts must be true or false, got {exact_counts!r}")
        self.exact_counts = exact_counts

    @classmethod
    def check_metadata(cls, entry: dict, options: dict) -> str | None:
        """GenEval metadata of the shapes world: a task tag, positive integer counts, classes among its shapes."""
        from rewards.geneval.metadata import TASKS, validate_metadata

        from .world import SHAPES

        if not entry or "include" not in entry:
            return ("needs GenEval metadata per prompt (tag, include, exclude), e.g. a .jsonl prompt file of "
                    "scenes.training_metadata() lines or prompts.source=embedded:shapes")
        problem = validate_metadata(entry, set(SHAPES), TASKS)
        return f"invalid GenEval metadata: {problem}" if problem else None

    def score(self, images: list[Image.Image], prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        out = []
        for img, p, m in zip(images, prompts, metadata):
            if not m or "include" not in m:
                raise RewardError(f"reward 'shapes' needs GenEval metadata with 'include' for prompt {p!r}")
            out.append(shapes_score(img, m, self.mode, self.paint_penalty, self.thresholds, self.exact_counts,
                                    self.color_weight)[0])
        return torch.tensor(out, dtype=torch.float32)


__all__ = ["ShapesReward", "color_clause_confidence", "shapes_score"]
