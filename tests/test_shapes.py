"""The shapes world: renderer, scene/metadata generator, exact detector, GenEval rules, reward."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fpo_diffusion.shapes import captions as C
from fpo_diffusion.shapes import scenes as S
from fpo_diffusion.shapes.detector import ShapesDetector, analyse
from fpo_diffusion.shapes.render import Obj, render, render_array
from fpo_diffusion.shapes.world import BACKGROUND, CANVAS, COLORS, GRID, SHAPES, cells, shape_mask
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


def _all_metadata():
    return {t: [m for g in gs for m in g] for t, gs in S.combination_groups().items()}


def test_vocabulary_is_geneval_and_distinct():
    assert list(COLORS) == list(GENEVAL_COLORS)  # GenEval's ten colour names, pink and brown included
    assert len(SHAPES) >= 12 and GRID == 4 and CANVAS == 64
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                ma, mb = shape_mask(a), shape_mask(b)
                assert (ma & mb).sum() / (ma | mb).sum() <= 0.80, (a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_detector_exact_for_every_class_colour_and_cell(shape):
    for color in COLORS:
        for cell in cells():
            o = Obj(shape, color, cell)
            dets = DET.detect(render([o]))
            assert list(dets) == [shape], (shape, color, cell)
            d = dets[shape][0]
            assert (d.color, d.box, d.score) == (color, tuple(float(v) for v in o.box()), 1.0)


def test_render_deterministic():
    rng = np.random.default_rng(0)
    sc = C.random_scene(rng, 4)
    assert np.array_equal(render_array(sc), render_array(list(sc)))
    assert render(sc).size == (CANVAS, CANVAS)


@pytest.mark.parametrize("task", S.TASKS)
def test_detector_scores_renders_perfectly(task):
    rng = np.random.default_rng(123)
    metas = [m for m in S.test_metadata() if m["tag"] == task] + S.train_task_metadata()[task][:40]
    for i in range(120):
        m = metas[i % len(metas)]
        assert _ok(S.scene_for(m, rng), m), m["prompt"]


def test_detections_exact_on_renders():
    rng = np.random.default_rng(7)
    for _ in range(100):
        sc = C.random_scene(rng)
        dets = DET.detect(render(sc))
        got = sorted((d.label, d.color, d.box, d.score) for v in dets.values() for d in v)
        want = sorted((o.shape, o.color, tuple(float(x) for x in o.box()), 1.0) for o in sc)
        assert got == want


def test_tolerates_generation_noise():
    rng = np.random.default_rng(1)
    n_ok = 0
    for i in range(60):
        m = S.test_metadata()[i * 8]
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
        full = Image.new("RGB", (CANVAS, CANVAS), col)
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
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
    b[((xx - 24) / 6.0) ** 2 + ((yy - 24) / 3.0) ** 2 <= 1] = (30, 70, 230)  # a flat ellipse
    assert _kept(DET.detect(b)) == {}


def test_two_touching_objects_are_not_two_objects():
    a = render_array([Obj("square", "red", (1, 0))])
    a[18:30, 14:34] = (220, 30, 30)  # paint bridging into the next cell
    assert DET.detect(a) == {}


def test_metadata_valid_for_all_tasks():
    allm = _all_metadata()
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


def test_split_by_combination_invariants():
    sp = S.split()
    assert sp == S.split()  # fixed
    for part, sizes in (("test", S.TEST_SIZES), ("validation", S.VALIDATION_SIZES)):
        for task in S.TASKS:
            ms = sp[part][task]
            assert len({m["prompt"] for m in ms}) == len(ms) == sizes[task], (part, task)
    for task in ("two_object", "colors", "position", "color_attr"):
        assert len(sp["test"][task]) >= 60, task  # GenEval-sized where the world allows
    assert {m["prompt"] for m in sp["test"]["single_object"]} == {S.single_object(s)["prompt"] for s in SHAPES}
    train = S.training_metadata()
    train_prompts = {m["prompt"] for m in train} | {m["prompt"] for ms in sp["train"].values() for m in ms}
    held = S.test_and_validation_prompts()
    assert not (train_prompts & held)  # no test or validation string is ever a training prompt
    # test and validation share no prompt, except single_object (all 12 classes, other seeds)
    shared = {m["prompt"] for ms in sp["test"].values() for m in ms} & {
        m["prompt"] for ms in sp["validation"].values() for m in ms}
    assert shared == {m["prompt"] for m in sp["test"]["single_object"]}
    # split by combination: a combination's other phrasings are never on the other side
    def key(m):
        inc = m["include"]
        return (m["tag"],) + tuple(sorted(json.dumps({k: v for k, v in r.items() if k != "position"}, sort_keys=True)
                                          for r in inc))
    test_keys = {key(m) for ms in sp["test"].values() for m in ms}
    assert not (test_keys & {key(m) for ms in sp["train"].values() for m in ms})
    # every class, colour, count and relation of the test set appears in training prompts
    vt, vtr = S.vocabulary([m for ms in sp["test"].values() for m in ms]), S.vocabulary(train)
    assert vt["class"] == vtr["class"] == set(SHAPES) and vt["color"] <= vtr["color"]
    assert vt["count"] == vtr["count"] == {2, 3, 4} and vt["relation"] == vtr["relation"] == set(S.RELATIONS)
    # the RL prompt set: fixed, equal shares of the five tasks that have training prompts
    assert train == S.training_metadata()
    share = {t: sum(m["tag"] == t for m in train) for t in S.TASKS}
    assert share["single_object"] == 0 and len(set(share.values()) - {0}) == 1
    for m in train[::37]:
        assert validate_metadata(m, set(SHAPES)) is None
    # embedded:shapes: the same prompts in Flow-GRPO's GenEval task mix, still no held-out prompt
    from fpo_diffusion.shapes.plugin import training_prompts

    mixed = training_prompts()
    assert len(mixed) == len(train) and {m["prompt"] for m in mixed} <= {m["prompt"] for m in train}
    mix = {t: sum(m["tag"] == t for m in mixed) for t in S.TRAINING_TASK_MIX}
    assert mix == {t: round(w * len(train)) for t, w in S.TRAINING_TASK_MIX.items()}
    assert mixed == training_prompts() and not ({m["prompt"] for m in mixed} & held)
    # the evaluation sets: every task, fixed
    test = S.test_metadata()
    assert {m["tag"] for m in test} == set(S.TASKS) and test == S.test_metadata()
    assert all(sum(m["tag"] == t for m in test) >= S.TEST_ENTRIES_PER_TASK for t in S.TASKS)
    assert all(sum(m["tag"] == t for m in S.validation_metadata()) >= S.VALIDATION_ENTRIES_PER_TASK for t in S.TASKS)


def test_training_scenes_satisfy_their_prompts():
    rng = np.random.default_rng(3)
    train = S.training_metadata()
    for i in range(200):
        m = train[(i * 97) % len(train)]
        assert _ok(S.scene_for(m, rng), m), m["prompt"]


def _caption_facts(text):
    """(classes named, colours named, {class: stated count}) of a pretraining caption."""
    import re

    from fpo_diffusion.shapes.world import NUMBERS, PLURALS

    words = text.replace(",", " ").split()
    classes = {s for s in SHAPES if s in words or PLURALS[s] in words}
    colors = {c for c in COLORS if c in words}
    counts = {}
    for n, w in NUMBERS.items():
        for m in re.finditer(rf"\b{w} (?:(?:{'|'.join(COLORS)}) )?(\w+)", text):
            for s in SHAPES:
                if m.group(1) == PLURALS[s]:
                    counts[s] = n
    return classes, colors, counts


def test_pretraining_captions_are_incomplete_but_never_wrong():
    rng = np.random.default_rng(5)
    style = C.CaptionStyle()
    stated = {"count": 0, "multi": 0, "position": 0, "pairs": 0, "empty": 0, "all_classes": 0, "several": 0}
    for _ in range(3000):
        scene, text = C.pretraining_example(rng, style)
        if not text:
            stated["empty"] += 1
            continue
        classes, colors, counts = _caption_facts(text)
        assert classes and classes <= {o.shape for o in scene}, (text, scene)  # never a class that is not there
        if len({o.shape for o in scene}) > 1:
            stated["several"] += 1
            stated["all_classes"] += classes == {o.shape for o in scene}
        assert colors <= {o.color for o in scene}, (text, scene)
        for s, n in counts.items():
            assert n == sum(o.shape == s for o in scene), (text, scene)
        multi = [s for s in classes if sum(o.shape == s for o in scene) > 1]
        stated["multi"] += len(multi)
        stated["count"] += sum(s in counts for s in multi)
        if len(scene) == 2 and scene[0].shape != scene[1].shape:
            stated["pairs"] += 1
            rel = [r for r in S.RELATIONS if f" {r} " in text]
            stated["position"] += bool(rel)
            if rel:  # a stated relation holds under GenEval's geometry
                from rewards.geneval.rules import relative_position

                a, b = scene
                assert rel[0] in relative_position(a.box(), b.box()), (text, scene)
    assert 0.17 < stated["count"] / stated["multi"] < 0.33  # p_count = 0.25
    assert 0.04 < stated["position"] / stated["pairs"] < 0.12  # p_all_classes * p_position = 0.075
    assert 0.68 < stated["all_classes"] / stated["several"] < 0.82  # p_all_classes = 0.75
    assert 0.07 < stated["empty"] / 3000 < 0.13
    with pytest.raises(ValueError):
        C.CaptionStyle(p_count=1.5)


def test_shapes_reward():
    from rewards.registry import build_reward

    rng = np.random.default_rng(0)
    metas = S.test_metadata()[::25]
    imgs = [render(S.scene_for(m, rng)) for m in metas]
    prompts = [m["prompt"] for m in metas]
    strict = build_reward("shapes")
    partial = build_reward("shapes", mode="partial")
    assert strict(imgs, prompts, metas).tolist() == [1.0] * len(metas)
    assert partial(imgs, prompts, metas).tolist() == [1.0] * len(metas)
    m = S.color_attr("circle", "red", "square", "blue")
    half = render([Obj("circle", "red", (0, 0)), Obj("square", "green", (2, 2))])
    empty = render([])
    paint = Image.new("RGB", (CANVAS, CANVAS), (220, 30, 30))
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


def _records(acc: dict[str, float], n: int = 100) -> list[dict]:
    out = []
    for t, p in acc.items():
        k = round(p * n)
        out += [{"tag": t, "entry": hash((t, i // 4)) % 10_000, "prompt": f"{t} {i // 4}", "correct": i < k,
                 "painted_share": 0.1} for i in range(n)]
    return out


def test_shapeseval_reports_standard_errors_and_compares_beyond_two_of_them():
    from fpo_diffusion.shapes.evaluate import compare, summarise

    base = summarise(_records({t: 0.5 for t in S.TASKS}))
    for t in S.TASKS:
        assert base["per_task"][t]["se"] == pytest.approx((0.25 / 100) ** 0.5)
    assert base["overall_se"] == pytest.approx((6 * 0.25 / 100) ** 0.5 / 6)
    same = summarise(_records({t: 0.52 for t in S.TASKS}))
    better = summarise(_records({**{t: 0.5 for t in S.TASKS}, "counting": 0.8}))
    _, v = compare(base, same)
    assert not any(r["beyond_2se"] for r in v.values())  # +0.02 on 100 images is noise
    table, v = compare(base, better, ("base", "lora"))
    assert v["counting"]["beyond_2se"] and v["counting"]["diff"] == pytest.approx(0.3)
    assert not v["colors"]["beyond_2se"]
    assert v["overall"]["diff"] == pytest.approx(0.05) and v["overall"]["beyond_2se"] == (v["overall"]["z"] > 2)
    assert "| counting | 0.500 ± 0.050 | 0.800 ± 0.040 | +0.300 ± 0.064 |" in table
    with pytest.raises(ValueError):
        summarise([])


def test_eval_cli_compare_and_bad_input(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "eval"))
    from shapes import main

    from fpo_diffusion.shapes.evaluate import summarise

    for name, acc in (("a", 0.5), ("b", 0.9)):
        d = tmp_path / name
        d.mkdir()
        s = summarise(_records({t: acc for t in S.TASKS}))
        s["info"] = {"model": name, "split": "test"}
        (d / "report.json").write_text(json.dumps({"summary": s, "records": []}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"), "--out", str(tmp_path / "t.md")]) == 0
    assert "**yes**" in (tmp_path / "t.md").read_text()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    for bad in (["--images", "0"], ["--steps", "-1"], ["--max-per-task", "0"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2


def test_pretraining_captions_do_not_depend_on_the_hash_seed():
    """Pretraining is resumable bit for bit only if its captions are the same in every process: a caption
    must not depend on the iteration order of a set of strings (PYTHONHASHSEED)."""
    import subprocess
    import sys

    code = ("import hashlib, numpy as np\nfrom fpo_diffusion.shapes.captions import pretraining_example\n"
            "rng = np.random.default_rng(0)\n"
            "print(hashlib.sha256('|'.join(pretraining_example(rng)[1] for _ in range(3000)).encode()).hexdigest())")
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2, 3)}
    assert len(out) == 1, out


def test_exact_counts_fails_extra_copies_that_geneval_rules_ignore():
    """GenEval's position rule reads one detection per class: an extra copy placed elsewhere passes it. The
    reward's ``exact_counts`` option fails it, and leaves a scene with exactly the asked objects (and counting,
    which already excludes ``count + 1``) as GenEval scores it."""
    from fpo_diffusion.shapes.reward import ShapesReward
    from rewards.geneval.metadata import with_exact_counts

    meta = S.position("cross", "left of", "frame")
    clean = [Obj("cross", "red", (3, 0)), Obj("frame", "blue", (3, 3))]
    extra = clean + [Obj("cross", "green", (0, 3)), Obj("frame", "pink", (0, 0))]  # a cross right of a frame too
    assert _ok(clean, meta) and _ok(extra, meta)  # GenEval's rule: both right
    count3 = S.counting("cross", 3)
    assert with_exact_counts(count3) == count3  # counting keeps its own exclude clause
    plain, exact = ShapesReward(), ShapesReward(exact_counts=True)
    imgs = [render(clean), render(extra), render(extra[:3])]
    scores = lambda r: r.score(imgs, [meta["prompt"]] * 3, [meta] * 3).tolist()  # noqa: E731
    assert scores(plain) == [1.0, 1.0, 1.0]
    assert scores(exact) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="exact_counts"):
        ShapesReward(exact_counts="yes")


def test_color_weight_grades_how_surely_each_asked_object_is_its_colour():
    """The reward's ``color_weight`` option: ``w * (c - 1)`` with ``c`` the mean colour confidence of the objects the
    colour clauses read. A clean render is sure (1.0); an orange pushed toward yellow, still orange to the detector
    (strict 1), loses a little; half way it is 0.5; a missing object counts 0; a prompt that asks no colour is
    untouched."""
    from fpo_diffusion.shapes.detector import color_confidence
    from fpo_diffusion.shapes.reward import ShapesReward, shapes_score
    from fpo_diffusion.shapes.world import PALETTE

    orange, yellow = np.array(PALETTE["orange"], float), np.array(PALETTE["yellow"], float)
    assert color_confidence(np.tile(orange, (5, 1)), "orange") == 1.0
    assert color_confidence(np.tile(yellow, (5, 1)), "orange") == 0.0
    assert color_confidence(np.tile((orange + yellow) / 2, (5, 1)), "orange") == pytest.approx(0.5)

    def recolour(img, rgb):
        a = np.asarray(img).copy()
        a[(a == np.array(PALETTE["orange"], np.uint8)).all(-1)] = np.round(rgb).astype(np.uint8)
        return Image.fromarray(a)

    meta = S.colors("cross", "orange")
    clean = render([Obj("cross", "orange", (1, 1))])
    drifted = recolour(clean, orange + 0.3 * (yellow - orange))
    assert analyse(drifted)[0].color == "orange"  # still right by the verdict
    plain, graded = ShapesReward(), ShapesReward(color_weight=0.2)
    imgs = [clean, drifted, render([Obj("cross", "red", (1, 1))]), render([])]
    s_plain = plain.score(imgs, [meta["prompt"]] * 4, [meta] * 4).tolist()
    s_graded = graded.score(imgs, [meta["prompt"]] * 4, [meta] * 4).tolist()
    assert s_plain == [1.0, 1.0, 0.0, 0.0]
    c = shapes_score(drifted, meta)[1]["color_confidence"]
    assert 0.6 < c < 0.9
    assert s_graded[0] == 1.0 and s_graded[1] == pytest.approx(1.0 - 0.2 * (1 - c))
    assert s_graded[2] < 0.0 and s_graded[3] == pytest.approx(-0.2)  # another colour; nothing drawn: confidence 0
    assert graded.range == (-0.2, 1.0)
    count = S.counting("cross", 2)  # asks no colour: untouched
    two = render([Obj("cross", "orange", (0, 0)), Obj("cross", "blue", (3, 3))])
    assert graded.score([two], [count["prompt"]], [count]).tolist() == plain.score([two], [count["prompt"]], [count]).tolist() == [1.0]
    assert shapes_score(two, count)[1]["color_confidence"] is None
    for bad in (-0.1, 1.5, "0.2", True, float("nan")):
        with pytest.raises(ValueError, match="color_weight"):
            ShapesReward(color_weight=bad)
