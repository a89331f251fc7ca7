"""Every public error pickles as itself, with its attributes (it crosses process pools)."""

from __future__ import annotations

import inspect
import pickle

import pytest

import esper_async.errors as errors

ERRORS = [cls for cls in vars(errors).values()
          if inspect.isclass(cls) and issubclass(cls, errors.EsperError)]


def _make(cls: type[errors.EsperError]) -> errors.EsperError:
    """An instance with every keyword argument given a distinct value."""
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, object] = {name: f"{name}-value" for name, p in params.items()
                                 if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if "reasons" in kwargs:
        kwargs["reasons"] = {"conv1:lora": "over budget"}
    return cls("what went wrong", **kwargs)


def test_every_error_class_is_covered() -> None:
    assert len(ERRORS) >= 20
    assert errors.DemoConfigError in ERRORS and errors.SeedRuntimeError in ERRORS


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_an_error_survives_pickling_with_its_attributes(cls: type[errors.EsperError]) -> None:
    error = _make(cls)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error) and copy.args == error.args
    assert vars(copy) == vars(error)
    for name, value in vars(error).items():
        assert getattr(copy, name) == value
