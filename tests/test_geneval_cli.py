"""GenEval metadata, generate / score / summary (functions and CLI), and the ``geneval`` reward."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.geneval.detection import Detection
from rewards.geneval.generate import GenerateConfig, generate, sample_path
from rewards.geneval.metadata import TASKS, GenEvalInputError, load_metadata
from rewards.geneval.score import find_prompt_folders, score_images
from rewards.geneval.summary import comparison_table, format_text, load_results, summarize, write_report
from shared_data import geneval_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = geneval_dir()

_spec = importlib.util.spec_from_file_location("geneval_cli", REPO / "eval" / "geneval.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


# --- metadata ---------------------------------------------------------------------------------

def test_all_553_official_prompts_parse():
    names = [l.strip() for l in (SHARED / "object_names.txt").read_text().splitlines() if l.strip()]
    meta = load_metadata(SHARED / "evaluation_metadata.jsonl", classnames=names)
    assert len(meta) == 553
    assert set(Counter(m["tag"] for m in meta)) == set(TASKS)
    assert all(m["include"] for m in meta)


@pytest.mark.parametrize("bad, problem", [
    ('{"tag": "counting", "prompt": "x", "include": [{"class": "cup", "count": 0}]}', "count"),
    ('{"tag": "colors", "prompt": "x", "include": [{"class": "cup", "count": 1, "color": "teal"}]}', "colour"),
    ('{"tag": "position", "prompt": "x", "include": [{"class": "cup", "count": 1, "position": ["near", 0]}]}', "position"),
    ('{"tag": "single_object", "prompt": "x", "include": [{"class": "cup", "count": 1}]', "invalid JSON"),
    ('{"prompt": "x", "include": [{"class": "cup", "count": 1}]}', "tag"),
])
def test_malformed_metadata_line_names_file_and_line(tmp_path, bad, problem):
    good = (SHARED / "evaluation_metadata.jsonl").read_text().splitlines()[:3]
    p = tmp_path / "meta.jsonl"
    p.write_text("\n".join(good[:2] + [bad] + good[2:]) + "\n")
    with pytest.raises(GenEvalInputError, match=rf"meta\.jsonl:3: .*{problem}"):
        load_metadata(p)


# --- fixtures: an image tree and a detector ------------------------------------------------------

class WhiteCowDetector:
    """Sees a red cow when the top-left pixel is white, nothing otherwise."""

    def __call__(self, images):
        return [{"cow": [Detection("cow", (0.0, 0.0, 4.0, 4.0), 0.95, color="red")]}
                if im.getpixel((0, 0)) == (255, 255, 255) else {} for im in images]


COW = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}
RED_COW = {"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}], "prompt": "a photo of a red cow"}


def make_tree(root: Path, prompts=(COW, RED_COW), whites=((True, False), (True, True))):
    for i, (meta, ws) in enumerate(zip(prompts, whites)):
        d = root / f"{i:05d}" / "samples"
        d.mkdir(parents=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(meta))
        for n, w in enumerate(ws):
            Image.new("RGB", (8, 8), (255, 255, 255) if w else (0, 0, 0)).save(d / f"{n:05d}.png")
    return root


def test_score_rows_in_official_format(tmp_path):
    rows = list(score_images(make_tree(tmp_path / "imgs"), WhiteCowDetector()))
    assert [r["correct"] for r in rows] == [True, False, True, True]
    r = rows[1]
    assert set(r) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert r["filename"].endswith("00000/samples/00001.png") and r["reason"] == "expected cow>=1, found 0"
    assert json.loads(r["metadata"]) == COW and json.loads(rows[0]["details"]) == {"cow": [[0, 0, 4, 4, 0.95]]}


def test_missing_image_folder_is_an_error(tmp_path):
    root = make_tree(tmp_path / "imgs")
    (root / "00002").mkdir()
    (root / "00002" / "metadata.jsonl").write_text(json.dumps(COW))
    with pytest.raises(GenEvalInputError, match=r"missing image folder .*00002/samples"):
        find_prompt_folders(root)
    with pytest.raises(GenEvalInputError, match="does not exist"):
        find_prompt_folders(tmp_path / "nope")


def test_unreadable_image_is_an_error(tmp_path):
    root = make_tree(tmp_path / "imgs")
    (root / "00001" / "samples" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(GenEvalInputError, match=r"cannot read image .*00001/samples/00001.png"):
        list(score_images(root, WhiteCowDetector()))


# --- CLI: score ---------------------------------------------------------------------------------

@pytest.fixture
def detector_module(tmp_path, monkeypatch):
    (tmp_path / "fake_geneval_det.py").write_text(
        "from rewards.geneval.detection import Detection\n"
        "class WhiteCowDetector:\n"
        "    def __call__(self, images):\n"
        "        return [{'cow': [Detection('cow', (0.0, 0.0, 4.0, 4.0), 0.95, color='red')]}\n"
        "                if im.getpixel((0, 0)) == (255, 255, 255) else {} for im in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fake_geneval_det:WhiteCowDetector"


def test_cli_score_writes_results_and_never_overwrites(tmp_path, detector_module, capsys):
    root = make_tree(tmp_path / "imgs")
    assert cli.main(["score", str(root), "--detector", detector_module]) == 0
    out = root / "results.jsonl"
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True, True]
    before = out.read_bytes()
    assert cli.main(["score", str(root), "--detector", detector_module]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
    assert out.read_bytes() == before


def test_cli_score_bad_input_exits_nonzero_with_one_line(tmp_path, detector_module, capsys):
    root = make_tree(tmp_path / "imgs")
    (root / "00001" / "samples" / "00000.png").write_bytes(b"garbage")
    assert cli.main(["score", str(root), "--detector", detector_module]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and "00001/samples/00000.png" in err[0]
    assert not (root / "results.jsonl").exists() and not (root / "results.jsonl.partial").exists()
    import shutil
    shutil.rmtree(root / "00001" / "samples")
    assert cli.main(["score", str(root), "--detector", detector_module]) == 1
    assert "missing image folder" in capsys.readouterr().err
    assert cli.main(["score", str(tmp_path / "absent"), "--detector", detector_module]) == 1
    assert "does not exist" in capsys.readouterr().err


# --- summary ------------------------------------------------------------------------------------

def _fixed_rows():
    # (tag, prompt, [correct per image])
    spec = [("single_object", "A", [1, 1, 1, 0]), ("two_object", "B", [0, 0, 0, 0]),
            ("counting", "C", [1, 0, 1, 0]), ("counting", "D", [0, 0, 0, 0]),
            ("colors", "E", [1, 1, 1, 1]), ("position", "F", [0, 0, 1, 0]), ("color_attr", "G", [0, 0, 0, 0])]
    rows = []
    for tag, prompt, cs in spec:
        meta = json.dumps({"tag": tag, "prompt": prompt, "include": [{"class": "cup", "count": 1}]})
        rows += [{"filename": f"{prompt}/{n:05d}.png", "tag": tag, "prompt": prompt, "correct": bool(c), "reason": "",
                  "metadata": meta, "details": "{}"} for n, c in enumerate(cs)]
    return rows


def test_summary_arithmetic_on_a_fixed_results_file(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _fixed_rows()))
    s = summarize(load_results(p))
    assert (s.n_images, s.n_prompts) == (28, 7)
    assert s.image_accuracy == pytest.approx(10 / 28) and s.prompt_accuracy == pytest.approx(4 / 7)
    assert {k: (v.correct, v.total) for k, v in s.tasks.items()} == {
        "single_object": (3, 4), "two_object": (0, 4), "counting": (2, 8), "colors": (4, 4),
        "position": (1, 4), "color_attr": (0, 4)}
    # unweighted over tasks: (0.75 + 0 + 0.25 + 1 + 0.25 + 0) / 6, not the image mean
    assert s.overall == pytest.approx(0.375)
    text = format_text(s)
    assert "Overall score (avg. over tasks): 0.37500" in text and "counting         = 25.00% (2 / 8)" in text


def test_results_file_errors_name_the_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(_fixed_rows()[0]) + "\n{oops\n")
    with pytest.raises(GenEvalInputError, match=r"r\.jsonl:2"):
        load_results(p)


def test_report_comparison_and_failure_grids(tmp_path, capsys):
    base = _fixed_rows()
    lora = [dict(r, correct=True) if r["tag"] == "two_object" else r for r in base]
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(img)
    base = [dict(r, filename=str(img)) for r in base]
    table = comparison_table({"base": summarize(base), "lora": summarize(lora)})
    assert table[0] == ["task", "base", "lora", "delta"]
    assert ["two_object", "0.0000", "1.0000", "+1.0000"] in table
    assert ["overall", "0.3750", "0.5417", "+0.1667"] in table
    paths = write_report({"base": base, "lora": lora}, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert "| two_object | 0.0000 | 1.0000 | +1.0000 |" in md and "failures/base_two_object.png" in md
    assert "<table" in paths["html"].read_text()
    grid = Image.open(paths["base/two_object"])
    assert grid.size == (4 * 128, 158)
    assert "lora/two_object" not in paths  # no failures left
    # CLI: two runs, report, no overwrite of an existing report
    for name, rows in (("base", base), ("lora", lora)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["summary", str(tmp_path / "base" / "results.jsonl"), str(tmp_path / "lora" / "results.jsonl"),
            "--report", str(tmp_path / "rep2")]
    assert cli.main(args) == 0
    assert "Overall score (avg. over tasks): 0.54167" in capsys.readouterr().out
    assert cli.main(args) == 1 and "exists" in capsys.readouterr().err


# --- generate -----------------------------------------------------------------------------------

class FakePolicy:
    """encode_prompts / sample / decode: images are uniform noise drawn from each row's generator."""

    def __init__(self):
        self.sampled = 0
        self.pipeline = self
        self.lora = None

    def load_lora_weights(self, path):
        self.lora = path

    def encode_prompts(self, prompts):
        return {"prompt_embeds": torch.tensor([[float(len(p))] for p in prompts])}

    def sample(self, cond, generators, *, steps, guidance_scale, height=None, width=None):
        assert cond["prompt_embeds"].shape[0] == len(generators)
        self.sampled += len(generators)
        return torch.stack([torch.rand(3, height, width, generator=g) for g in generators])

    def decode(self, x0):
        return x0


