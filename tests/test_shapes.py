"""The shapes world: renderer, scene/metadata generator, exact detector, GenEval rules, reward."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fpo_diffusion.shapes import scenes as S
from fpo_diffusion.shapes.detector import ShapesDetector, analyse
from fpo_diffusion.shapes.render import Obj, render, render_array
from fpo_diffusion.shapes.world import BACKGROUND, COLORS, SHAPES, shape_mask
from rewards.geneval.metadata import validate_metadata
from rewards.geneval.rules import COLORS as GENEVAL_COLORS
from rewards.geneval.rules import evaluate

DET = ShapesDetector()


def _ok(scene, meta) -> bool:
    img = render(scene)
    return evaluate(DET.detect(img), meta, image=img).correct


def _kept(dets):
    """Detections that survive GenEval's detection threshold (0.3)."""
    from rewards.geneval.rules import filter_detections

    return {k: v for k, v in filter_detections(dets, "single_object").items() if v}


def test_vocabulary_is_geneval_and_distinct():
    assert set(COLORS) <= set(GENEVAL_COLORS)
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                ma, mb = shape_mask(a), shape_mask(b)
                assert (ma & mb).sum() / (ma | mb).sum() <= 0.785


def test_render_deterministic():
    rng = np.random.default_rng(0)
    sc = S.random_scene(rng, 4)
    assert np.array_equal(render_array(sc), render_array(list(sc)))
    assert render(sc).size == (48, 48)


@pytest.mark.parametrize("task", S.TASKS)
def test_detector_scores_renders_perfectly(task):
    rng = np.random.default_rng(123)
    metas = [m for m in S.heldout_metadata() if m["tag"] == task] + S.all_task_metadata()[task][:40]
    for i in range(120):
        m = metas[i % len(metas)]
        assert _ok(S.scene_for(m, rng), m), m["prompt"]


def test_detections_exact_on_renders():
    rng = np.random.default_rng(7)
    for _ in range(100):
        sc = S.random_scene(rng)
        dets = DET.detect(render(sc))
        got = sorted((d.label, d.color, d.box, d.score) for v in dets.values() for d in v)
        want = sorted((o.shape, o.color, tuple(float(x) for x in o.box()), 1.0) for o in sc)
        assert got == want


def test_tolerates_generation_noise():
    rng = np.random.default_rng(1)
    n_ok = 0
    for i in range(60):
        m = S.heldout_metadata()[i * 8]
        a = render_array(S.scene_for(m, rng)).astype(np.float64)
        a += rng.normal(0, 12, a.shape)  # colour noise
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        n_ok += evaluate(DET.detect(img), m, image=img).correct
    assert n_ok == 60


def test_tolerates_a_ragged_edge():
    a = render_array([Obj("circle", "red", (1, 1))])
    a[16 + 7, 16 + 2] = BACKGROUND  # a pixel missing on the rim
    a[16 + 1, 16 + 7] = (200, 40, 40)  # one grown, slightly off-colour
    dets = DET.detect(a)
    assert [d.label for d in dets["circle"]] == ["circle"] and dets["circle"][0].color == "red"
    assert dets["circle"][0].score > 0.9


def test_fails_wrong_shape_and_colour():
    m = S.colors("circle", "red")
    assert _ok([Obj("circle", "red", (0, 0))], m)
    assert not _ok([Obj("square", "red", (0, 0))], m)
    assert not _ok([Obj("circle", "blue", (0, 0))], m)
    assert not _ok([Obj("triangle", "red", (0, 0))], S.single_object("circle"))


def test_fails_extra_object_in_counting_only():
    m = S.counting("circle", 2)
    two = [Obj("circle", "red", (0, 0)), Obj("circle", "blue", (2, 2))]
    assert _ok(two, m)
    assert not _ok(two + [Obj("circle", "green", (1, 1))], m)  # exclude clause: 3 circles
    assert _ok(two + [Obj("square", "green", (1, 1))], m)  # GenEval ignores other classes
    assert not _ok(two[:1], m)
    # single_object: GenEval only asks for >= 1
    assert _ok([Obj("circle", "red", (0, 0)), Obj("cross", "red", (1, 1))], S.single_object("circle"))


def test_fails_swapped_position():
    m = S.position("circle", "left of", "square")
    good = [Obj("square", "red", (1, 2)), Obj("circle", "blue", (1, 0))]
    swapped = [Obj("square", "red", (1, 0)), Obj("circle", "blue", (1, 2))]
    assert _ok(good, m)
    assert not _ok(swapped, m)
    above = S.position("circle", "above", "square")
    assert _ok([Obj("square", "red", (2, 1)), Obj("circle", "blue", (0, 1))], above)
    assert not _ok([Obj("square", "red", (0, 1)), Obj("circle", "blue", (2, 1))], above)


def test_color_attr_binding():
    m = S.color_attr("circle", "red", "square", "blue")
    assert _ok([Obj("circle", "red", (0, 0)), Obj("square", "blue", (2, 2))], m)
    assert not _ok([Obj("circle", "blue", (0, 0)), Obj("square", "red", (2, 2))], m)


