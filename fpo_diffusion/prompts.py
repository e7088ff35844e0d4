"""Training prompts (with optional per-prompt metadata) and the distributed k-repeat sampler."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rewards.textfile import JSONLineError, json_line, jsonl_lines, read_text

from .config import ConfigError, PromptConfig

TINY_PROMPTS = [
    "a red circle", "a blue square", "two green triangles", "a yellow circle left of a red square",
    "a purple square", "three blue circles", "a green circle above a blue triangle", "an orange triangle",
]


@dataclass
class PromptItem:
    prompt: str
    metadata: dict = field(default_factory=dict)
    where: str = field(default="", compare=False, repr=False)
    """Where the prompt came from, for error messages (``prompt file X, line 3``, ``embedded:shapes, entry 5``)."""


def _read_text(path: Path) -> str:
    return read_text(path, "prompt file", ConfigError)


def _read_jsonl(path: Path) -> list[PromptItem]:
    items = []
    for n, line in jsonl_lines(_read_text(path)):
        try:
            row = json_line(line)
        except JSONLineError as e:
            raise ConfigError(f"prompt file {path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ConfigError(f"prompt file {path}, line {n}: expected an object with a non-empty \"prompt\" string")
        where = f"prompt file {path}, line {n}"
        items.append(PromptItem(row["prompt"], normalise_metadata(row, where), where))
    return items


CLAUSE_COLUMNS = ("include", "exclude")
"""GenEval clause lists; in a ``datasets`` folder either a list column or a JSON string column."""


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def normalise_metadata(row: dict, where: str) -> dict:
    """One prompt's metadata with the same meaning whatever its source (``.jsonl`` or ``datasets``).

    * A key whose value is ``None`` is dropped, at any depth: Arrow unifies the fields of the
      structs in a column, so ``{"class": "square", "count": 2}`` comes back from a ``datasets``
      folder as ``{..., "color": None}``, and GenEval's rules read a present ``color`` as a clause.
      In a ``.jsonl`` file ``null`` likewise means absent.
    * ``include`` / ``exclude`` stored as a JSON string column (the way a ``datasets`` folder can hold
      position clauses, ``["left of", 0]``, which Arrow cannot store as a list of one type) are parsed.
    * A position clause whose index came back as a string (a ``["left of", "0"]`` list column) is an
      error that says to store the clauses as a JSON string column.
    """
    out = _drop_none(row)
    for key in CLAUSE_COLUMNS:
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                raise ConfigError(f"{where}: {key!r} is a string but not JSON (a JSON string column must hold "
                                  f"json.dumps of the clause list)") from None
            if not isinstance(out[key], list):
                raise ConfigError(f"{where}: {key!r} must hold a JSON list of clauses, got {type(out[key]).__name__}")
            out[key] = _drop_none(out[key])
    for i, clause in enumerate(out.get("include") or []):
        pos = clause.get("position") if isinstance(clause, dict) else None
        if isinstance(pos, list) and len(pos) == 2 and isinstance(pos[1], str):
            raise ConfigError(f"{where}: include[{i}] position {pos!r} has a string index (an Arrow list holds one "
                              f"type, so [relation, index] cannot be a list column); store 'include' as a JSON "
                              f"string column (json.dumps(include)), which the loader parses")
    return out


def load_prompts(cfg: PromptConfig) -> list[PromptItem]:
    """The prompt list named by ``cfg.source``; an empty or unreadable source is a :class:`ConfigError`."""
    src = cfg.source
    if not src.startswith(("embedded:", "hf:")):
        try:
            Path(src).exists()
        except (OSError, ValueError) as e:  # e.g. a name too long for the file system
            why = getattr(e, "strerror", None) or e
            raise ConfigError(f"prompt source {src[:200]!r} is not a usable path: {why}") from None
    if src == "embedded:tiny":
        items = [PromptItem(p, {}, f"embedded:tiny, entry {i}") for i, p in enumerate(TINY_PROMPTS)]
    elif src.startswith("embedded:"):
        from . import plugins

        fn = plugins.lookup(plugins.PROMPTS, src[len("embedded:"):])
        if fn is None:
            known = ", ".join(["embedded:tiny"] + [f"embedded:{n}" for n in plugins.names(plugins.PROMPTS)])
            raise ConfigError(f"unknown embedded prompt source {src!r}; available: {known}")
        items = [PromptItem(m["prompt"], m, f"{src}, entry {i}") for i, m in enumerate(fn())]
    elif src.startswith("hf:") or (Path(src).is_dir() and (Path(src) / "dataset_info.json").exists()
                                   or (Path(src) / "dataset_dict.json").exists()):
        items = _load_dataset(src, cfg.column)
    else:
        path = Path(src)
        if not path.is_file():
            raise ConfigError(f"prompt source {src} does not exist")
        if path.suffix == ".jsonl":
            items = _read_jsonl(path)
        else:
            # lines end at "\n" only, as in a JSONL file: a prompt may hold U+2028 or \x1c
            items = [PromptItem(line.strip(), {}, f"prompt file {path}, line {n}")
                     for n, line in jsonl_lines(_read_text(path))]
    if not items:
        raise ConfigError(f"prompt source {src} holds no prompts")
    if cfg.tags:
        tag_of = [(it.metadata or {}).get("tag") for it in items]
        present = sorted({str(t) for t in tag_of if t})
        missing = [t for t in cfg.tags if t not in present]
        if missing:
            raise ConfigError(f"prompt source {src} has no prompt tagged {', '.join(map(repr, missing))}; its tags: "
                              f"{', '.join(present) or 'none (no metadata with a tag)'}")
        items = [it for it, t in zip(items, tag_of) if t in cfg.tags]
    if cfg.task_weights:
        items = weight_tasks(items, cfg.task_weights, src)
    return items


def check_metadata(items: list[PromptItem], check, setting: str = "prompts.source") -> None:
    """:class:`ConfigError` naming the first prompt whose metadata ``check`` (``MultiReward.check_metadata``:
    metadata -> problem or ``None``) refuses, with where it came from: run before anything loads, so a prompt
    the reward cannot score (an unknown class or tag, ``"count": "three"``) is one line, not a reward of 0 or an
    error after a rollout."""
    for i, it in enumerate(items):
        problem = check(it.metadata or {})
        if problem:
            where = it.where or f"entry {i} ({it.prompt[:80]!r})"
            raise ConfigError(f"{setting}: {where}: {problem}")


TASK_MIX_SEED = 20_261_206
"""Seed of the order in which :func:`weight_tasks` cycles each task's prompts."""


