"""Surgery's fast paths give exactly what the plain torch calls they replace give."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import ModelSurgeon, Widen, _widen, identity_conv2d, identity_linear
from esper_async.surgery._context import eval_mode, module_list, parameter_list
from esper_async.surgery._widen import _grow, _grow_scaled
from esper_async.surgery._width_init import replication as _replication

from ._helpers import TinyNet, assert_same, fingerprint, images, train


@pytest.mark.parametrize(
    ("shape", "dim"),
    [
        pytest.param((6, 4, 3, 3), 0, id="conv-rows"),
        pytest.param((5, 6, 3, 3), 1, id="conv-columns"),
        pytest.param((6, 7), 0, id="linear-rows"),
        pytest.param((7, 6), 1, id="linear-columns"),
        pytest.param((6,), 0, id="vector"),
    ],
)
@pytest.mark.parametrize("scaled", [False, True], ids=["copy", "scaled"])
def test_grow_is_bitwise_a_gather_then_a_multiply(
    shape: tuple[int, ...], dim: int, scaled: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=generator)
    mapping, fractions = _replication(6, 10, 3, tensor.device)
    view = [1] * tensor.dim()
    view[dim] = -1
    factor = fractions.float().view(view) if scaled else None
    expected = tensor.index_select(dim, mapping)
    if factor is not None:
        expected = expected * factor
    got = _grow_scaled(tensor, dim, mapping, factor)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)
    if not scaled:
        assert torch.equal(_grow(tensor, dim, mapping), expected)


def test_grow_of_a_tensor_that_requires_grad_keeps_autograd() -> None:
    weight = torch.randn(4, 3, requires_grad=True)
    mapping, _ = _replication(4, 6, 0, weight.device)
    grown = _grow(weight, 0, mapping)
    assert grown.requires_grad
    grown.sum().backward()
    assert weight.grad is not None


class _Shared(nn.Module):
    """A module reached twice and a parameter held twice: each must be listed once."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Sequential(self.a, nn.ReLU())
        self.c = nn.Linear(2, 2)
        self.c.weight = self.a.weight


@pytest.mark.parametrize("make", [TinyNet, _Shared], ids=["tiny", "shared"])
def test_walks_match_torch(make: type[nn.Module]) -> None:
    model = make()
    assert module_list(model) == list(model.modules())
    assert [id(p) for p in parameter_list(model)] == [id(p) for p in model.parameters()]


def test_eval_mode_restores_each_flag() -> None:
    model = TinyNet()
    model.head.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not model.head.training and not model.head[0].training
    assert model.training and model.layer1.training


def test_identity_layers_have_plain_trainable_parameters() -> None:
    conv, linear = identity_conv2d(5, 3), identity_linear(5)
    expected = torch.zeros(5, 5, 3, 3)
    nn.init.dirac_(expected)
    assert torch.equal(conv.weight, expected) and torch.equal(linear.weight, torch.eye(5))
    for layer in (conv, linear):
        assert layer.bias is not None and not layer.bias.any()
        assert all(p.requires_grad and p.device.type == "cpu" for p in layer.parameters())
        assert all(p.dtype == torch.get_default_dtype() for p in layer.parameters())
    assert identity_conv2d(5, 3, bias=False).bias is None
    assert identity_linear(5, bias=False).bias is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("defect", "message"),
    [
        pytest.param("unscaled", "altered the output", id="consumer-not-rescaled"),
        pytest.param("detached", "no gradient reaches", id="producer-cut-from-autograd"),
    ],
)
async def test_a_defective_widening_is_caught_in_its_region_and_undone(
    monkeypatch: pytest.MonkeyPatch, defect: str, message: str
) -> None:
    """The region-local check sees a broken fast path: a consumer whose copied columns are not
    split (the output changes) or a producer whose new weight no gradient reaches."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, images(), 2)
    before = fingerprint(model, opt)
    good_consumer, good_producer = _widen._widened_consumer, _widen._widened_producer

    def unscaled(consumer: nn.Module, mapping: torch.Tensor, fractions: torch.Tensor) -> nn.Module:
        return good_consumer(consumer, mapping, torch.ones_like(fractions))

    def detached(producer: nn.Conv2d, mapping: torch.Tensor) -> nn.Module:
        new = good_producer(producer, mapping)
        assert isinstance(new, nn.Conv2d)
        new.forward = lambda x: new._conv_forward(x, new.weight.detach(), new.bias)  # type: ignore[method-assign]
        return new

    if defect == "unscaled":
        monkeypatch.setattr(_widen, "_widened_consumer", unscaled)
    else:
        monkeypatch.setattr(_widen, "_widened_producer", detached)
    with pytest.raises(SurgeryError, match=message):
        await ModelSurgeon().apply(model, opt, Widen("layer1.1.conv1", 12), probe=images(4)[0])
    assert_same(before, fingerprint(model, opt))
