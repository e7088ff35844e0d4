"""One reader for UTF-8 text and JSON Lines files (``rewards/textfile.py``), used by the config, the prompt
files, GenEval metadata and GenEval results alike."""
import json

import pytest

from fpo_diffusion.config import ConfigError, PromptConfig
from fpo_diffusion.config_io import read_yaml
from fpo_diffusion.prompts import load_prompts
from rewards.geneval.metadata import GenEvalInputError, load_metadata
from rewards.geneval.summary import load_results
from rewards.textfile import JSONLineError, json_line, jsonl_lines, read_text

META = {"tag": "single_object", "prompt": "a photo of a cup\u2028", "include": [{"class": "cup", "count": 1}]}
RESULT = {"tag": "single_object", "correct": True, "metadata": json.dumps(META), "prompt": "a cup\u2028here"}


def test_read_text_and_its_one_line_errors(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("é\n", encoding="utf-8")
    assert read_text(p, "some file") == "é\n"
    p.write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match=rf"^some file {p} is not UTF-8 text \(byte 2\)$"):
        read_text(p, "some file")
    with pytest.raises(KeyError, match="cannot be read"):
        read_text(tmp_path, "some file", KeyError)  # a folder: an OSError


def test_json_lines_split_at_newline_only():
    text = json.dumps({"p": "a\u2028b\x1cc"}, ensure_ascii=False) + "\n\n  \n" + "[1]\r\n"
    assert [n for n, _ in jsonl_lines(text)] == [1, 4]
    assert [json_line(line) for _, line in jsonl_lines(text)] == [{"p": "a\u2028b\x1cc"}, [1]]
    with pytest.raises(JSONLineError, match="nested too deeply"):
        json_line("[" * 100_000)
    with pytest.raises(JSONLineError, match="Expecting"):
        json_line("{oops")


@pytest.mark.parametrize("load, error, what", [
    (lambda p: read_yaml(p), ConfigError, "config file"),
    (lambda p: load_prompts(PromptConfig(source=str(p))), ConfigError, "prompt file"),
    (load_metadata, GenEvalInputError, "metadata file"),
    (load_results, GenEvalInputError, "results file"),
])
def test_every_reader_names_a_file_that_is_not_utf8_in_one_line(tmp_path, load, error, what):
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(error, match=rf"^{what} {p} is not UTF-8 text \(byte 7\)$"):
        load(p)


def test_geneval_files_keep_a_line_separator_inside_a_string(tmp_path):
    """The results reader used ``splitlines()``, which cut a row at U+2028."""
    m = tmp_path / "meta.jsonl"
    m.write_text(json.dumps(META, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_metadata(m)[0]["prompt"] == META["prompt"]
    r = tmp_path / "results.jsonl"
    r.write_text("\n".join(json.dumps(dict(RESULT, i=i), ensure_ascii=False) for i in range(2)) + "\n",
                 encoding="utf-8")
    assert [row["prompt"] for row in load_results(r)] == [RESULT["prompt"]] * 2
    r.write_text(json.dumps(RESULT) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(GenEvalInputError, match=r"results\.jsonl:2: invalid JSON \(nested too deeply\)"):
        load_results(r)
