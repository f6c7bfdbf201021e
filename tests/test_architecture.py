"""The import graph of src/sidflow, built from the source with ``ast``: no cycles, and every import
points from a room to itself or to a room before it (README, "The library")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sidflow"

# Rooms in dependency order: a module may import its own room and rooms listed before it, never after.
ROOMS = [
    ("base", ("sidflow", "sidflow.errors", "sidflow.atomic", "sidflow.collectives")),
    ("metrics", ("sidflow.metrics",)),
    ("core", ("sidflow.core",)),
    ("config", ("sidflow.config",)),
    ("teachers", ("sidflow.teachers", "sidflow.testing")),
    ("trainer", ("sidflow.trainer", "sidflow.optim")),
    ("data", ("sidflow.data",)),
    ("eval", ("sidflow.eval",)),
    ("run", ("sidflow.run",)),
    ("benchmarks", ("sidflow.digits", "sidflow.toy")),
    ("cli", ("sidflow.cli",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("sidflow", *path.relative_to(SRC).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every sidflow module ``name`` imports, lazy imports inside functions included."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _room(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no room; add it to ROOMS and to the README's module table")
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
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


def _package_inits_excluded(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exporting its own submodules is not a dependency of those submodules.
    return {
        m: {
            d
            for d in deps
            if not (d.startswith(m + ".") and (SRC / "/".join(m.split(".")[1:]) / "__init__.py").exists())
        }
        for m, deps in graph.items()
    }


def test_import_graph_has_no_cycles():
    assert _cycles(_package_inits_excluded(_graph())) == []


def test_every_import_points_to_an_earlier_room():
    bad = [
        f"{m} ({ROOMS[_room(m)][0]}) imports {d} ({ROOMS[_room(d)][0]})"
        for m, deps in sorted(_graph().items())
        for d in sorted(deps)
        if m != "sidflow" and _room(d) > _room(m)
    ]
    assert bad == []


@pytest.mark.parametrize("room", ["core", "trainer", "teachers", "run"])
def test_core_trainer_teachers_and_run_never_import_the_benchmarks(room):
    graph = _graph()
    bench = ROOMS[[name for name, _ in ROOMS].index("benchmarks")][1]
    offenders = [(m, d) for m, deps in graph.items() if ROOMS[_room(m)][0] == room for d in deps if d.startswith(bench)]
    assert offenders == []


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is not vacuous: a core module importing the run layer is reported."""
    fake = {"sidflow.core.flow": {"sidflow.run.loop"}, "sidflow.run.loop": set()}
    bad = [(m, d) for m, deps in fake.items() for d in deps if _room(d) > _room(m)]
    assert bad == [("sidflow.core.flow", "sidflow.run.loop")]
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