def weight_tasks(items: list[PromptItem], weights: dict[str, float], src: str = "the prompts") -> list[PromptItem]:
    """``items`` recomposed to the task mix ``weights`` (``prompts.task_weights``), the same length.

    Task ``t`` gets ``round(len(items) * w_t / sum(w))`` entries (the rounding remainder to the
    heaviest tasks), its own prompts cycled in a fixed seeded order; tasks appear in the order of
    ``weights``. Deterministic, so every rank and every resumed run sees the same list.
    """
    by_tag: dict[str, list[PromptItem]] = {}
    for it in items:
        by_tag.setdefault(str((it.metadata or {}).get("tag") or ""), []).append(it)
    missing = [t for t in weights if t not in by_tag]
    if missing:
        present = sorted(t for t in by_tag if t)
        raise ConfigError(f"prompts.task_weights: {src} has no prompt tagged {', '.join(map(repr, missing))}; its "
                          f"tags: {', '.join(present) or 'none (no metadata with a tag)'}")
    total, n = float(sum(weights.values())), len(items)
    counts = {t: int(n * w / total) for t, w in weights.items()}
    for t in sorted(weights, key=lambda t: -weights[t])[: n - sum(counts.values())]:
        counts[t] += 1
    gen = torch.Generator().manual_seed(TASK_MIX_SEED)
    out: list[PromptItem] = []
    for t, k in counts.items():
        pool = by_tag[t]
        order = torch.randperm(len(pool), generator=gen).tolist()
        out.extend(pool[order[i % len(pool)]] for i in range(k) if weights[t] > 0)
    return out


def _load_dataset(src: str, column: str) -> list[PromptItem]:
    import datasets

    if src.startswith("hf:"):
        name, _, split = src[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except (ConnectionError, OSError, ValueError) as e:  # offline, no such dataset / split, no network
            why = " ".join(str(e).split())[:200]
            raise ConfigError(f"prompt source {src}: cannot load the dataset ({type(e).__name__}: {why}); online, "
                              f"check the name; offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), load it once online "
                              f"and pass the folder of dataset.save_to_disk(...)") from None
    else:
        ds = datasets.load_from_disk(src)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if column not in ds.column_names:
        raise ConfigError(f"dataset {src} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    items = []
    for n, row in enumerate(ds):
        prompt = row[column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"dataset {src}, row {n}: column {column!r} is not a non-empty string")
        where = f"dataset {src}, row {n}"
        items.append(PromptItem(prompt, normalise_metadata(dict(row), where), where))
    return items


def metadata_dataset(entries: list[dict]):
    """A ``datasets.Dataset`` of GenEval-style metadata (``prompt``, ``tag``, ``include``, ``exclude``...)
    that loads back unchanged: the clause lists are JSON string columns (see :func:`normalise_metadata`).
    Save it with ``.save_to_disk(folder)`` and train with ``prompts.source=folder``."""
    import datasets

    keys = list(dict.fromkeys(k for e in entries for k in e))  # from_list reads the columns off the first row
    rows = [{k: (json.dumps(e[k]) if k in CLAUSE_COLUMNS and k in e else e.get(k)) for k in keys} for e in entries]
    return datasets.Dataset.from_list(rows)


def iteration_plan(n_prompts: int, iteration: int, *, prompts_per_iteration: int, group_size: int,
                   seed: int) -> torch.Tensor:
    """Prompt index of every global sample of an iteration: P prompts, each repeated K times.

    Prompts are drawn without replacement (with replacement only if ``P > n_prompts``) from
    a generator seeded by ``(seed, iteration)``: the plan depends on nothing else, so every
    rank computes the same plan, and resuming at an iteration resumes the sampler exactly.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration + 7)
    if prompts_per_iteration <= n_prompts:
        chosen = torch.randperm(n_prompts, generator=g)[:prompts_per_iteration]
    else:
        chosen = torch.randint(0, n_prompts, (prompts_per_iteration,), generator=g)
    return chosen.repeat_interleave(group_size)


def rank_slice(n_total: int, rank: int, world: int) -> slice:
    """Contiguous share of the global samples held by ``rank`` (groups may span ranks)."""
    if n_total % world:
        raise ConfigError(f"prompts_per_iteration x group_size = {n_total} samples do not divide over {world} ranks")
    per = n_total // world
    return slice(rank * per, (rank + 1) * per)
