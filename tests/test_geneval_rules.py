"""GenEval rules engine on synthetic detections (official evaluator semantics)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rewards.geneval.detection import Detection
from rewards.geneval.rules import (
    RuleResult, Thresholds, compute_iou, evaluate, filter_detections, relative_position,
)


def det(label, box=(0, 0, 10, 10), score=0.95, color=None, mask=None):
    return Detection(label=label, box=tuple(float(c) for c in box), score=score, mask=mask, color=color)


def dets(*ds):
    out = {}
    for d in ds:
        out.setdefault(d.label, []).append(d)
    return out


SINGLE = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
TWO = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
       "prompt": "a photo of a bench and a sports ball"}
COUNT = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
         "prompt": "a photo of two clocks"}
COLORS = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"}
POS = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                      {"class": "dog", "count": 1, "position": ["right of", 0]}],
       "prompt": "a photo of a dog right of a teddy bear"}
ATTR = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                         {"class": "microwave", "count": 1, "color": "purple"}],
        "prompt": "a photo of a green bus and a purple microwave"}


# --- single / two objects -------------------------------------------------------------------

def test_single_object_pass_and_fail():
    r = evaluate(dets(det("cow", score=0.5)), SINGLE)
    assert r.correct and r.reason == "" and r.clauses == [True] and r.clause_fraction == 1.0
    assert r.details == {"cow": [[0.0, 0.0, 10.0, 10.0, 0.5]]}
    r = evaluate(dets(det("dog")), SINGLE)
    assert not r.correct and r.reason == "expected cow>=1, found 0" and r.clause_fraction == 0.0


def test_detection_threshold_is_strict_0_3():
    assert not evaluate(dets(det("cow", score=0.3)), SINGLE).correct  # official: score > 0.3
    assert evaluate(dets(det("cow", score=0.3001)), SINGLE).correct


def test_two_object_clause_fraction():
    r = evaluate(dets(det("bench")), TWO)
    assert not r.correct and r.clauses == [True, False] and r.clause_fraction == 0.5
    assert r.reason == "expected sports ball>=1, found 0"
    assert evaluate(dets(det("bench"), det("sports ball")), TWO).correct


# --- counting ---------------------------------------------------------------------------------

def test_counting_pass_and_fail():
    assert evaluate(dets(det("clock"), det("clock")), COUNT).correct
    r = evaluate(dets(det("clock")), COUNT)
    assert not r.correct and r.reason == "expected clock>=2, found 1"
    r = evaluate(dets(det("clock"), det("clock"), det("clock")), COUNT)
    assert not r.correct and r.reason == "expected clock<3, found 3" and r.clauses == [True, False]


def test_counting_uses_0_9_for_include_and_exclude():
    # a third clock at 0.85 passes 0.3 but not the counting threshold: not counted, not excluded
    r = evaluate(dets(det("clock"), det("clock", score=0.91), det("clock", score=0.85)), COUNT)
    assert r.correct and len(r.details["clock"]) == 2
    # the same scores under a non-counting tag would count all three
    meta = dict(COUNT, tag="single_object")
    assert not evaluate(dets(det("clock"), det("clock", score=0.91), det("clock", score=0.85)), meta).correct
    # exactly 0.9 is not above the counting threshold
    assert not evaluate(dets(det("clock"), det("clock", score=0.9)), COUNT).correct


def test_exclude_counts_after_the_16_cap():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 1}], "exclude": [{"class": "cup", "count": 17}]}
    r = evaluate(dets(*[det("cup", score=0.95 + i * 1e-3) for i in range(20)]), meta)
    assert r.correct and len(r.details["cup"]) == 16
    # the 16 kept are the 16 best
    assert min(b[4] for b in r.details["cup"]) == pytest.approx(0.95 + 4e-3)
    r = evaluate(dets(*[det("cup") for _ in range(20)]), dict(meta, exclude=[{"class": "cup", "count": 16}]))
    assert not r.correct and r.reason == "expected cup<16, found 16"


def test_max_objects_and_nms_options():
    many = dets(*[det("cup", box=(0, 0, 10, 10), score=0.5 + i / 100) for i in range(5)])
    assert len(filter_detections(many, "x", Thresholds(max_objects=3))["cup"]) == 3
    # NMS off by default (1.0): identical boxes all survive; with 0.5 only the best survives
    assert len(filter_detections(many, "x")["cup"]) == 5
    kept = filter_detections(many, "x", Thresholds(nms=0.5))["cup"]
    assert len(kept) == 1 and kept[0].score == pytest.approx(0.54)


def test_compute_iou_official_plus_one():
    assert compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    # areas 10x10=100 each, intersection 5x10=50 -> 50/150
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


# --- colours ----------------------------------------------------------------------------------

def test_colors_with_detector_colour():
    assert evaluate(dets(det("car", color="pink")), COLORS).correct
    r = evaluate(dets(det("car", color="red")), COLORS)
    assert not r.correct and r.reason == "expected pink car>=1, found 0 pink; and 1 red"


def test_colors_with_color_fn_sees_image_and_detection():
    seen = []

    def color_fn(image, d):
        seen.append((image.size, d.label, d.box))
        return "pink"

    img = Image.new("RGB", (32, 32))
    assert evaluate(dets(det("car")), COLORS, image=img, color_fn=color_fn).correct
    assert seen == [((32, 32), "car", (0.0, 0.0, 10.0, 10.0))]
    with pytest.raises(ValueError, match="colour"):
        evaluate(dets(det("car")), COLORS)


def test_colour_counting_on_top_count_only():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    # top-2 by score are red+blue; a red third is ignored -> fail, official reason order
    d = dets(det("car", score=0.9, color="red"), det("car", score=0.8, color="blue"), det("car", score=0.7, color="red"))
    r = evaluate(d, meta)
    assert not r.correct and r.reason == "expected red car>=2, found 1 red; and 1 red, 1 blue"
    d = dets(det("car", score=0.9, color="red"), det("car", score=0.8, color="red"), det("car", score=0.7, color="blue"))
    assert evaluate(d, meta).correct


def test_color_attr():
    assert evaluate(dets(det("bus", color="green"), det("microwave", color="purple")), ATTR).correct
    r = evaluate(dets(det("bus", color="green"), det("microwave", color="white")), ATTR)
    assert not r.correct and r.clauses == [True, False]
    assert r.reason == "expected purple microwave>=1, found 0 purple; and 1 white"


# --- position ---------------------------------------------------------------------------------

def test_position_pass_and_fail():
    bear, dog_right, dog_left = (0, 0, 10, 10), (50, 0, 60, 10), (-50, 0, -40, 10)
    assert evaluate(dets(det("teddy bear", bear), det("dog", dog_right)), POS).correct
    r = evaluate(dets(det("teddy bear", bear), det("dog", dog_left)), POS)
    assert not r.correct and r.reason == "expected dog right of target, found left of target"
    r = evaluate(dets(det("teddy bear", bear), det("dog", (2, 0, 12, 10))), POS)  # overlapping: no relation
    assert r.reason == "expected dog right of target, found  target"


def test_geneval_reward_exact_counts_fails_extra_copies_that_the_rules_ignore():
    """The reward's ``exact_counts`` option: GenEval reads the top detection per class outside counting, so a
    second dog left of the bear (or a second, wrongly coloured bus) passes its rules; with ``exact_counts`` the
    extra copy fails, a scene with exactly the asked objects still passes, and counting keeps its own clause."""
    from rewards.geneval.reward import GenEvalReward

    bear, right, left = det("teddy bear", (0, 0, 10, 10)), det("dog", (50, 0, 60, 10)), det("dog", (-50, 0, -40, 10), 0.9)
    green_bus, red_bus, mw = det("bus", color="green"), det("bus", (20, 0, 30, 10), 0.9, color="red"), \
        det("microwave", (40, 0, 50, 10), color="purple")
    clock = [det("clock", (20 * i, 0, 20 * i + 10, 10), 0.95) for i in range(3)]
    scenes = [(dets(bear, right), POS), (dets(bear, right, left), POS), (dets(green_bus, mw), ATTR),
              (dets(green_bus, red_bus, mw), ATTR), (dets(*clock[:2]), COUNT), (dets(*clock), COUNT)]
    images = [Image.new("RGB", (64, 64)) for _ in scenes]

    def scores(**options):
        found = iter([d for d, _ in scenes])
        reward = GenEvalReward(detector=lambda ims: [next(found) for _ in ims], strict=True, **options)
        return reward.score(images, [m["prompt"] for _, m in scenes], [m for _, m in scenes]).tolist()

    assert scores() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert scores(exact_counts=True) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="exact_counts"):
        GenEvalReward(detector=lambda ims: [], exact_counts="yes")


def test_position_without_target():
    r = evaluate(dets(det("dog", (50, 0, 60, 10))), POS)
    assert not r.correct and r.clauses == [False, False]
    assert r.reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"


def test_position_uses_top_count_and_all_targets():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 2},
                                           {"class": "dog", "count": 1, "position": ["below", 0]}]}
    cats = [det("cat", (0, 0, 10, 10), 0.9), det("cat", (20, 0, 30, 10), 0.8)]
    # dog below both cats passes; a low-score third cat far below is not a target
    d = dets(*cats, det("cat", (0, 200, 10, 210), 0.5), det("dog", (10, 100, 20, 110)))
    assert evaluate(d, meta).correct
    # dog below the first cat only
    d = dets(*cats, det("dog", (0, 5, 10, 15), 0.99))
    r = evaluate(d, meta)
    assert not r.correct


def test_position_target_must_be_earlier():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["below", 1]},
                                           {"class": "cat", "count": 1}]}
    with pytest.raises(ValueError, match="earlier"):
        evaluate(dets(det("dog"), det("cat")), meta)


@pytest.mark.parametrize("a, b, expected", [
    ((100, 0, 110, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (100, 0, 110, 10), {"left of"}),
    ((0, 0, 10, 10), (0, 100, 10, 110), {"above"}),
    ((0, 100, 10, 110), (0, 0, 10, 10), {"below"}),
    ((100, 100, 110, 110), (0, 0, 10, 10), {"right of", "below"}),   # diagonal: dx = dy = 0.98/sqrt2*... > 0.5
    ((0, 0, 10, 10), (100, 100, 110, 110), {"left of", "above"}),
    ((0, 0, 10, 10), (0, 0, 10, 10), set()),                           # zero offset
    ((0, 0, 10, 10), (1.5, 1.5, 11.5, 11.5), set()),                    # offset swallowed by the 0.1*(dims) margin
    ((100, 30, 110, 40), (0, 0, 10, 10), {"right of"}),                # mostly right, a bit below
])
def test_relative_position_branches(a, b, expected):
    assert relative_position(a, b, 0.1) == expected


def test_relative_position_by_hand():
    # centres (30, 5) and (5, 5): offset (25, 0); dims (10,10)+(10,10); margin 0.1*20=2 -> revised (23, 0)
    # dx = 23/25 = 0.92 > 0.5 -> right of
    assert relative_position(det("a", (25, 0, 35, 10)), det("b", (0, 0, 10, 10)), 0.1) == {"right of"}
    # offset (2.5, 0) vs margin 2: revised 0.5 -> dx = 0.2: not a relation, but not the empty-offset case
    assert relative_position((2.5, 0, 12.5, 10), (0, 0, 10, 10), 0.1) == set()
    # near-zero: revised offset 0.0005 < 1e-3 on both axes -> empty set before normalising
    assert relative_position((2.0005, 0, 12.0005, 10), (0, 0, 10, 10), 0.1) == set()
    # threshold 0 turns the same small offset into a relation
    assert relative_position((2.0005, 0, 12.0005, 10), (0, 0, 10, 10), 0.0) == {"right of"}
    # accepts official (box-with-score, mask) pairs
    assert relative_position((np.array([25, 0, 35, 10, 0.9]), None), (np.array([0, 0, 10, 10, 0.9]), None)) == {"right of"}


def test_relative_position_diagonal_threshold_boundary():
    # offset (10, 10): norm 14.14; margin 0.1*(4+4)=0.8 -> revised (9.2, 9.2) / 14.14 = 0.65 > 0.5 each
    assert relative_position((10, 10, 14, 14), (0, 0, 4, 4)) == {"right of", "below"}
    # a steep offset (1, 10): dx = (1-0.8)/10.05 = 0.02 -> only below
    assert relative_position((1, 10, 5, 14), (0, 0, 4, 4)) == {"below"}


def test_rule_result_clause_fraction_without_clauses():
    assert RuleResult(True, "").clause_fraction == 1.0
    assert RuleResult(False, "x").clause_fraction == 0.0


# --- tie order and threshold dtype, as the official evaluator -------------------------------
def _official_filter(boxes_scores: np.ndarray, confidence_threshold: float, max_objects: int = 16,
                     nms_threshold: float = 1.0) -> list[int]:
    """``evaluate_image``'s per-class filtering from djghosh13/geneval ``evaluate_images.py``, transcribed
    (``bbox[index]`` is mmdet's float32 ``[n, 5]`` array). Returns the indices kept, in order.

    ``np.argsort`` there is numpy's default sort, called here as there (not ``kind="stable"``): the order of
    tied scores is whatever that numpy gives (numpy 1.x: insertion sort up to 16 elements, introsort
    beyond; numpy 2 on AVX-512 CPUs reorders ties from 4 elements on)."""
    def iou(a, b):
        def area(x):
            return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)
        i = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
        return i / (area(a) + area(b) - i)

    bbox = boxes_scores.astype(np.float32)
    ordering = np.argsort(bbox[:, 4])[::-1]
    ordering = ordering[bbox[ordering, 4] > confidence_threshold]
    ordering = ordering[:max_objects].tolist()
    kept = []
    while ordering:
        max_obj = ordering.pop(0)
        kept.append(max_obj)
        ordering = [obj for obj in ordering if nms_threshold == 1 or iou(bbox[max_obj], bbox[obj]) < nms_threshold]
    return kept


def test_equal_scores_come_out_in_reverse_detector_order():
    a, b, c = det("cup", (0, 0, 9, 9), 0.5), det("cup", (20, 0, 29, 9), 0.8), det("cup", (40, 0, 49, 9), 0.5)
    assert filter_detections({"cup": [a, b, c]}, "x")["cup"] == [b, c, a]
    assert _official_filter(np.array([[*x.box, x.score] for x in (a, b, c)]), 0.3) == [1, 2, 0]
    # it decides which object a clause looks at: of two equally scored cups the later-listed one
    # (on the right) is the one compared with the bowl, so "a cup left of a bowl" fails
    left, right = det("cup", (0, 40, 9, 49)), det("cup", (80, 40, 89, 49))
    bowl = det("bowl", (40, 40, 49, 49))
    meta = {"tag": "position", "include": [{"class": "bowl", "count": 1},
                                           {"class": "cup", "count": 1, "position": ["left of", 0]}]}
    r = evaluate({"bowl": [bowl], "cup": [left, right]}, meta)
    assert not r.correct and r.reason == "expected cup left of target, found right of target"
    assert evaluate({"bowl": [bowl], "cup": [right, left]}, meta).correct
    # counting looks at the top `count`, the colour clause at those same objects
    red, blue = det("car", score=0.95, color="red"), det("car", score=0.95, color="blue")
    colour = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert not evaluate({"car": [red, blue]}, colour).correct
    assert evaluate({"car": [blue, red]}, colour).correct


def test_tied_scores_are_ordered_by_the_official_default_argsort_not_a_stable_one():
    """Where many detections of a class tie, numpy's default ``argsort`` (the official call) and a stable
    sort disagree (numpy 1.x: from 17 ties on; numpy 2 on AVX-512: already with a few): the official
    order decides which objects a colour clause looks at."""
    rng = np.random.default_rng(3)
    for _ in range(200):  # tied float32 scores on which this numpy's two sorts disagree, where it has any
        scores = rng.choice(np.float32([0.5, 0.95, 1.0]), 24)
        if not np.array_equal(np.argsort(scores), np.argsort(scores, kind="stable")):
            break
    ds = [det("car", (2 * i, 0, 2 * i + 1, 1), float(s), color="red" if i % 2 else "blue")
          for i, s in enumerate(scores)]
    official = np.argsort(scores)[::-1][:16].tolist()
    stable = np.argsort(scores, kind="stable")[::-1][:16].tolist()
    kept = filter_detections({"car": ds}, "colors")["car"]
    assert [id(d) for d in kept] == [id(ds[i]) for i in official]  # the official order, on every numpy
    if official != stable:  # and not the stable one where the two differ (this machine's numpy: they do)
        assert [id(d) for d in kept] != [id(ds[i]) for i in stable]
    assert _official_filter(np.array([[*d.box, d.score] for d in ds]), 0.3) == official


def test_scores_are_compared_with_the_threshold_in_float32():
    f32 = float(np.float32(0.3))  # 0.30000001192..., above the float64 0.3
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    r = evaluate(dets(det("cow", score=f32)), SINGLE)
    assert not r.correct and r.reason == "expected cow>=1, found 0"  # official: float32(0.3) > float32(0.3) is False
    assert evaluate(dets(det("cow", score=above)), SINGLE).correct
    two = [det("clock", score=float(np.float32(0.9))), det("clock", score=0.95)]
    assert filter_detections({"clock": two}, "counting") == {"clock": [two[1]]}
    assert _official_filter(np.array([[*d.box, d.score] for d in two]), 0.9) == [1]


def test_filtering_matches_the_official_code_on_random_tied_detections():
    rng = np.random.default_rng(0)
    levels = np.float32([0.3, 0.5, 0.9, 0.95, 1.0])
    for case in range(400):
        n = int(rng.integers(0, 22))
        scores = rng.choice(levels, n) if case % 2 else rng.choice(levels, n) + rng.normal(0, 1e-8, n)
        xy = rng.integers(0, 40, (n, 2))
        boxes = np.concatenate([xy, xy + rng.integers(2, 20, (n, 2))], axis=1).astype(np.float32)
        ds = [det("cup", tuple(boxes[i]), float(np.float32(scores[i]))) for i in range(n)]
        tag = "counting" if case % 3 == 0 else "two_object"
        th = Thresholds(max_objects=int(rng.integers(1, 17)), nms=1.0 if case % 4 else 0.5)
        ours = filter_detections({"cup": ds}, tag, th).get("cup", [])
        ref = _official_filter(np.column_stack([boxes, np.float32(scores)]) if n else np.zeros((0, 5)),
                               th.for_tag(tag), th.max_objects, th.nms)
        assert [id(d) for d in ours] == [id(ds[i]) for i in ref], case
