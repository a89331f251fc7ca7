"""The conv families for one, two and three spatial dims: built, exported and loaded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.blueprints import Blueprint, SlotContract, SlotKind, build, families
from esper_async.errors import BlueprintError
from esper_async.kernels import export_kernel, load_kernel

CONV_FAMILIES = sorted(n for n, f in families().items() if f.slot_kind is SlotKind.CONV)
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _contract(shape: tuple[int, ...]) -> SlotContract:
    return SlotContract(SlotKind.CONV, shape)


def _supported(shape: tuple[int, ...]) -> bool:
    try:
        _contract(shape)
    except BlueprintError:
        return False
    return True


SHAPES = [
    pytest.param(
        shape,
        id=f"{len(shape) - 1}d",
        marks=pytest.mark.xfail(
            not _supported(shape), raises=BlueprintError, strict=True,
            reason="SlotContract (blueprints/_contract.py) accepts only (C, H, W) conv shapes",
        ),
    )
    for shape in [(4, 9), (4, 6, 6), (4, 3, 4, 5)]
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", CONV_FAMILIES)
def test_conv_families_export_and_load_for_every_spatial_rank(
    family: str, shape: tuple[int, ...]
) -> None:
    contract = _contract(shape)
    blueprint = Blueprint(family)
    eager = build(blueprint, contract, seed=0)
    convs = [m for m in eager.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert all(type(m) is _CONVS[len(shape) - 1] for m in convs)
    kernel = export_kernel(blueprint, contract, seed=0)
    assert kernel.contract == contract
    loaded = load_kernel(kernel)
    x = torch.randn(3, *shape)  # another batch size than the export's example
    assert torch.equal(loaded(x), torch.zeros_like(x))  # a fresh seed is the zero function
    with torch.no_grad():
        for p_eager, p_loaded in zip(eager.parameters(), loaded.parameters(), strict=True):
            p_eager.normal_()
            p_loaded.copy_(p_eager)
    out = loaded(x)
    assert out.shape == x.shape and out.abs().sum() > 0
    torch.testing.assert_close(out, eager(x))
