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
