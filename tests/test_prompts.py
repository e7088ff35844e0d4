"""Prompt sources: text files, GenEval-style JSONL with metadata, datasets folders, bad input."""
import json

import pytest

from fpo_diffusion.config import ConfigError, PromptConfig
from fpo_diffusion.prompts import load_prompts


def test_text_and_jsonl_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  two blue squares  \n")
    assert [p.prompt for p in load_prompts(PromptConfig(source=str(txt)))] == ["a red circle", "two blue squares"]
    rows = [{"prompt": "a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
            {"prompt": "two dogs", "tag": "counting", "include": [{"class": "dog", "count": 2}]}]
    js = tmp_path / "m.jsonl"
    js.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_prompts(PromptConfig(source=str(js)))
    assert [i.prompt for i in items] == ["a cat", "two dogs"]
    assert items[1].metadata["include"] == [{"class": "dog", "count": 2}]  # metadata reaches the reward


def test_tags_keep_only_those_tasks_and_an_absent_tag_is_one_line(tmp_path):
    rows = [{"prompt": f"p{i}", "tag": t} for i, t in enumerate(["counting", "position", "counting", "colors"])]
    js = tmp_path / "m.jsonl"
    js.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [i.prompt for i in load_prompts(PromptConfig(source=str(js), tags=["counting"]))] == ["p0", "p2"]
    assert [i.prompt for i in load_prompts(PromptConfig(source=str(js), tags=["colors", "position"]))] == ["p1", "p3"]
    with pytest.raises(ConfigError, match=r"has no prompt tagged 'count'; its tags: colors, counting, position$"):
        load_prompts(PromptConfig(source=str(js), tags=["count"]))
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n")
    with pytest.raises(ConfigError, match=r"its tags: none \(no metadata with a tag\)"):
        load_prompts(PromptConfig(source=str(txt), tags=["counting"]))
    with pytest.raises(ConfigError, match="prompts.tags must be a non-empty list"):
        PromptConfig(source=str(txt), tags=[])
    # the shapes world's training prompts by task (Flow-GRPO's GenEval mix: counting a quarter of 2000)
    assert len(load_prompts(PromptConfig(source="embedded:shapes", tags=["counting"]))) == 500


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"caption": ["x", "y"], "id": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    items = load_prompts(PromptConfig(source=str(tmp_path / "ds"), column="caption"))
    assert [i.prompt for i in items] == ["x", "y"] and items[1].metadata["id"] == 2
    with pytest.raises(ConfigError, match="has no column 'prompt'"):
        load_prompts(PromptConfig(source=str(tmp_path / "ds")))


def test_bad_prompt_sources(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(PromptConfig(source=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(PromptConfig(source=str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match="line 2: not valid JSON"):
        load_prompts(PromptConfig(source=str(bad)))
    nop = tmp_path / "noprompt.jsonl"
    nop.write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="line 1: expected an object with a non-empty"):
        load_prompts(PromptConfig(source=str(nop)))


# ------------------------------------------------ GenEval metadata means the same from any source
GENEVAL_ROWS = [
    {"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}],
     "exclude": [{"class": "circle", "count": 2}]},  # first: Dataset.from_list takes its columns from the first row
    {"prompt": "a photo of two blue squares", "tag": "counting", "include": [{"class": "square", "count": 2}]},
    {"prompt": "a photo of a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
]
POSITION_ROW = {"prompt": "a photo of a blue square left of a red circle", "tag": "position",
                "include": [{"class": "circle", "count": 1, "color": "red"},
                            {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}]}


def _correct_detections(images):
    """Detections of an image that satisfies every prompt above (built by hand: no detector model)."""
    from rewards.geneval.detection import Detection

    sq = [Detection("square", (0, 0, 10, 10), 0.99, color="blue"), Detection("square", (0, 20, 10, 30), 0.99, color="blue")]
    return [{"square": sq, "circle": [Detection("circle", (50, 0, 60, 10), 0.99, color="red")]} for _ in images]


def _geneval_rewards(items):
    from PIL import Image

    from rewards.geneval.reward import GenEvalReward

    reward = GenEvalReward(detector=_correct_detections, strict=True)
    images = [Image.new("RGB", (64, 64)) for _ in items]
    return reward([im for im in images], [i.prompt for i in items], [i.metadata for i in items]).tolist()


def test_geneval_metadata_from_datasets_folder_scores_as_from_jsonl(tmp_path):
    """Issue 16.1: Arrow adds ``"color": None`` / ``"exclude": None`` to rows that lack them; the loader drops
    them, so the same correct image scores 1.0 from a ``datasets`` folder as from the ``.jsonl`` file."""
    import datasets

    rows = GENEVAL_ROWS + [POSITION_ROW]
    js = tmp_path / "m.jsonl"
    js.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_jsonl = load_prompts(PromptConfig(source=str(js)))
    assert _geneval_rewards(from_jsonl) == [1.0] * 4

    # plain list columns (what a user writes first): the struct fields are unified by Arrow
    datasets.Dataset.from_list(GENEVAL_ROWS).save_to_disk(str(tmp_path / "lists"))
    raw = datasets.load_from_disk(str(tmp_path / "lists"))
    assert raw[1]["include"][0]["color"] is None and raw[1]["exclude"] is None  # what Arrow does
    from_lists = load_prompts(PromptConfig(source=str(tmp_path / "lists")))
    assert _geneval_rewards(from_lists) == [1.0] * 3
    assert [i.metadata for i in from_lists] == GENEVAL_ROWS

    # position clauses cannot be a list column: JSON string columns (metadata_dataset writes them) can
    from fpo_diffusion.prompts import metadata_dataset

    metadata_dataset(rows).save_to_disk(str(tmp_path / "json"))
    from_json = load_prompts(PromptConfig(source=str(tmp_path / "json")))
    assert [i.metadata for i in from_json] == rows
    assert _geneval_rewards(from_json) == _geneval_rewards(from_jsonl)


def test_position_clause_that_arrow_mangled_says_what_works(tmp_path):
    import datasets

    row = dict(POSITION_ROW, include=[dict(c, position=[str(v) for v in c["position"]]) if "position" in c else c
                                      for c in POSITION_ROW["include"]])  # ["left of", "0"]: one type, so Arrow stores it
    datasets.Dataset.from_list([row]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"row 0: include\[1\] position .* store 'include' as a JSON string column"):
        load_prompts(PromptConfig(source=str(tmp_path / "ds")))
    datasets.Dataset.from_list([{"prompt": "x", "include": "[{not json"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="row 0: 'include' is a string but not JSON"):
        load_prompts(PromptConfig(source=str(tmp_path / "bad")))
    datasets.Dataset.from_list([{"prompt": "x"}, {"prompt": None}]).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="row 1: column 'prompt' is not a non-empty string"):
        load_prompts(PromptConfig(source=str(tmp_path / "none")))


def test_task_weights_recompose_the_list_to_the_mix(tmp_path):
    from collections import Counter

    rows = [{"prompt": f"c{i}", "tag": "counting"} for i in range(3)] + [{"prompt": f"p{i}", "tag": "position"}
                                                                          for i in range(5)]
    rows += [{"prompt": "x", "tag": "colors"}, {"prompt": "plain"}]
    js = tmp_path / "m.jsonl"
    js.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_prompts(PromptConfig(source=str(js), task_weights={"counting": 3, "position": 1}))
    assert len(items) == len(rows)  # the same length
    tags = Counter(i.metadata["tag"] for i in items)
    assert tags == {"counting": 8, "position": 2}  # 10 * 3/4 = 7.5 -> 7 + the remainder to the heaviest; colors: 0
    assert Counter(i.prompt for i in items if i.metadata["tag"] == "counting") == {"c0": 3, "c1": 3, "c2": 2}
    again = load_prompts(PromptConfig(source=str(js), task_weights={"counting": 3, "position": 1}))
    assert [i.prompt for i in again] == [i.prompt for i in items]  # deterministic (every rank, every resume)
    with pytest.raises(ConfigError, match=r"task_weights: .* has no prompt tagged 'count'; its tags: colors, counting"):
        load_prompts(PromptConfig(source=str(js), task_weights={"count": 1}))
    for bad, needle in (({"counting": -1}, "prompts.task_weights.counting must be a finite number >= 0"),
                        ({"counting": 0}, "all 0"), ({}, "non-empty"), ({"counting": "a"}, "must be a number"),
                        ({"counting": float("inf")}, "finite")):
        with pytest.raises(ConfigError, match=needle):
            PromptConfig(source=str(js), task_weights=bad)
    # the shapes world with Flow-GRPO's GenEval mix
    mix = {"position": 0.35, "counting": 0.25, "color_attr": 0.25, "two_object": 0.10, "colors": 0.05}
    shapes = Counter(i.metadata["tag"] for i in load_prompts(PromptConfig(source="embedded:shapes", task_weights=mix)))
    assert shapes == {"position": 700, "counting": 500, "color_attr": 500, "two_object": 200, "colors": 100}
