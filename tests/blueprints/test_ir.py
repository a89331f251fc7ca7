from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esper_async.blueprints import Blueprint, SlotContract, SlotKind, library
from esper_async.errors import BlueprintError


def test_equal_blueprints_share_id_and_hash() -> None:
    a = Blueprint("low_rank", {"rank": 8})
    b = Blueprint.from_json(a.to_json())
    assert a == b and hash(a) == hash(b) and a.id == b.id
    assert a.id != Blueprint("low_rank", {"rank": 4}).id


def test_defaults_are_resolved_into_the_canonical_form() -> None:
    assert Blueprint("mlp") == Blueprint("mlp", {"hidden_mult": 2})
    assert json.loads(Blueprint("mlp").to_json())["options"] == {"hidden_mult": 2}


def test_id_is_stable_across_releases() -> None:
    # The id is the hash of canonical JSON; pin one so an accidental format change shows up.
    assert Blueprint("low_rank", {"rank": 4}).to_json() == (
        '{"family":"low_rank","ir_version":1,"options":{"rank":4}}'
    )


def test_blueprint_is_frozen() -> None:
    bp = Blueprint("mlp")
    with pytest.raises(AttributeError):
        bp.family = "low_rank"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        pytest.param("nope", {}, "unknown blueprint family 'nope'", id="unknown-family"),
        pytest.param("low_rank", {"rnk": 2}, "unknown option", id="unknown-option"),
        pytest.param("low_rank", {"rank": 0}, "must lie in", id="out-of-range"),
        pytest.param("low_rank", {"rank": "4"}, "must be int", id="wrong-type"),
        pytest.param("low_rank", {"rank": True}, "must be int", id="bool-is-not-int"),
        pytest.param("residual_conv", {"kernel_size": 4}, "must be one of", id="bad-choice"),
        pytest.param("mlp", {"hidden_mult": {"a": 1}}, "blueprint parameters must be", id="dict"),
        pytest.param("", {}, "non-empty string", id="empty-family"),
    ],
)
def test_malformed_blueprint_raises_clear_error(family: str, options: dict, message: str) -> None:
    with pytest.raises(BlueprintError, match=message):
        Blueprint(family, options)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param('{"options": {}}', id="no-family"),
        pytest.param('{"family": "mlp", "ir_version": 99}', id="future-version"),
        pytest.param('{"family": "mlp", "options": [1]}', id="options-not-object"),
    ],
)
def test_malformed_json_raises_clear_error(text: str) -> None:
    with pytest.raises(BlueprintError):
        Blueprint.from_json(text)


def test_contract_mismatch_is_a_blueprint_error() -> None:
    linear = SlotContract(SlotKind.LINEAR, (16,))
    with pytest.raises(BlueprintError, match="fits conv slots"):
        Blueprint("residual_conv").check_fits(linear)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [pytest.param("conv", (8,), id="conv-rank-1"), pytest.param("linear", (0,), id="zero-size")],
)
def test_bad_contract_is_rejected(kind: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(BlueprintError, match="per-sample shape"):
        SlotContract(SlotKind(kind), shape)


def test_library_has_enough_designs_per_kind() -> None:
    assert len(library(SlotKind.CONV)) >= 6
    assert len(library(SlotKind.LINEAR)) >= 4
    assert len({bp.id for bp in library()}) == len(library())


@given(rank=st.integers(1, 4096))
def test_json_round_trip(rank: int) -> None:
    bp = Blueprint("low_rank", {"rank": rank})
    assert Blueprint.from_json(bp.to_json()) == bp
