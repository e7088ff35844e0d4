"""Bad input, fuzzed (issue 8, part 3): config files, dotted overrides, prompt files, GenEval
metadata lines and reward-server requests.

Each property: any input either works (and then round-trips what it holds) or fails with the
one error type of its layer (``ConfigError``, ``GenEvalInputError``, an HTTP 4xx with a
``detail`` string) carrying a one-line message; never a traceback from inside PyYAML, json,
PIL or FastAPI, and never a 5xx.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import string

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fpo_diffusion.config import Config, ConfigError, PromptConfig
from fpo_diffusion.config_io import config_to_dict, load_config, save_config
from fpo_diffusion.prompts import load_prompts
from rewards.geneval.metadata import GenEvalInputError, load_metadata, parse_metadata_line, validate_metadata

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------- config files and overrides
DEFAULTS = config_to_dict(Config())
SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
FIELDS = {name: [f.name for f in dataclasses.fields(getattr(Config(), name))]
          for name in SECTIONS if dataclasses.is_dataclass(getattr(Config(), name))}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=12),
                    st.sampled_from(["1e-3", ".inf", "-.inf", ".nan", "2020-13-45", "yes", "0x1F", "~"]))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=8), st.integers(), st.none())
section_maps = st.dictionaries(
    st.sampled_from(sorted(SECTIONS)),
    st.one_of(values, st.dictionaries(st.one_of(st.sampled_from(sorted({f for fs in FIELDS.values() for f in fs})),
                                                st.text(max_size=6)), values, max_size=4)),
    max_size=4)
DEFAULT_YAML = yaml.safe_dump(config_to_dict(Config()), sort_keys=False)


@st.composite
def mutated_default(draw):
    """The default config's YAML with a few characters replaced, inserted or cut."""
    text = DEFAULT_YAML
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["replace", "insert", "cut"]))
        ch = draw(st.sampled_from(list(":-[]{}&*!|>'\"#%@`, \t\n") + list(string.ascii_letters[:6]) + ["\x00", "é"]))
        if op == "replace":
            text = text[:i] + ch + text[i + 1:]
        elif op == "insert":
            text = text[:i] + ch + text[i:]
        else:
            text = text[:i]
    return text


config_texts = st.one_of(
    st.text(max_size=200),
    mutated_default(),
    section_maps.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.dictionaries(keys, values, max_size=4).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
)


@FUZZ
@given(config_texts)
@example("train:\n  lr: [1\n")
@example("{1: a, train: {x: 1}}")
@example("output_dir: 2020-13-45\n")
@example("[" * 3000 + "]" * 3000)
@example("train: {lr: " + "9" * 5000 + "}")
@example("reward: {weights: {a: .nan}}")
@example("sampling: {batch_size: 0}")
@example("train: !!python/object/apply:os.system [echo]")
@example("train: {lr: 0.002, iterations: 7, adam_betas: [0.8, 0.9]}\nsampling: {steps: 3}\nreward: {weights: {a.b: 2}}\n")
def test_fuzzed_config_file_loads_or_fails_with_one_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        one_line(e)
        return
    assert isinstance(cfg, Config)
    # what loaded is a config the run can save and resume from: save / load gives it back unchanged
    saved = path.with_name("saved.yaml")
    save_config(cfg, saved)
    assert config_to_dict(load_config(saved)) == config_to_dict(cfg)
    # and loading never changed the defaults (no shared mutable default written through)
    assert config_to_dict(load_config(None, [])) == DEFAULTS == config_to_dict(Config())


@FUZZ
@given(st.binary(max_size=64))
@example(b"\xff\xfe\x00a: 1")
def test_config_file_of_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in one_line(e)


dotted = st.one_of(
    st.sampled_from([f"{s}.{f}" for s, fs in FIELDS.items() for f in fs] + sorted(SECTIONS)),
    st.lists(st.text(alphabet=string.ascii_lowercase + "._= ", max_size=6), min_size=1, max_size=3).map(".".join),
    st.sampled_from(["reward.weights.brightness", "reward.options.remote.url", "train.lr.x", ""]),
)
raw_values = st.one_of(st.text(max_size=20), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                       st.sampled_from(["[", "{a: ", "2020-13-45", "[" * 3000, "9" * 5000, ".nan", "!!binary x"]))


