from __future__ import annotations

import esper_async.surgery as surgery
from esper_async.surgery import (
    _context,
    _fx,
    _modules,
    _operations,
    _policy,
    _transaction,
    _validation,
    _widen,
)


def test_public_names_are_exported_and_documented() -> None:
    assert isinstance(surgery.__all__, tuple) and len(set(surgery.__all__)) == len(surgery.__all__)
    for name in surgery.__all__:
        assert getattr(surgery, name).__doc__, name


def test_every_private_modules_all_matches_what_it_defines() -> None:
    for module in (
        _context,
        _fx,
        _modules,
        _operations,
        _policy,
        _transaction,
        _validation,
        _widen,
    ):
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
        }
        assert set(module.__all__) == public, module.__name__
