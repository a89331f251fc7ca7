"""CNN width growth across a residual stage (WidenChannels)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import (
    GrowthCouplingError,
    ModelSurgeon,
    WidenChannels,
    operation_record,
    replay_operations,
)

from ._helpers import TinyNet, assert_same, evaluate, fingerprint, images, train


def _trained() -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, images(), 3)
    return model, opt


@pytest.mark.asyncio
async def test_widening_a_stage_follows_the_residual_coupling_and_preserves() -> None:
    model, opt = _trained()
    x = images(seed=3)[0]
    before = evaluate(model, x)
    op = WidenChannels("layer1.0.conv2", 10, seed=1)
    await ModelSurgeon().apply(model, opt, op, probe=images()[0][:4])
    assert op.found is not None
    # the identity shortcut couples block 0's conv2 with the stem; block 1 reads the sum
    assert sorted(op.found["producers"]) == ["layer1.0.conv2", "stem.0"]
    assert sorted(op.found["norms"]) == ["layer1.0.bn2", "stem.1"]
    assert sorted(op.found["consumers"]) == ["layer1.0.conv1", "layer1.1.conv1", "layer1.1.short"]
    assert model.stem[0].out_channels == 10 and model.layer1[1].short.in_channels == 10
    assert torch.allclose(evaluate(model, x), before, rtol=1e-5, atol=1e-6)
    step = opt.state[model.stem[0].weight]["step"]
    assert float(step) == 3.0
    assert torch.count_nonzero(opt.state[model.stem[0].weight]["exp_avg"][6:]) == 0


@pytest.mark.asyncio
async def test_widening_the_last_stage_reaches_the_classifier_and_learns() -> None:
    model, opt = _trained()
    known = {id(p): p.shape for p in model.parameters()}
    op = WidenChannels("layer1.1.conv2", 12, seed=2)
    await ModelSurgeon().apply(model, opt, op, probe=images()[0][:4])
    assert sorted(op.found["producers"]) == ["layer1.1.conv2", "layer1.1.short"]
    assert op.found["consumers"] == ["head.0"]
    train(model, opt, images(), 1)
    model.zero_grad()
    x, y = images(seed=1)
    F.cross_entropy(model(x), y).backward()
    grown = [p for p in model.parameters() if id(p) not in known]
    assert grown
    for p in grown:
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.asyncio
async def test_channel_rollback_is_bitwise_and_resume_replays() -> None:
    model, opt = _trained()
    before = fingerprint(model, opt)
    with pytest.raises(RuntimeError, match="abort"):
        async with ModelSurgeon().transaction(model, opt, probe=images()[0][:4]) as tx:
            await tx.stage(WidenChannels("layer1.0.conv2", 10))
            raise RuntimeError("abort")
    assert_same(before, fingerprint(model, opt))
    op = WidenChannels("layer1.0.conv2", 10, seed=4)
    await ModelSurgeon().apply(model, opt, op, probe=images()[0][:4])
    train(model, opt, images(), 1)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    torch.manual_seed(5)
    fresh = TinyNet()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    replay_operations(fresh, fresh_opt, [operation_record(op)])
    fresh.load_state_dict(saved_model)
    fresh_opt.load_state_dict(saved_opt)
    assert train(model, opt, images(seed=2), 2) == train(fresh, fresh_opt, images(seed=2), 2)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


@pytest.mark.asyncio
async def test_a_concatenation_is_refused_and_nothing_changes() -> None:
    model = _Concat()
    opt = torch.optim.Adam(model.parameters())
    before = fingerprint(model, opt)
    with pytest.raises(GrowthCouplingError, match="cat") as info:
        await ModelSurgeon().apply(model, opt, WidenChannels("a", 6), probe=torch.randn(2, 3, 8, 8))
    assert info.value.reason
    assert_same(before, fingerprint(model, opt))
    with pytest.raises(SurgeryError, match="must exceed"):
        await ModelSurgeon().apply(model, opt, WidenChannels("a", 4), probe=torch.randn(2, 3, 8, 8))
