from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import ModelSurgeon, Widen
from esper_async.surgery._widen import find_consumers

from ._helpers import TinyNet, assert_same, evaluate, fingerprint, images, tiny_mlp, train, vectors


def _rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """For each row of ``new``, the index of the equal row of ``old`` (the unit map g)."""
    return [int(torch.nonzero((old == row).all(dim=tuple(range(1, old.dim()))))[0]) for row in new]


@pytest.mark.asyncio
async def test_widening_a_linear_preserves_and_carries_adam_moments() -> None:
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = vectors()
    train(model, opt, data, 3)
    producer, consumer = model[2], model[4]
    p_state = {k: v.clone() for k, v in opt.state[producer.weight].items()}
    pb_state = {k: v.clone() for k, v in opt.state[producer.bias].items()}
    c_state = {k: v.clone() for k, v in opt.state[consumer.weight].items()}
    old_w, old_v = producer.weight.detach().clone(), consumer.weight.detach().clone()
    expected = evaluate(model, data[0])

    await ModelSurgeon().apply(model, opt, Widen("2", 24, seed=7), probe=data[0][:4])

    assert model[2].out_features == 24 and model[4].in_features == 24
    assert torch.allclose(evaluate(model, data[0]), expected, rtol=1e-5, atol=1e-6)
    mapping = _rows(model[2].weight.detach(), old_w)
    assert mapping[:16] == list(range(16))
    fractions = model[4].weight.detach()[0] / old_v[0, mapping]
    for unit in range(16):
        share = fractions[[j for j, u in enumerate(mapping) if u == unit]].sum()
        assert torch.isclose(share, torch.tensor(1.0), atol=1e-5)
    new_p, new_pb, new_c = (
        opt.state[model[2].weight],
        opt.state[model[2].bias],
        opt.state[model[4].weight],
    )
    assert torch.equal(new_p["step"], p_state["step"])
    f = fractions.view(-1, 1)
    assert torch.allclose(new_p["exp_avg"], p_state["exp_avg"][mapping] * f)
    assert torch.allclose(new_p["exp_avg_sq"], p_state["exp_avg_sq"][mapping] * f**2)
    assert torch.allclose(new_pb["exp_avg"], pb_state["exp_avg"][mapping] * fractions)
    assert torch.equal(new_c["exp_avg"], c_state["exp_avg"][:, mapping])
    assert torch.equal(new_c["exp_avg_sq"], c_state["exp_avg_sq"][:, mapping])
    assert producer.weight not in opt.state and consumer.weight not in opt.state


@pytest.mark.asyncio
async def test_widening_a_conv_widens_its_batch_norm_and_consumer() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = images(16)
    train(model, opt, data, 3)
    expected = evaluate(model, data[0])
    old_bn = model.layer1[0].bn1
    await ModelSurgeon().apply(model, opt, Widen("layer1.0.conv1", 10), probe=data[0][:4])
    block = model.layer1[0]
    assert (block.conv1.out_channels, block.bn1.num_features, block.conv2.in_channels) == (
        10,
        10,
        10,
    )
    assert torch.equal(block.bn1.running_mean[:6], old_bn.running_mean)
    assert torch.equal(block.bn1.num_batches_tracked, old_bn.num_batches_tracked)
    assert torch.allclose(evaluate(model, data[0]), expected, rtol=1e-4, atol=1e-5)
    assert opt.state[block.conv1.weight]["momentum_buffer"].shape == block.conv1.weight.shape


@pytest.mark.asyncio
async def test_replicas_diverge_and_the_loss_keeps_falling() -> None:
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = vectors(64)
    train(model, opt, data, 10)
    await ModelSurgeon().apply(model, opt, Widen("0", 24), probe=data[0][:4])
    widened = model[0].weight
    start = widened.detach().clone()
    losses = train(model, opt, data, 15)
    assert losses[-1] < losses[0]
    assert not torch.equal(start, widened.detach())
    mapping = _rows(start, start[:16])
    twin = next(j for j in range(16, 24) if mapping[j] != j)
    assert not torch.allclose(widened[twin], widened[mapping[twin]]), "replicas must break symmetry"


@pytest.mark.asyncio
async def test_explicit_consumers_skip_tracing() -> None:
    model = tiny_mlp()
    x = vectors()[0]
    expected = evaluate(model, x)
    await ModelSurgeon().apply(model, None, Widen("0", 20, consumers=("2",)), probe=x[:4])
    assert model[2].in_features == 20
    assert torch.allclose(evaluate(model, x), expected, rtol=1e-5, atol=1e-6)


def test_consumers_are_found_through_norms_and_activations() -> None:
    model = TinyNet()
    assert find_consumers(model, "layer1.1.conv1", 8, operation="t") == (
        ["layer1.1.bn1"],
        ["layer1.1.conv2"],
    )
    assert find_consumers(model, "head.0", 12, operation="t") == ([], ["head.2"])


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            h = h * 2
        return self.b(h)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "operation", "message"),
    [
        pytest.param(
            TinyNet(),
            Widen("layer1.0.conv2", 9),
            "cannot simply take a wider input",
            id="feeds-an-addition",
        ),
        pytest.param(
            TinyNet(), Widen("head.2", 9), "cannot simply take a wider input", id="feeds-the-output"
        ),
        pytest.param(TinyNet(), Widen("head.0", 12), "must exceed the current 12", id="not-wider"),
        pytest.param(
            TinyNet(), Widen("layer1.0.bn1", 9), "only nn.Linear and nn.Conv2d", id="a-norm"
        ),
        pytest.param(
            TinyNet(),
            Widen("head.0", 16, consumers=("layer1.0.conv1",)),
            "does not read 12",
            id="wrong-consumer",
        ),
        pytest.param(TinyNet(), Widen("head.x", 16), "no module named 'head.x'", id="unknown"),
        pytest.param(_Untraceable(), Widen("a", 8), "cannot trace", id="untraceable-parent"),
        pytest.param(
            nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1)),
            Widen("0", 8),
            "groups=1",
            id="depthwise",
        ),
    ],
)
async def test_bad_widenings_are_refused_and_change_nothing(
    model: nn.Module, operation: Widen, message: str
) -> None:
    opt = torch.optim.Adam(model.parameters())
    probe = images(4)[0] if not isinstance(model, _Untraceable) else torch.randn(4, 4)
    if isinstance(model, nn.Sequential):
        probe = torch.randn(2, 4, 6, 6)
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match=message):
        await ModelSurgeon().apply(model, opt, operation, probe=probe)
    assert_same(before, fingerprint(model, opt))
