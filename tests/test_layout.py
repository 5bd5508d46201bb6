"""The import graph follows the floors: lut < profiler < adapter, and no two modules import each other.

Every module of the three packages is parsed with `ast`, function-local imports included (a
lazy import is still a dependency), so a new arrow against the floors or a new circle fails
here, before anyone has to read the tree to find it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"lut": 0, "profiler": 1, "adapter": 2}  # an import may only point to the same floor or a lower one


def _modules() -> dict[str, Path]:
    modules = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = _modules()


def _target(name: str) -> str | None:
    """The phonefit module `name` loads: itself, or the nearest package above it (for `from a.b import C`)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The phonefit modules `module` imports anywhere in its file (top level, functions, classes)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` above this module's
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _target(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_package_is_parsed():
    assert {"lut.spec", "profiler.build_lut", "adapter.search.netadapt"} <= set(MODULES)
    assert "lut.spec" in GRAPH["lut.table"]  # a top-level import
    assert "lut.keras_specs" in GRAPH["lut.latency"]  # a function-local one


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_only_down_the_floors(module):
    floor = FLOORS[module.split(".")[0]]
    upward = sorted(t for t in GRAPH[module] if FLOORS[t.split(".")[0]] > floor)
    assert not upward, f"{module} (floor {module.split('.')[0]}) imports a higher floor: {', '.join(upward)}"


def _cycles() -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(GRAPH[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return components


def test_no_two_modules_import_each_other():
    cycles = _cycles()
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_circle(monkeypatch):
    monkeypatch.setitem(GRAPH, "lut.spec", GRAPH["lut.spec"] | {"lut.table"})  # lut.table imports lut.spec
    assert ["lut.spec", "lut.table"] in _cycles()