def test_paint_is_not_an_object():
    for col in [(220, 30, 30), (255, 255, 255)]:
        full = Image.new("RGB", (48, 48), col)
        assert DET.detect(full) == {}
    a = render_array([])
    a[4:40, 4:40] = (220, 30, 30)  # a big blob over several cells
    assert DET.detect(a) == {}
    comps = analyse(a)
    assert len(comps) == 1 and comps[0].is_paint


def test_blob_that_matches_no_shape_is_not_an_object():
    a = render_array([])
    a[18:30, 20:26] = (220, 30, 30)  # a 6x12 bar
    assert _kept(DET.detect(a)) == {}
    b = render_array([])
    yy, xx = np.mgrid[0:48, 0:48]
    b[((xx - 24) / 6.0) ** 2 + ((yy - 24) / 3.0) ** 2 <= 1] = (30, 70, 230)  # a flat ellipse
    assert _kept(DET.detect(b)) == {}


def test_two_touching_objects_are_not_two_objects():
    a = render_array([Obj("square", "red", (1, 0))])
    a[18:30, 14:34] = (220, 30, 30)  # paint bridging into the next cell
    assert DET.detect(a) == {}


def test_metadata_valid_for_all_tasks():
    allm = S.all_task_metadata()
    assert set(allm) == set(S.TASKS)
    from shared_data import geneval_dir

    official = [json.loads(line) for line in open(geneval_dir() / "evaluation_metadata.jsonl")]
    official_keys = {k for m in official for k in m}
    for task, metas in allm.items():
        assert metas
        for m in metas:
            assert m["tag"] == task
            assert validate_metadata(m, set(SHAPES)) is None, m
            if official_keys:
                assert set(m) <= official_keys
            assert m["prompt"].startswith("a photo of ")
            for r in m["include"]:
                assert r["class"] in SHAPES and r.get("color", "red") in COLORS
    c = S.counting("cross", 3)
    assert c["exclude"] == [{"class": "cross", "count": 4}] and c["prompt"] == "a photo of three crosses"
    p = S.position("circle", "below", "triangle")
    assert p["include"][1]["position"] == ["below", 0] and p["include"][0]["class"] == "triangle"
    assert S.colors("circle", "orange")["prompt"] == "a photo of an orange circle"


def test_heldout_split_fixed_and_disjoint():
    held = S.heldout_metadata()
    assert len(held) >= 300 and len({m["prompt"] for m in held}) >= 300
    assert {m["tag"] for m in held} == set(S.TASKS)
    assert held == S.heldout_metadata()
    hp = S.heldout_prompts()
    rng = np.random.default_rng(0)
    for _ in range(3000):
        m = S.sample_training(rng)
        assert m["prompt"] not in hp
        assert validate_metadata(m, set(SHAPES)) is None
    for ms in S.train_task_metadata().values():
        assert not ({m["prompt"] for m in ms} & hp)
    # the RL prompt set of `prompts.source: embedded:shapes`: fixed, all six tasks, never a held-out prompt
    train = S.training_metadata()
    assert train == S.training_metadata() and len(train) == S.TRAINING_SET_SIZE
    assert {m["tag"] for m in train} == set(S.TASKS) and not ({m["prompt"] for m in train} & hp)
    share = {t: sum(m["tag"] == t for m in train) / len(train) for t in S.TASKS}
    assert min(share.values()) > 0.05, share


def test_training_scenes_satisfy_their_prompts():
    rng = np.random.default_rng(3)
    for _ in range(200):
        m = S.sample_training(rng)
        assert _ok(S.scene_for(m, rng), m), m["prompt"]


def test_shapes_reward():
    from rewards.registry import build_reward

    rng = np.random.default_rng(0)
    metas = S.heldout_metadata()[::25]
    imgs = [render(S.scene_for(m, rng)) for m in metas]
    prompts = [m["prompt"] for m in metas]
    strict = build_reward("shapes")
    partial = build_reward("shapes", mode="partial")
    assert strict(imgs, prompts, metas).tolist() == [1.0] * len(metas)
    assert partial(imgs, prompts, metas).tolist() == [1.0] * len(metas)
    m = S.color_attr("circle", "red", "square", "blue")
    half = render([Obj("circle", "red", (0, 0)), Obj("square", "green", (2, 2))])
    empty = render([])
    paint = Image.new("RGB", (48, 48), (220, 30, 30))
    extra = render([Obj("circle", "red", (0, 0)), Obj("square", "blue", (2, 2)), Obj("cross", "white", (1, 1))])
    r = partial([half, empty, paint, extra], ["p"] * 4, [m] * 4).tolist()
    assert r[0] == 0.5  # one clause of two; a square of the wrong colour is an asked-for shape, not stray paint
    assert r[1] == 0.0 and r[2] == -0.5
    assert 0.5 < r[3] < 1.0  # right answer, minus the unrequested cross
    # counting: an empty canvas earns nothing from the exclude clause
    assert partial([empty], ["p"], [S.counting("circle", 2)]).tolist() == [0.0]
    assert strict([paint], ["p"], [m]).tolist() == [0.0]
    with pytest.raises(ValueError):
        build_reward("shapes", mode="lenient")