def _meta3():
    return load_metadata(SHARED / "evaluation_metadata.jsonl")[:3]


def test_generate_layout_seeds_ranks_and_resume(tmp_path):
    meta = _meta3()
    cfg = GenerateConfig(n_samples=3, steps=2, height=8, width=8, batch_size=2)
    pol = FakePolicy()
    assert generate(pol, meta, tmp_path / "a", cfg) == [0, 1, 2] and pol.sampled == 9
    assert json.loads((tmp_path / "a" / "00001" / "metadata.jsonl").read_text()) == meta[1]
    assert sorted(p.name for p in (tmp_path / "a" / "00002" / "samples").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    # two ranks write the same bytes as one
    assert generate(FakePolicy(), meta, tmp_path / "b", cfg, rank=1, world_size=2) == [1]
    assert generate(FakePolicy(), meta, tmp_path / "b", cfg, rank=0, world_size=2) == [0, 2]
    for i in range(3):
        for n in range(3):
            assert sample_path(tmp_path / "a", i, n).read_bytes() == sample_path(tmp_path / "b", i, n).read_bytes()
    # resume: nothing to do; a missing image is regenerated alone, identically
    pol = FakePolicy()
    assert generate(pol, meta, tmp_path / "a", cfg) == [] and pol.sampled == 0
    want = sample_path(tmp_path / "a", 1, 2).read_bytes()
    sample_path(tmp_path / "a", 1, 2).unlink()
    assert generate(pol, meta, tmp_path / "a", cfg) == [1] and pol.sampled == 1
    assert sample_path(tmp_path / "a", 1, 2).read_bytes() == want
    # a folder of another metadata file is an error, nothing overwritten
    other = [meta[1], meta[0], meta[2]]
    with pytest.raises(GenEvalInputError, match="another prompt"):
        generate(FakePolicy(), other, tmp_path / "a", cfg)
    assert json.loads((tmp_path / "a" / "00000" / "metadata.jsonl").read_text()) == meta[0]


def test_cli_generate_with_fake_policy_and_lora(tmp_path, monkeypatch, capsys):
    import fpo_diffusion.policies as policies

    made = []

    def fake_load(family, path, dtype=None, device=None):
        made.append((family, path))
        pol = FakePolicy()
        made.append(pol)
        return pol

    monkeypatch.setattr(policies, "load_policy", fake_load)
    mfile = tmp_path / "meta.jsonl"
    mfile.write_text("".join(json.dumps(m) + "\n" for m in _meta3()))
    (tmp_path / "lora").mkdir()
    args = ["generate", "--model", "m", "--family", "sd", "--metadata", str(mfile), "--out", str(tmp_path / "out"),
            "--n-samples", "2", "--steps", "1", "--height", "8", "--width", "8", "--lora", str(tmp_path / "lora")]
    assert cli.main(args) == 0
    assert made[0] == ("sd", "m") and made[1].lora == str(tmp_path / "lora")
    assert len(find_prompt_folders(tmp_path / "out")) == 3
    assert cli.main(args[:-2] + ["--lora", str(tmp_path / "nolora")]) == 1
    assert "LoRA folder" in capsys.readouterr().err
    mfile.write_text("{broken\n")
    assert cli.main(args) == 1
    assert "meta.jsonl:1" in capsys.readouterr().err


# --- the reward ---------------------------------------------------------------------------------

def test_geneval_reward_strict_and_partial():
    from rewards.registry import build_reward

    two = {"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "dog", "count": 1}], "prompt": "p"}
    imgs = [Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8))]
    strict = build_reward("geneval", detector=WhiteCowDetector())
    assert strict(imgs, ["p", "p"], [COW, COW]).tolist() == [1.0, 0.0]
    partial = build_reward("geneval", detector=WhiteCowDetector(), strict=False)
    assert partial(imgs, ["p", "p"], [two, two]).tolist() == [0.5, 0.0]
    assert strict(imgs[:1], ["p"], [RED_COW]).tolist() == [1.0]  # colour from Detection.color, no CLIP
    from rewards.base import RewardError
    with pytest.raises(RewardError, match="metadata"):
        strict(imgs[:1], ["p"], [{}])
    with pytest.raises(ValueError, match="detector"):
        build_reward("geneval")


