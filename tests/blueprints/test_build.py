from __future__ import annotations

import pytest
import torch

from esper_async.blueprints import (
    Blueprint,
    Family,
    SlotContract,
    SlotKind,
    build,
    library,
    register_family,
)
from esper_async.errors import BlueprintError

CONTRACTS = {
    SlotKind.CONV: SlotContract(SlotKind.CONV, (8, 6, 6)),
    SlotKind.LINEAR: SlotContract(SlotKind.LINEAR, (12,)),
    SlotKind.TOKEN: SlotContract(SlotKind.TOKEN, (12,)),
}


@pytest.mark.parametrize("bp", [pytest.param(b, id=b.name) for b in library()])
def test_library_blueprints_build_shape_preserving_zero_start_modules(bp: Blueprint) -> None:
    contract = CONTRACTS[bp.slot_kind]
    module = build(bp, contract, seed=0)
    h = torch.randn(contract.batch_shape(3, tokens=4))
    out = module(h)
    assert out.shape == h.shape
    # A fresh seed is the zero function: it contributes nothing until it learns.
    assert torch.count_nonzero(out) == 0
    assert sum(p.numel() for p in module.parameters()) > 0


def test_build_is_deterministic_for_a_seed_and_leaves_global_rng_alone() -> None:
    bp, contract = Blueprint("mlp"), CONTRACTS[SlotKind.LINEAR]
    state = torch.get_rng_state()
    a, b = build(bp, contract, seed=3), build(bp, contract, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_a_family_whose_module_raises_gives_a_blueprint_error() -> None:
    def broken(contract: SlotContract) -> torch.nn.Module:
        raise RuntimeError("boom")

    try:
        register_family(Family("test_broken", SlotKind.LINEAR, {}, broken))
    except BlueprintError:
        pass  # registered by an earlier run of this test in the same process
    with pytest.raises(BlueprintError, match="failed: boom"):
        build(Blueprint("test_broken"), CONTRACTS[SlotKind.LINEAR])


def test_duplicate_family_is_rejected() -> None:
    with pytest.raises(BlueprintError, match="already registered"):
        register_family(Family("mlp", SlotKind.LINEAR, {}, lambda c: torch.nn.Identity()))