@FUZZ
@given(st.lists(st.tuples(dotted, raw_values), min_size=1, max_size=3))
@example([("train.lr", "2020-13-45")])
@example([("output_dir", "[" * 3000)])
@example([("sampling.batch_size", "0")])
@example([("train.lr", ".inf")])
def test_fuzzed_dotted_overrides_load_or_fail_with_one_config_error(pairs):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        one_line(e)
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(st.text(max_size=30))
def test_override_without_a_key_or_equals_sign(text):
    try:
        load_config(None, [text])
    except ConfigError as e:
        one_line(e)


# ---------------------------------------------------------------- prompt files
prompt_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(lambda s: s.strip())


@FUZZ
@given(st.lists(prompt_text, min_size=1, max_size=6))
@example(["a\u2028b", "c\x1cd", "tab\there"])
def test_any_jsonl_prompts_round_trip(tmp_path_factory, prompts):
    path = tmp_path_factory.mktemp("p") / "p.jsonl"
    rows = [json.dumps({"prompt": p, "i": i}, ensure_ascii=False) for i, p in enumerate(prompts)]
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    items = load_prompts(PromptConfig(source=str(path)))
    assert [it.prompt for it in items] == prompts
    assert [it.metadata["i"] for it in items] == list(range(len(prompts)))


@FUZZ
@given(st.lists(prompt_text.filter(lambda s: "\n" not in s and "\r" not in s and s == s.strip()), min_size=1, max_size=6))
@example(["a\u2028b", "c\x1cd", "tab\there", "e\x85f"])
def test_any_text_file_prompts_round_trip(tmp_path_factory, prompts):
    """A .txt prompt file holds one prompt per line (a line ends at LF, CR LF or CR), whatever other separators
    a prompt holds (U+2028, FS, NEL)."""
    path = tmp_path_factory.mktemp("p") / "p.txt"
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    items = load_prompts(PromptConfig(source=str(path)))
    assert [it.prompt for it in items] == prompts


@FUZZ
@given(st.sampled_from([".txt", ".jsonl"]), st.one_of(
    st.binary(max_size=80),
    st.lists(st.one_of(values.map(lambda v: json.dumps(v)), st.text(max_size=20)), max_size=4).map(
        lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))))
@example(".jsonl", b"[" * 100000)
@example(".txt", b"\xff\xfe")
@example(".jsonl", b'{"prompt": "   "}')
@example(".jsonl", b'{"prompt": 3}\n')
def test_fuzzed_prompt_files_load_or_fail_with_one_config_error(tmp_path_factory, suffix, data):
    path = tmp_path_factory.mktemp("p") / f"p{suffix}"
    path.write_bytes(data)
    try:
        items = load_prompts(PromptConfig(source=str(path)))
    except ConfigError as e:
        assert str(path) in one_line(e)
        return
    assert items and all(isinstance(it.prompt, str) and it.prompt.strip() for it in items)


@pytest.mark.parametrize("source", ["", "a" * 5000, "nowhere.txt", "a\x00b.txt"])
def test_unusable_prompt_sources(source):
    with pytest.raises(ConfigError) as e:
        load_prompts(PromptConfig(source=source))
    one_line(e.value)


# ---------------------------------------------------------------- GenEval metadata
GOOD = {"tag": "position", "prompt": "a dog left of a cat",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
        "exclude": [{"class": "bird", "count": 1}]}


@st.composite
def mutated_entry(draw):
    """The valid entry with one value somewhere replaced by anything JSON can hold."""
    entry = json.loads(json.dumps(GOOD))
    paths = [("tag",), ("prompt",), ("include",), ("exclude",), ("include", 0), ("include", 1, "position"),
             ("include", 1, "position", 0), ("include", 1, "position", 1), ("include", 0, "count"),
             ("include", 0, "class"), ("include", 1, "color"), ("exclude", 0, "count"), ("include", 0, "extra")]
    path = draw(st.sampled_from(paths))
    node = entry
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = draw(values)
    return entry


