"""Blueprints and slot contracts are a trust boundary: whatever arrives, the result is a valid
object or a short BlueprintError, never another exception, and never a message that embeds a huge
input."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_async.blueprints import Blueprint, SlotContract, SlotKind, build, library
from esper_async.errors import BlueprintError

MAX_MESSAGE = 500
FAMILIES = sorted({bp.family for bp in library()})
OPTION_NAMES = ["rank", "hidden_mult", "kernel_size", "expansion", "reduction"]
DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16", "int64", "complex64", "bool"]


class _DeepList(list):
    """A deeply nested list that hypothesis prints in a few characters (not depth-first)."""

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(f"<nested list of depth {self.depth}>")


class _DeepDict(dict):
    """A deeply nested dict that hypothesis prints in a few characters."""

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(f"<nested dict of depth {self.depth}>")


def _nest(depth: int, leaf: Any, as_dict: bool) -> Any:
    for _ in range(depth - 1):
        leaf = {"k": leaf} if as_dict else [leaf]
    outer = _DeepDict(k=leaf) if as_dict else _DeepList([leaf])
    outer.depth = depth
    return outer


def _text(value: Any) -> str:
    """JSON text of ``value`` where Python can write it (not ints beyond 4300 digits, nor lists
    nested deeper than its recursion limit: deep text is thrown at from_json by its own test)."""
    try:
        return json.dumps(value)
    except (ValueError, RecursionError):
        return "not JSON"


huge_ints = st.builds(lambda e, sign: sign * 10**e, st.integers(18, 6000), st.sampled_from([1, -1]))
long_strings = st.builds(
    lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(100, 200_000)
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    long_strings,
)
keys = st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=8), long_strings)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)
deep = st.builds(_nest, st.integers(2, 5000), scalars, st.booleans())
anything = st.one_of(junk, deep)
options = st.one_of(
    st.dictionaries(keys, anything, max_size=4),
    st.dictionaries(st.sampled_from(OPTION_NAMES), st.one_of(st.integers(-3, 9000), anything)),
    anything,
)
families = st.one_of(st.sampled_from(FAMILIES), anything)
kinds = st.one_of(
    st.sampled_from(["conv", "linear", "token", SlotKind.CONV, SlotKind.LINEAR, SlotKind.TOKEN]),
    anything,
)
shapes = st.one_of(
    st.lists(st.integers(-2, 40), min_size=0, max_size=4),
    st.tuples(st.integers(1, 8)),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
    st.lists(anything, max_size=4),
    anything,
)
dtypes = st.one_of(st.sampled_from(DTYPE_NAMES), anything)


def _accepted_or_short_error(make: Callable[[], Any]) -> Any:
    """``make()``, or ``None`` if it raised a BlueprintError; any other exception fails."""
    try:
        return make()
    except BlueprintError as err:
        assert len(str(err)) <= MAX_MESSAGE, f"message of {len(str(err))} chars: {str(err)[:200]}"
        return None


JUNK_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@JUNK_SETTINGS
@given(family=families, opts=options)
def test_blueprint_from_junk_is_valid_or_a_short_error(family: Any, opts: Any) -> None:
    bp = _accepted_or_short_error(lambda: Blueprint(family, opts))
    if bp is not None:  # what is accepted is canonical: its JSON reads back as the same blueprint
        assert Blueprint.from_json(bp.to_json()) == bp and bp.family in FAMILIES


@JUNK_SETTINGS
@given(
    data=st.one_of(
        anything,
        st.fixed_dictionaries(
            {"family": families}, optional={"options": options, "ir_version": anything}
        ),
    ),
    as_text=st.booleans(),
)
def test_blueprint_from_json_junk_is_valid_or_a_short_error(data: Any, as_text: bool) -> None:
    source = _text(data) if as_text else data
    bp = _accepted_or_short_error(lambda: Blueprint.from_json(source))
    if bp is not None:
        assert Blueprint.from_json(bp.to_json()) == bp


@JUNK_SETTINGS
@given(text=st.one_of(st.text(), st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 70_000))))
def test_blueprint_from_json_text_junk_is_valid_or_a_short_error(text: str) -> None:
    _accepted_or_short_error(lambda: Blueprint.from_json('{"family":"mlp","options":{"x":' + text))
    _accepted_or_short_error(lambda: Blueprint.from_json(text))


@JUNK_SETTINGS
@given(kind=kinds, shape=shapes, dtype=dtypes)
def test_contract_from_junk_is_valid_or_a_short_error(kind: Any, shape: Any, dtype: Any) -> None:
    contract = _accepted_or_short_error(lambda: SlotContract(kind, shape, dtype))
    if contract is not None:
        assert SlotContract.from_json(contract.to_json()) == contract
        assert all(type(s) is int and s >= 1 for s in contract.shape)


@JUNK_SETTINGS
@given(
    data=st.one_of(
        anything,
        st.fixed_dictionaries({"kind": kinds, "shape": shapes}, optional={"dtype": dtypes}),
    )
)
def test_contract_from_json_junk_is_valid_or_a_short_error(data: Any) -> None:
    contract = _accepted_or_short_error(lambda: SlotContract.from_json(data))
    if contract is not None:
        assert SlotContract.from_json(contract.to_json()) == contract


# build() gets junk, or valid blueprints and small valid contracts (a big valid contract is a
# legitimate, expensive build, not malformed input).
small_contracts = st.one_of(
    st.builds(lambda f: SlotContract("linear", (f,)), st.integers(1, 8)),
    st.builds(lambda f: SlotContract("token", (f,)), st.integers(1, 8)),
    st.builds(lambda c, h: SlotContract("conv", (c, h, h)), st.integers(1, 8), st.integers(1, 5)),
)
blueprints = st.builds(
    lambda family, opts: _accepted_or_short_error(lambda: Blueprint(family, opts)) or library()[0],
    st.sampled_from(FAMILIES),
    st.dictionaries(st.sampled_from(OPTION_NAMES), st.integers(-1, 9)),
)


@JUNK_SETTINGS
@given(
    bp=st.one_of(blueprints, st.sampled_from(library()), anything),
    contract=st.one_of(small_contracts, anything),
    seed=st.one_of(st.none(), st.integers(0, 2**32), anything),
)
def test_build_from_junk_is_a_module_or_a_short_error(bp: Any, contract: Any, seed: Any) -> None:
    module = _accepted_or_short_error(lambda: build(bp, contract, seed=seed))
    if module is not None:
        h = torch.randn(contract.batch_shape(2, tokens=3))
        assert module(h).shape == h.shape


# --- each defect measured before the fix ---------------------------------------------------------


def _deep_list(depth: int) -> Any:
    return _nest(depth, 1, as_dict=False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda: Blueprint("mlp", {"hidden_mult": _deep_list(100_000)}),
            "nested list", id="deeply-nested-option",
        ),
        pytest.param(
            lambda: Blueprint.from_json(
                '{"family":"mlp","options":{"x":' + "[" * 60_000 + "]" * 60_000 + "}}"
            ),
            "does not parse", id="deeply-nested-json",
        ),
        pytest.param(
            lambda: Blueprint.from_json('{"family":"mlp","options":{"x":' + "[" * 200_000 + "]}}"),
            "at most", id="enormous-json-text",
        ),
        pytest.param(
            lambda: Blueprint("mlp", {"hidden_mult": "x" * 10**6}), "at most 128",
            id="enormous-string-option",
        ),
        pytest.param(
            lambda: Blueprint("mlp", {"hidden_mult": list(range(10**6))}), "at most 16",
            id="enormous-list-option",
        ),
        pytest.param(
            lambda: Blueprint("mlp", {"k" * 10**6: 1}), "option name", id="enormous-option-name"
        ),
        pytest.param(
            lambda: Blueprint("mlp", {f"o{i}": 1 for i in range(1000)}), "at most 32",
            id="too-many-options",
        ),
        pytest.param(
            lambda: Blueprint("x" * 10**6), "at most 64 characters", id="enormous-family-name"
        ),
        pytest.param(
            lambda: Blueprint("mlp", {"hidden_mult": 10**5000}), "within", id="huge-int-option"
        ),
        pytest.param(
            lambda: Blueprint.from_json('{"family":"mlp","options":{"hidden_mult":1' + "0" * 5000
                                        + "}}"),
            "does not parse", id="huge-int-in-json",
        ),
        pytest.param(
            lambda: Blueprint("mlp", [("hidden_mult", 2)]), "must be a mapping",
            id="options-not-a-mapping",
        ),
        pytest.param(
            lambda: Blueprint.from_json({"family": "mlp", "ir_version": True}), "IR version",
            id="bool-ir-version",
        ),
        pytest.param(
            lambda: Blueprint.from_json({"family": "mlp", "ir_version": 1.0}), "IR version",
            id="float-ir-version",
        ),
        pytest.param(lambda: Blueprint.from_json([1, 2]), "text or a mapping", id="json-a-list"),
        pytest.param(lambda: Blueprint.from_json(None), "text or a mapping", id="json-none"),
        pytest.param(
            lambda: Blueprint.from_json({"family": "mlp", "extra": 1}), "nothing else",
            id="json-unknown-key",
        ),
        pytest.param(
            lambda: SlotContract("linear", (2.5,)), "tuple of ints", id="non-integral-size"
        ),
        pytest.param(lambda: SlotContract("linear", (True,)), "tuple of ints", id="bool-size"),
        pytest.param(lambda: SlotContract("linear", ("3",)), "tuple of ints", id="string-size"),
        pytest.param(lambda: SlotContract("linear", (10**30,)), "tuple of ints", id="huge-size"),
        pytest.param(lambda: SlotContract("linear", None), "tuple of ints", id="shape-none"),
        pytest.param(lambda: SlotContract("linear", "abc"), "tuple of ints", id="shape-a-string"),
        pytest.param(
            lambda: SlotContract("linear", list(range(10**6))), "tuple of ints",
            id="enormous-shape",
        ),
        pytest.param(lambda: SlotContract("linear", (3,), "complex999"), "dtype", id="bad-dtype"),
        pytest.param(lambda: SlotContract("linear", (3,), "int64"), "dtype", id="int-dtype"),
        pytest.param(lambda: SlotContract("linear", (3,), 5), "dtype", id="dtype-not-a-string"),
        pytest.param(lambda: SlotContract("nope", (3,)), "slot kind", id="unknown-kind"),
        pytest.param(lambda: SlotContract.from_json({}), "needs 'kind'", id="contract-json-empty"),
        pytest.param(lambda: SlotContract.from_json([]), "an object", id="contract-json-list"),
        pytest.param(
            lambda: SlotContract.from_json({"kind": "linear", "shape": [3], "x": 1}),
            "nothing else", id="contract-json-unknown-key",
        ),
        pytest.param(
            lambda: build({"family": "mlp"}, SlotContract("linear", (3,))), "needs a Blueprint",
            id="build-not-a-blueprint",
        ),
        pytest.param(
            lambda: build(Blueprint("mlp"), {"kind": "linear"}), "needs a SlotContract",
            id="build-not-a-contract",
        ),
        pytest.param(
            lambda: build(Blueprint("mlp"), SlotContract("linear", (3,)), seed=2**70),
            "int seed", id="build-huge-seed",
        ),
        pytest.param(
            lambda: build(Blueprint("mlp"), SlotContract("linear", (3,)), seed=True),
            "int seed", id="build-bool-seed",
        ),
    ],
)
def test_each_measured_defect_is_a_short_blueprint_error(
    make: Callable[[], Any], message: str
) -> None:
    with pytest.raises(BlueprintError, match=message) as info:
        make()
    assert len(str(info.value)) <= MAX_MESSAGE


def test_an_accepted_contract_keeps_plain_ints_and_its_dtype() -> None:
    contract = SlotContract("conv", torch.Size([4, 3, 3]), "bfloat16")
    assert contract.kind is SlotKind.CONV and contract.shape == (4, 3, 3)
    assert build(Blueprint("conv_norm"), contract).norm.weight.dtype == torch.bfloat16
