"""The layers hold: bench -> backend -> segmodels, never back, and segmodels' own modules import one another
without a cycle. Read from the source (every import statement, at module level or inside a function), so a
lazy import cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import segmodels

REPO = Path(__file__).resolve().parents[1]
# Serving and labelling-tool packages the vision library must never need.
NOT_IN_SEGMODELS = ("backend", "bench", "flask", "gunicorn", "redis", "rq", "label_studio_sdk", "cvat_sdk")


def imported_modules(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` names (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("segmodels"), ids=lambda p: str(p.relative_to(REPO)))
def test_segmodels_imports_no_serving_or_tool_package(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in NOT_IN_SEGMODELS}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", python_files("backend", "tests"), ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_but_benchmarks_imports_bench(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("bench", "bench_http", "bench_pipeline")}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_segmodels_exports_its_public_api() -> None:
    assert set(segmodels.__all__) == {"Detection", "Mask", "MaskPredictor", "load_predictor"}
    assert all(hasattr(segmodels, name) for name in segmodels.__all__)


def module_name(path: Path, root: Path = REPO) -> str:
    """``segmodels/train.py`` -> ``segmodels.train``; a package's ``__init__.py`` -> the package's name."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, modules: set[str], root: Path = REPO) -> set[str]:
    """The modules among ``modules`` that ``path`` imports, at module level or inside a function: the named
    module, or the nearest enclosing one in ``modules`` (``from pkg import name``: ``pkg.name`` when that is a
    module, else ``pkg`` itself); relative imports resolved."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in targets:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph(package: str, root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, for every ``.py`` file under ``root/package``."""
    paths = sorted((root / package).rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): internal_imports(p, modules, root) for p in paths}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk (empty when the graph is acyclic), each as the path of
    module names from the first back to itself."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the walk's stack, then "done"
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_segmodels_has_no_import_cycle() -> None:
    cycles = import_cycles(import_graph("segmodels"))
    assert not cycles, "import cycles among segmodels modules: " + "; ".join(" -> ".join(c) for c in cycles)


def test_import_cycle_check_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.common import X\n\ndef run():\n    from pkg.b import run_b\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "common.py").write_text("X = 1\n")
    graph = import_graph("pkg", tmp_path)
    assert graph["pkg.a"] == {"pkg.common", "pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
