from __future__ import annotations

import enum
import math
from pathlib import Path, PurePosixPath

import pytest
import torch

from esper_async.telemetry import (
    ATTR_ARM_NAMES,
    ATTR_ARM_VALUES,
    ATTR_CHOSEN,
    _attributes,
    attribute_key,
    gate_attributes,
    normalize_attributes,
    selection_attributes,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


class Stage(enum.Enum):
    TRAINING = 3


@pytest.mark.parametrize(
    ("short", "full"),
    [
        pytest.param("slot", "esper.slot", id="plain"),
        pytest.param("lifecycle__from", "esper.lifecycle.from", id="dotted"),
        pytest.param("esper.kernel_id", "esper.kernel_id", id="already-full"),
    ],
)
def test_attribute_key(short: str, full: str) -> None:
    assert attribute_key(short) == full


def test_normalize_coerces_values_and_drops_none() -> None:
    attrs = normalize_attributes(
        {"esper.checkpoint.path": PurePosixPath("/runs/a/ckpt.pt")},
        slot="l1",
        seed__state=Stage.TRAINING,
        loss=torch.tensor(0.25),
        blueprint=None,
        shape=(8, 16),
        mixed=[1, "a"],
    )
    assert attrs == {
        "esper.checkpoint.path": "/runs/a/ckpt.pt",
        "esper.slot": "l1",
        "esper.seed.state": "TRAINING",
        "esper.loss": 0.25,
        "esper.shape": [8, 16],
        "esper.mixed": ["1", "a"],
    }


def test_selection_attributes_keep_arms_and_values_parallel() -> None:
    attrs = selection_attributes(
        strategy="ucb1", chosen="l2/mlp", arms={"l2/mlp": 0.9, "l1/conv": 0.4}
    )
    assert attrs[ATTR_CHOSEN] == "l2/mlp"
    assert list(zip(attrs[ATTR_ARM_NAMES], attrs[ATTR_ARM_VALUES], strict=True)) == [
        ("l1/conv", 0.4),
        ("l2/mlp", 0.9),
    ]


@pytest.mark.parametrize(
    ("chosen", "arms", "match"),
    [
        pytest.param("l3/x", {"l1/conv": 0.1}, "not among", id="unknown-choice"),
        pytest.param("l1/conv", {"l1/conv": math.nan}, "NaN", id="nan-value"),
    ],
)
def test_selection_attributes_reject_bad_decisions(
    chosen: str, arms: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        selection_attributes(strategy="ucb1", chosen=chosen, arms=arms)


def test_gate_attributes_are_prefixed_floats() -> None:
    assert gate_attributes({"alpha": 1, "val_loss_delta": -0.02}) == {
        "esper.gate.alpha": 1.0,
        "esper.gate.val_loss_delta": -0.02,
    }


def _scheme_constants() -> dict[str, str]:
    return {
        name: value
        for name, value in vars(_attributes).items()
        if name.startswith(("ATTR_", "SPAN_", "METRIC_")) and isinstance(value, str)
    }


@pytest.mark.parametrize("name", sorted(_scheme_constants()))
def test_every_name_of_the_scheme_is_documented(name: str) -> None:
    value = _scheme_constants()[name]
    assert f"`{value}" in DOC.read_text(encoding="utf-8"), f"{name} = {value!r} missing from {DOC}"


def test_scheme_names_are_namespaced() -> None:
    assert all(v.startswith("esper.") for v in _scheme_constants().values())
