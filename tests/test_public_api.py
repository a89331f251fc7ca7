from __future__ import annotations

import importlib
import pkgutil

import esper_async


def test_all_names_exist_and_are_unique() -> None:
    assert len(set(esper_async.__all__)) == len(esper_async.__all__)
    for name in esper_async.__all__:
        assert hasattr(esper_async, name), name


def test_every_public_module_all_matches_its_definitions() -> None:
    for info in pkgutil.walk_packages(esper_async.__path__, "esper_async."):
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            continue
        assert isinstance(exported, tuple), f"{info.name}.__all__ should be a tuple"
        for name in exported:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name!r}"


def test_public_callables_are_documented() -> None:
    for name in esper_async.__all__:
        obj = getattr(esper_async, name)
        if callable(obj):
            assert obj.__doc__, f"esper_async.{name} has no docstring"
