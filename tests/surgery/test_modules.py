from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import (
    GatedResidual,
    GatedShortcut,
    SkipAround,
    identity_conv2d,
    identity_linear,
)
from esper_async.surgery._modules import shortcut_for


def test_identity_layers_are_identities() -> None:
    x = torch.randn(3, 5)
    assert torch.equal(identity_linear(5)(x), x)
    image = torch.randn(2, 4, 6, 6)
    assert torch.allclose(identity_conv2d(4, 5)(image), image)
    with pytest.raises(SurgeryError, match="odd kernel"):
        identity_conv2d(4, 2)


def test_gated_modules_start_as_no_ops() -> None:
    x = torch.randn(3, 4)
    body = nn.Linear(4, 4)
    assert torch.equal(GatedResidual(nn.Linear(4, 4))(x), x)
    assert torch.equal(SkipAround(body, nn.Identity())(x), body(x))
    assert torch.equal(GatedShortcut(nn.Linear(4, 2))(x), torch.zeros(3, 2))
    like = torch.zeros(1, dtype=torch.float64)
    assert GatedResidual(nn.Identity(), like=like).gate.dtype == torch.float64


@pytest.mark.parametrize(
    ("source", "target", "kind", "stride"),
    [
        pytest.param((2, 4), (2, 4), nn.Identity, None, id="same"),
        pytest.param((2, 4), (2, 7), nn.Linear, None, id="linear"),
        pytest.param((2, 4, 8, 8), (2, 6, 4, 4), nn.Conv2d, 2, id="strided-conv"),
    ],
)
def test_shortcut_for_shapes(
    source: tuple[int, ...], target: tuple[int, ...], kind: type[nn.Module], stride: int | None
) -> None:
    module = shortcut_for(torch.Size(source), torch.Size(target), operation="t")
    assert isinstance(module, kind)
    if stride is not None:
        assert module.stride == (stride, stride)
        assert module(torch.randn(source)).shape == target


@pytest.mark.parametrize(
    ("source", "target"),
    [
        pytest.param((2, 4, 8, 8), (2, 4, 3, 3), id="uneven-spatial"),
        pytest.param((2, 4, 8, 8), (2, 4, 4, 2), id="anisotropic"),
        pytest.param((2, 4), (2, 4, 1, 1), id="rank-change"),
        pytest.param((2, 4), (3, 4), id="batch-change"),
    ],
)
def test_shortcut_for_rejects_what_it_cannot_bridge(
    source: tuple[int, ...], target: tuple[int, ...]
) -> None:
    with pytest.raises(SurgeryError, match="incompatible shapes"):
        shortcut_for(torch.Size(source), torch.Size(target), operation="t")
