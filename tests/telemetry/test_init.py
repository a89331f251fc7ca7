from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import esper_async.telemetry as telemetry

MODULES = ("_attributes", "_exporters", "_loggers", "_logging", "_metrics", "_tracing")


def _top_level_public_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("module_name", MODULES)
def test_module_all_is_exactly_its_public_definitions(module_name: str) -> None:
    module = importlib.import_module(f"esper_async.telemetry.{module_name}")
    assert isinstance(module.__all__, tuple)
    assert set(module.__all__) == _top_level_public_names(Path(module.__file__))


def test_package_reexports_every_module_all() -> None:
    expected = {
        name
        for m in MODULES
        for name in importlib.import_module(f"esper_async.telemetry.{m}").__all__
    }
    assert isinstance(telemetry.__all__, tuple)
    assert len(telemetry.__all__) == len(set(telemetry.__all__))
    assert set(telemetry.__all__) == expected
    for name in telemetry.__all__:
        assert hasattr(telemetry, name)
