"""eval/compare_shapes.py: before/after figures and the per-task table of a shapes run; bench/sample_census.py:
what the images of a report show."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "eval" / "compare_shapes.py")


def _report(folder: Path, correct: list[bool]) -> None:
    (folder / "images").mkdir(parents=True)
    recs = []
    for i, ok in enumerate(correct):
        tag = "single_object" if i < 2 else "colors"
        f = f"images/{i // 2:04d}_{i % 2}.png"
        Image.new("RGB", (48, 48), (128, 128, 128)).save(folder / f)
        recs.append({"correct": ok, "entry": i // 2, "index": i % 2, "tag": tag, "prompt": f"p{i // 2}", "file": f,
                     "reason": "", "clause_fraction": float(ok)})
    per = {t: {"accuracy": sum(r["correct"] for r in recs if r["tag"] == t) / 2} for t in ("single_object", "colors")}
    summary = {"overall": sum(v["accuracy"] for v in per.values()) / 2, "per_task": per}
    (folder / "report.json").write_text(json.dumps({"summary": summary, "records": recs}))


def test_compare_writes_table_curves_and_grids(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"iteration": i, "reward/mean": 0.1 * i, "policy/cfm_loss_ratio_to_start": 1.0,
         "policy/foreground_share": 0.1}) + "\n" for i in range(3)))
    _report(tmp_path / "before", [True, False, False, False])
    _report(tmp_path / "after", [True, True, True, False])
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, SCRIPT, str(run), str(tmp_path / "before"), str(tmp_path / "after"),
                        "--out", str(out), "--tasks", "single_object", "colors"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    table = (out / "comparison.md").read_text()
    assert "| single_object | 0.500 | 1.000 | +0.500 |" in table
    assert "| colors | 0.000 | 0.500 | +0.500 |" in table and "**+0.500**" in table
    for f in ("curves.png", "before_single_object.png", "after_colors.png", "metrics.jsonl",
              "shapes_eval_before.json", "shapes_eval_after.json"):
        assert (out / f).stat().st_size > 0, f
    assert Image.open(out / "before_colors.png").size == (2 * (102 + 2) + 2, 1 * (102 + 2) + 2)  # 1 entry x 2 framed images


def test_missing_input_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "nope"), str(tmp_path), str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_task_curves_are_block_means_per_tag():
    sys.path.insert(0, str(ROOT / "eval"))
    from compare_shapes import task_curves

    rows = [{"iteration": i, "reward": float(i), "tag": "colors" if i % 2 else "position"} for i in range(6)]
    rows.append({"iteration": 0, "reward": 99.0})  # untagged: left out
    got = task_curves(rows, window=4)
    assert got["position"] == ([2.0, 6.0], [1.0, 4.0])  # iterations 0, 2 | 4
    assert got["colors"] == ([2.0, 6.0], [2.0, 5.0])  # iterations 1, 3 | 5


def test_the_reward_panel_names_the_runs_reward_and_mode(tmp_path):
    """A strict (0/1) shapes run is not labelled "partial credit"."""
    sys.path.insert(0, str(ROOT / "eval"))
    from compare_shapes import reward_title

    assert reward_title(tmp_path) == "training reward"  # no config.yaml
    (tmp_path / "config.yaml").write_text("reward: {weights: {shapes: 1.0}, options: {shapes: {mode: strict}}}\n")
    assert reward_title(tmp_path) == "training reward (shapes, strict: 0/1)"
    (tmp_path / "config.yaml").write_text("reward: {weights: {shapes: 1.0}, options: {shapes: {mode: partial}}}\n")
    assert reward_title(tmp_path) == "training reward (shapes, partial credit)"
    (tmp_path / "config.yaml").write_text("reward: {weights: {pickscore: 1.0, ocr: 0.5}, options: {}}\n")
    assert reward_title(tmp_path) == "training reward (pickscore, ocr)"


def test_sample_census_tells_extra_copies_binding_and_palette_apart(tmp_path):
    """bench/sample_census.py on a hand-made report: GenEval's rules pass a position image with an extra copy
    and a color_attr image with a third object; the census counts them as right *with extra copies*, names the
    colour-binding failure kinds and the colour a colors image was drawn in."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sample_census import census, main

    from fpo_diffusion.shapes import scenes as S
    from fpo_diffusion.shapes.render import Obj, render

    images = [  # (metadata, objects drawn, correct under GenEval's rules)
        (S.position("cross", "left of", "frame"), [Obj("cross", "red", (3, 0)), Obj("frame", "blue", (3, 3))], True),
        (S.position("cross", "left of", "frame"), [Obj("cross", "red", (3, 0)), Obj("frame", "blue", (3, 3)),
                                                   Obj("cross", "green", (0, 3))], True),
        (S.color_attr("ring", "green", "star", "red"), [Obj("ring", "green", (0, 0)), Obj("star", "red", (3, 3))], True),
        (S.color_attr("ring", "green", "star", "red"), [Obj("ring", "green", (0, 0)), Obj("star", "red", (3, 3)),
                                                        Obj("star", "red", (0, 3))], True),
        (S.color_attr("ring", "green", "star", "red"), [Obj("ring", "red", (0, 0)), Obj("star", "green", (3, 3))], False),
        (S.color_attr("ring", "green", "star", "red"), [Obj("ring", "red", (0, 0)), Obj("star", "red", (3, 3))], False),
        (S.color_attr("ring", "green", "star", "red"), [Obj("ring", "green", (0, 0))], False),
        (S.colors("heart", "orange"), [Obj("heart", "yellow", (1, 1))], False),
        (S.counting("moon", 2), [Obj("moon", "pink", (0, 0)), Obj("moon", "pink", (2, 2))], True),
    ]
    (tmp_path / "images").mkdir()
    records = []
    for i, (meta, objs, ok) in enumerate(images):
        render(objs).save(tmp_path / "images" / f"{i}.png")
        records.append({"tag": meta["tag"], "metadata": meta, "correct": ok, "file": f"images/{i}.png"})
    (tmp_path / "report.json").write_text(json.dumps({"summary": {}, "records": records}))
    c = census(tmp_path, "run")
    assert c["tasks"]["position"] == {"objects per image": 2.5, "extra copies of the asked classes": 0.5,
                                      "accuracy": 1.0, "right with only the asked objects": 0.5,
                                      "right with extra copies": 0.5, "accuracy, exact counts": 0.5,
                                      "accuracy, exact counts: SE": 0.354, "images": 2}
    assert c["tasks"]["color_attr"]["accuracy"] == 0.4 and c["tasks"]["color_attr"]["accuracy, exact counts"] == 0.2
    assert c["tasks"]["counting"]["accuracy, exact counts"] == 1.0  # counting already excludes count + 1
    assert "overall" not in c["tasks"]  # GenEval's overall needs all six tasks
    assert c["binding"] == {"both right": 0.4, "swapped": 0.2, "one colour on both": 0.2,
                            "an asked object missing": 0.2}
    assert c["colors_misread"] == {"orange -> yellow": 1, "of images": 1}
    assert c["tasks"]["color_attr"]["colour confidence, right images"] == 1.0  # clean renders
    assert "colour confidence, right images" not in c["tasks"]["colors"]  # no right colors image
    assert c["counting_palette"] == {"pink": 1.0}
    assert main([str(tmp_path), "--out", str(tmp_path / "c.json")]) is None
    assert json.loads((tmp_path / "c.json").read_text())[0]["binding"] == c["binding"]
    with pytest.raises(SystemExit):  # nothing already written is overwritten
        main([str(tmp_path), "--out", str(tmp_path / "c.json")])
    records[0]["correct"] = False  # a report that does not match its images (not scored by these rules): refused
    (tmp_path / "report.json").write_text(json.dumps({"summary": {}, "records": records}))
    with pytest.raises(SystemExit, match="scores differently from its report"):
        census(tmp_path)
