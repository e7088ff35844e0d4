"""The dependency graph runs one way (docs/architecture.md, "The layer order"): no import cycles among the project's
modules, ``rewards`` never imports the core, algorithms never reach into the rollout or the loop.

Imports are read with ``ast`` (every ``import`` statement, also those inside functions and
``TYPE_CHECKING`` blocks), so a lazy import cannot hide a cycle.

The shapes world (``fpo_diffusion/shapes/``) may import the core and rewards; nothing in the
core or in rewards imports it (it plugs in through entry points, ``fpo_diffusion/plugins.py``).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIPPED: tuple[str, ...] = ()


def _skipped(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in _SKIPPED)


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for top in ("fpo_diffusion", "rewards"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            name = ".".join(parts)
            if not _skipped(name):
                out[name] = (path, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from . import x`` names ``x`` where it is a module)."""
    mods = _modules()

    def project_module(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" for a in node.names] if not node.module else \
                    [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if _skipped(t):
                    continue
                dep = project_module(t)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_correctly():
    g = import_graph()
    assert "fpo_diffusion.algorithms.context" in g["fpo_diffusion.algorithms.base"]
    assert "fpo_diffusion.rollout" in g["fpo_diffusion.trainer"]
    assert "rewards.base" in g["rewards.registry"]
    assert "fpo_diffusion.faults" in g["fpo_diffusion.update"]  # from . import faults
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_rewards_never_import_the_core():
    bad = {m: sorted(d for d in deps if d.startswith("fpo_diffusion"))
           for m, deps in import_graph().items() if m.startswith("rewards")}
    assert {m: d for m, d in bad.items() if d} == {}


LAYERS = [
    # foundations: settings, pure math, bookkeeping (config names the objective's and noise's dataclasses)
    {"errors", "config", "config_io", "fpo", "noise", "advantages", "faults", "images", "tokenizers", "tracking", "checkpoint",
     "run_lock", "nft", "awm", "beta_control", "lagged", "plugins", "budget", "distributed"},
    # model families and what feeds them
    {"policies", "lora", "tiny", "embedded", "prompts"},
    {"algorithms"},
    # what the loop calls
    {"rollout", "update", "run_state", "export", "periodic_eval"},
    {"trainer", "cli", "launcher"},
]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "fpo_diffusion":
        return None
    if len(parts) == 1:
        return 0  # the package itself (its version)
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    return None


def test_core_modules_import_only_their_layer_and_below():
    """config -> objective / noise / advantages -> policies -> algorithms -> rollout / update -> loop."""
    g = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps
                    if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m))
    assert upward == []
    assert _layer("fpo_diffusion.algorithms.fpo") == 2 and _layer("fpo_diffusion.rollout") == 3


def test_every_core_module_has_a_layer():
    """A new top-level module must be placed in ``LAYERS`` (else the one-way rule would not cover it); the
    shapes world is a plug-in with its own test below, ``assets`` holds data."""
    import pkgutil

    import fpo_diffusion

    names = {m.name for m in pkgutil.iter_modules(fpo_diffusion.__path__)} - {"shapes", "assets"}
    placed = set().union(*LAYERS)
    assert sorted(names - placed) == [] and sorted(placed - names) == []


def test_nothing_imports_the_shapes_world():
    """The shapes world depends on the core and rewards; nothing depends on it (entry points plug it in)."""
    g = import_graph()
    world = {m: deps for m, deps in g.items() if m.startswith("fpo_diffusion.shapes")}
    assert any(d.startswith("fpo_diffusion.") and not d.startswith("fpo_diffusion.shapes")
               for deps in world.values() for d in deps)  # it does use the library (and is in the graph)
    assert any(d.startswith("rewards.") for d in world["fpo_diffusion.shapes.reward"])
    bad = sorted(f"{m} -> {d}" for m, deps in g.items() for d in deps
                 if d.startswith("fpo_diffusion.shapes") and not m.startswith("fpo_diffusion.shapes"))
    assert bad == []