def test_detector_spec(tmp_path, detector_module):
    from rewards.geneval.mask2former import Mask2FormerDetector

    assert isinstance(cli.load_detector(str(tmp_path)), Mask2FormerDetector)  # a folder: loaded lazily
    assert callable(cli.load_detector(detector_module))
    with pytest.raises(GenEvalInputError, match="neither"):
        cli.load_detector(str(tmp_path / "absent"))
    with pytest.raises(GenEvalInputError, match="cannot import"):
        cli.load_detector("no_such_module_xyz:Det")


def test_cli_score_without_a_detector_says_what_to_pass(tmp_path, capsys):
    root = make_tree(tmp_path / "imgs")
    assert cli.main(["score", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--detector" in err[0] and cli.DETECTOR_HUB_ID in err[0], err
    assert not (root / "results.jsonl").exists()


def test_one_per_task_summary_binomial_for_correct_sample_se_for_scores():
    from rewards.geneval.summary import overall_score, task_scores

    tags = ["counting"] * 4 + ["colors"] * 2 + ["counting"]
    s = task_scores(tags, [1, 0, 0, 1, 1, 1, 0])
    assert list(s) == ["counting", "colors"]  # order of first appearance
    assert (s["counting"].correct, s["counting"].total) == (2, 5) and s["counting"].accuracy == pytest.approx(0.4)
    assert s["counting"].se == pytest.approx((0.4 * 0.6 / 5) ** 0.5)  # binomial for 0/1
    assert s["colors"].se == 0.0
    overall, se = overall_score(s)
    assert overall == pytest.approx(0.7) and se == pytest.approx(((0.4 * 0.6 / 5) ** 0.5) / 2)
    frac = task_scores(["a", "a", "a"], [0.25, 0.5, 0.75])["a"]  # partial scores: their spread
    assert frac.accuracy == pytest.approx(0.5) and frac.se == pytest.approx((1 / 24) ** 0.5 / 3 ** 0.5)
    assert overall_score({})[0] == 0.0
    with pytest.raises(ValueError, match="3 tags for 2 scores"):
        task_scores(["a"] * 3, [1, 0])
