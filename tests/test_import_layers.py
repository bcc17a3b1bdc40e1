"""The layers hold: bench -> backend -> segmodels, never back. Read from the source (every import statement,
at module level or inside a function), so a lazy import cannot hide a dependency."""

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