metadata_lines = st.one_of(st.text(max_size=60), values.map(json.dumps), mutated_entry().map(json.dumps))


@FUZZ
@given(metadata_lines)
@example("[" * 100000)
@example(json.dumps({**GOOD, "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1,
                                                                          "position": [["left of"], 0]}]}))
@example(json.dumps({**GOOD, "include": [{"class": "cat", "count": 1, "color": {"a": 1}}]}))
@example("NaN")
def test_fuzzed_geneval_metadata_lines(line):
    try:
        entry = parse_metadata_line(line, "meta.jsonl:7", {"cat", "dog", "bird"})
    except GenEvalInputError as e:
        assert one_line(e).startswith("meta.jsonl:7: ")
        return
    assert validate_metadata(entry) is None and entry["include"]


@FUZZ
@given(st.lists(metadata_lines, max_size=3), st.binary(max_size=8))
def test_fuzzed_geneval_metadata_files(tmp_path_factory, lines, junk):
    path = tmp_path_factory.mktemp("m") / "meta.jsonl"
    path.write_bytes(("\n".join(lines)).encode("utf-8", "surrogatepass") + junk)
    try:
        out = load_metadata(path)
    except GenEvalInputError as e:
        assert str(path) in one_line(e)
        return
    assert out and all(validate_metadata(e) is None for e in out)


def test_geneval_prompt_with_a_line_separator_loads(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps({**GOOD, "prompt": "a dog\u2028left of a cat"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert load_metadata(path)[0]["prompt"] == "a dog\u2028left of a cat"


# ---------------------------------------------------------------- reward-server requests
@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from rewards.registry import build_reward
    from rewards.server import create_app

    app = create_app(build_reward("brightness"), max_batch=6, max_image_side=64, max_request_mb=0.5)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def b64_image(seed: int, mode: str, fmt: str, side: int) -> str:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def brightness_of(b64: str) -> float:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    return float(np.float32(np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255.0))  # rewards are float32


images = st.one_of(
    st.builds(b64_image, st.integers(0, 10**6), st.sampled_from(["RGB", "L", "P", "RGBA", "1", "LA"]),
              st.just("PNG"), st.sampled_from([1, 8, 64, 65])),
    st.builds(b64_image, st.integers(0, 10**6), st.sampled_from(["RGB", "L", "CMYK"]), st.just("JPEG"), st.just(8)),
    st.builds(b64_image, st.integers(0, 10**6), st.just("RGB"), st.sampled_from(["GIF", "BMP", "TIFF"]), st.just(8)),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=20), values,
)


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["json", "bytes", "shaped"]))
    if kind == "bytes":
        return draw(st.one_of(st.binary(max_size=100), st.sampled_from([b"[" * 100000, b'{"images": ' + b"[" * 5000])))
    if kind == "json":
        return json.dumps(draw(values)).encode()
    n = draw(st.integers(0, 8))
    body = {"images": draw(st.lists(images, min_size=n, max_size=n)),
            "prompts": draw(st.one_of(st.lists(st.text(max_size=10), min_size=n, max_size=n), values))}
    if draw(st.booleans()):
        body["metadata"] = draw(st.one_of(st.lists(st.dictionaries(st.text(max_size=4), values, max_size=2),
                                                   min_size=n, max_size=n), values))
    return json.dumps(body).encode()


@FUZZ
@given(requests())
@example(b"[" * 100000)
@example(json.dumps({"images": [b64_image(1, "RGB", "PNG", 65)], "prompts": ["x"]}).encode())
def test_fuzzed_reward_server_requests_get_a_4xx_or_correct_scores(client, body):
    r = client.post("/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    payload = r.json()
    if r.status_code != 200:
        assert isinstance(payload.get("detail"), str) and "\n" not in payload["detail"], payload
        return
    sent = json.loads(body)["images"]
    assert payload["scores"] == pytest.approx([brightness_of(b) for b in sent], abs=0)  # right score, right slot
