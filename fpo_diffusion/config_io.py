"""Reading and writing configs: YAML files and dotted CLI overrides -> a checked :class:`~fpo_diffusion.config.Config`,
and a ``Config`` -> YAML (secrets redacted).

``load_config(path, overrides)`` starts from the dataclass defaults (the embedded default
run), applies the YAML file, then ``a.b.c=value`` overrides (values parsed as YAML).
Unknown fields, wrong types and malformed YAML raise :class:`~fpo_diffusion.config.ConfigError` with one line
that names the problem. The schema itself (the dataclasses, their documentation and range checks) is
``fpo_diffusion/config.py``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, awm_step_pool


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str) and not isinstance(value, bool):
                try:  # YAML 1.1 reads "3e-4" as a string
                    return float(value.strip().lstrip(".") if value.strip().lower() in (".inf", "+.inf") else value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys need not be strings (``1: x``, ``null: x``)
    if unknown:
        name = unknown[0] if isinstance(unknown[0], str) and unknown[0].isidentifier() else repr(unknown[0])  # one line, whatever the key
        raise ConfigError(f"unknown config field {where + '.' if where != 'config' else ''}{name} "
                          f"(known fields of {cls.__name__}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_to_dict(cfg: Any) -> dict:
    """A plain dict (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("weights", "options"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _split_key(key: str, text: str) -> list[str]:
    """``a."b.c".d`` -> ``["a", "b.c", "d"]``: a double-quoted part keeps its dots."""
    parts, cur, quoted, was_quoted = [], "", False, False
    for ch in key:
        if ch == '"':
            quoted, was_quoted = not quoted, True
        elif ch == "." and not quoted:
            parts.append((cur, was_quoted))
            cur, was_quoted = "", False
        else:
            cur += ch
    if quoted:
        raise ConfigError(f"override {text!r} has an unclosed quote in its key")
    parts.append((cur, was_quoted))
    if any(not p and not q for p, q in parts):
        raise ConfigError(f"override {text!r} has an empty key")
    return [p for p, _ in parts]


def _split_assignment(text: str) -> tuple[str, str]:
    """The key and the raw value of ``key=value``, split at the first ``=`` outside double quotes."""
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not quoted:
            return text[:i], text[i + 1:]
    if quoted:
        raise ConfigError(f"override {text!r} has an unclosed quote in its key")
    raise ConfigError(f"override {text!r} is not of the form dotted.key=value")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> ``(["a", "b"], 3)`` (the value is parsed as YAML).

    A double-quoted part of the key keeps its dots (``reward.weights."remote:http://127.0.0.1:8765"=1``);
    the names under ``reward.weights`` / ``reward.options`` need no quotes (see :func:`load_config`).
    """
    key, raw = _split_assignment(text)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    keys = _split_key(key, text)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. a date-like 2020-13-45, 10^5 digits, [[[[...
        value = raw
    return keys, value


def _reward_name_keys(keys: list[str], reward: dict) -> list[str]:
    """Rejoin a reward name that the dots of a URL split: ``reward.weights.<name>`` takes the whole rest as the
    name; ``reward.options.<name>.<option>...`` the longest prefix of the rest that names a reward in
    ``weights`` or ``options`` (else the first part)."""
    if len(keys) < 3 or keys[0] != "reward" or keys[1] not in ("weights", "options"):
        return keys
    rest = keys[2:]
    if keys[1] == "weights":
        return [*keys[:2], ".".join(rest)]
    known = set(reward.get("weights") or {}) | set(reward.get("options") or {}) if isinstance(reward, dict) else set()
    for n in range(len(rest), 0, -1):
        if ".".join(rest[:n]) in known:
            return [*keys[:2], ".".join(rest[:n]), *rest[n:]]
    return keys


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    from rewards.textfile import read_text

    text = read_text(p, "config file", ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())  # one line (a ReaderError has no mark)
        raise ConfigError(f"config file {p} is not valid YAML{at}: {what}") from None
    except (ValueError, RecursionError) as e:  # PyYAML constructors: bad dates, huge integers; deep nesting
        raise ConfigError(f"config file {p} is not valid YAML: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict | None = None) -> Config:
    """Defaults (or ``base``, e.g. a run's saved config), then the YAML file, then dotted overrides; validated."""
    data = config_to_dict(Config()) if base is None else _merge(config_to_dict(Config()), base)
    if path is not None:
        data = _merge(data, read_yaml(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        keys = _reward_name_keys(keys, data.get("reward"))
        if len(keys) >= 4 and keys[:2] == ["reward", "options"] and isinstance(data.get("reward"), dict) \
                and isinstance(data["reward"].get("options"), dict):
            data["reward"]["options"].setdefault(keys[2], {})  # reward.options.<name>.<option>=v needs no YAML first
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"unknown config field {'.'.join(keys)} (in override {text!r})")
            node = node[k]
        free = keys[:2] in (["reward", "weights"], ["reward", "options"]) and len(keys) >= 3  # names of rewards, options
        if keys[-1] not in node and not free:
            raise ConfigError(f"unknown config field {'.'.join(keys)} (in override {text!r})")
        node[keys[-1]] = value
    default_reward = config_to_dict(Config())["reward"]
    reward = data.get("reward")
    if isinstance(reward, dict) and reward.get("weights") != default_reward["weights"] \
            and reward.get("options") == default_reward["options"]:
        reward["options"] = {}  # the default options belong to the default reward only
    if isinstance(reward, dict) and isinstance(reward.get("options"), dict) and isinstance(reward.get("weights"), dict):
        for name, opts in default_reward["options"].items():  # e.g. reward.options.<url>.timeout=3 with new weights
            if name not in reward["weights"] and reward["options"].get(name) == opts:
                del reward["options"][name]
    try:
        cfg = _from_dict(Config, data)
        validate(cfg)
    except ConfigError as e:
        raise _naming_the_file(e, path, overrides) from None
    return cfg


def override_keys(text: str, data: dict) -> tuple[list[str], Any]:
    """The key path and value of override ``text`` as :func:`load_config` applies it to ``data``."""
    keys, value = parse_override(text)
    return _reward_name_keys(keys, data.get("reward")), value


def _naming_the_file(error: ConfigError, path: str | Path | None, overrides: list[str] | None) -> ConfigError:
    """``error`` with the config file named when the file alone causes it (e.g. a YAML key ``null``), so
    the line says where to look; an error that only the overrides cause is left as it is."""
    if path is None or str(Path(path)) in str(error):
        return error
    if overrides:
        try:
            load_config(path)
        except ConfigError as alone:
            return alone if str(alone).endswith(str(error)) else error
        return error
    return ConfigError(f"config file {Path(path)}: {error}")


def validate(cfg: Config) -> None:
    """Checks across sections. Each field's own range is checked where it is defined (the sections'
    ``__post_init__``), so a dataclass built in code is held to the same ranges as a YAML file."""
    # A NaN is never a setting (also inside lists and the fields without a range of their own).
    _no_nan(config_to_dict(cfg), "")
    if cfg.algorithm == "awm":  # AWM trains on distinct sampler steps [1, K): more times than steps repeat them
        k = awm_step_pool(cfg.sampling.steps, cfg.awm.timestep_fraction)
        if k < 2:
            raise ConfigError(f"algorithm awm needs int(sampling.steps x awm.timestep_fraction) >= 2 sampler steps to "
                              f"draw from, got int({cfg.sampling.steps} x {cfg.awm.timestep_fraction:g}) = {k}; raise "
                              f"sampling.steps")
        if cfg.awm.train_timesteps > k - 1:
            raise ConfigError(f"awm.train_timesteps={cfg.awm.train_timesteps} is more than the {k - 1} sampler steps it "
                              f"draws from (steps 1..{k - 1} of sampling.steps={cfg.sampling.steps} x "
                              f"awm.timestep_fraction={cfg.awm.timestep_fraction:g}): the same steps would repeat; "
                              f"lower it to <= {k - 1} or raise sampling.steps")


def config_warnings(cfg: Config) -> list[str]:
    """One line for each setting that is accepted but does not do what it seems to (the trainer prints them before
    anything loads)."""
    out = []
    e = cfg.eval
    if e.prompts is not None and not e.every:
        out.append(f"warning: eval.prompts={e.prompts} is set but eval.every=0: no periodic evaluation runs; set "
                   f"eval.every=N (e.g. eval.every={max(1, cfg.train.iterations // 4)}) or drop eval.prompts")
    if e.prompts is not None and e.every and e.prompts == cfg.prompts.source and e.column == cfg.prompts.column \
            and (e.tags is None or cfg.prompts.tags is None or set(e.tags) & set(cfg.prompts.tags)):
        out.append(f"warning: eval.prompts is the training prompt source ({e.prompts}): its eval/* scores are not "
                   f"held-out; use prompts the run does not train on (e.g. a validation split)")
    if e.reward_options and not e.every:
        out.append("warning: eval.reward_options is set but eval.every=0: there is no periodic evaluation to score")
    return out


def _no_nan(node: Any, where: str) -> None:
    if isinstance(node, float) and math.isnan(node):
        raise ConfigError(f"{where} is NaN")
    if isinstance(node, dict) and where != "reward.options":  # options are the rewards' own business
        for k, v in node.items():
            _no_nan(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _no_nan(v, f"{where}[{i}]")


SECRET_NAME = re.compile(r"token|passw(or)?d|passphrase|secret|api[_-]?key|apikey|credential|auth|private[_-]?key|"
                         r"access[_-]?key|bearer|cookie|session[_-]?id", re.IGNORECASE)
"""Names of options that hold secrets (``token``, ``password``, ``api_key``, ``hf_token``, ``auth``...): their
values are never written (config.yaml, trainer_state.json, TensorBoard, W&B); see :func:`redacted`."""
REDACTED = "<redacted>"
"""What a secret's value is written as."""


def redacted(node: Any) -> Any:
    """A copy of ``node`` (a config dict) with the value of every key named like a secret (:data:`SECRET_NAME`)
    replaced by :data:`REDACTED`, at any depth (e.g. ``reward.options."remote:URL".token``)."""
    if isinstance(node, dict):
        return {k: (REDACTED if isinstance(k, str) and SECRET_NAME.search(k) and v not in (None, "")
                    else redacted(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [redacted(v) for v in node]
    return node


def config_for_writing(cfg: Config) -> dict:
    """The config as it is written anywhere (``config.yaml``, checkpoints, TensorBoard, W&B): secrets redacted.
    A remote reward's token belongs in ``$REWARD_SERVER_TOKEN`` (``rewards/remote.py``), not in the config."""
    return redacted(config_to_dict(cfg))


def secrets_in(cfg: Config) -> list[str]:
    """Dotted names of the config's options that hold a secret (they are redacted when written)."""
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                name = f"{where}.{k}" if where else str(k)
                if isinstance(k, str) and SECRET_NAME.search(k) and v not in (None, ""):
                    found.append(name)
                else:
                    walk(v, name)

    walk(config_to_dict(cfg), "")
    return found


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (secrets redacted: :func:`config_for_writing`), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config_for_writing(cfg), sort_keys=False))
    tmp.replace(path)


def record_config(cfg: Config, path: Path) -> None:
    """Rewrite ``path`` with ``cfg`` if it says something else (a resume that changed a setting records it)."""
    try:
        same = yaml.safe_load(path.read_text()) == config_for_writing(cfg)
    except (OSError, yaml.YAMLError):
        same = False
    if not same:
        save_config(cfg, path)
