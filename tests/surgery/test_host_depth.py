"""Depth growth of a host: StackBlocks (G_stack) and InsertIdentityBlocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.apps.gpt import identity_block
from esper_async.errors import SurgeryError
from esper_async.surgery import (
    GrowthCouplingError,
    InsertIdentityBlocks,
    ModelSurgeon,
    StackBlocks,
    operation_record,
)

from ._helpers import assert_same, evaluate, fingerprint
from ._host_models import UserLM, lm_step, resumed, tiny_gpt, tokens
from ._host_models import trained as _trained


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["whole", "interleave"])
async def test_stack_copies_trained_blocks_and_their_adam_state(mode: str) -> None:
    model, opt = _trained(tiny_gpt)
    old = list(model.blocks)
    await ModelSurgeon().apply(model, opt, StackBlocks("blocks", 2, mode), probe=tokens()[0])
    order = [0, 1, 0, 1] if mode == "whole" else [0, 0, 1, 1]
    assert len(model.blocks) == 4
    for i, source in enumerate(order):
        block = model.blocks[i]
        assert (block is old[source]) == (i == order.index(source))
        for (name, p), q in zip(block.named_parameters(), old[source].parameters(), strict=True):
            assert torch.equal(p, q), name
            assert torch.equal(opt.state[p]["exp_avg"], opt.state[q]["exp_avg"])
            assert torch.equal(opt.state[p]["step"], opt.state[q]["step"])
            group = next(g for g in opt.param_groups if any(x is q for x in g["params"]))
            assert any(x is p for x in group["params"])  # the source's group (decay or not)
    # the copies train: every parameter gets a gradient
    lm_step(model, opt, tokens(seed=5))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks.parameters())


@pytest.mark.asyncio
@pytest.mark.parametrize("build", [tiny_gpt, UserLM], ids=["gpt", "user"])
async def test_identity_blocks_preserve_function_and_learn(build) -> None:
    model, opt = _trained(build)
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    blocks = "blocks" if hasattr(model, "blocks") else "layers"
    known = {id(p) for p in model.parameters()}
    async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
        await tx.stage(InsertIdentityBlocks(blocks, after=(0, -1)))
    assert tx.report is not None and tx.report.max_abs_diff is not None
    assert len(model.get_submodule(blocks)) == 4
    assert torch.equal(evaluate(model, x), before)  # exact: x + 0 + 0
    lm_step(model, opt, tokens(seed=4))
    fresh = [(n, p) for n, p in model.named_parameters() if id(p) not in known]
    assert fresh and all(p.grad is not None for _, p in fresh)
    zeroed = [p for n, p in fresh if n.endswith(("proj.weight", "wo.weight", "down.weight"))]
    assert len(zeroed) == 4 and all(p.grad.abs().sum() > 0 for p in zeroed)


@pytest.mark.asyncio
async def test_identity_block_from_a_factory_preserves_function() -> None:
    model, opt = _trained(tiny_gpt)
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    op = InsertIdentityBlocks("blocks", after=(1,), factory=lambda i: identity_block(model.config))
    await ModelSurgeon().apply(model, opt, op, probe=x)
    assert len(model.blocks) == 3
    assert torch.equal(evaluate(model, x), before)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "op", [StackBlocks("blocks", 3, "interleave"), InsertIdentityBlocks("blocks", after=(0,))]
)
async def test_depth_rollback_is_bitwise(op) -> None:
    model, opt = _trained(tiny_gpt)
    before = fingerprint(model, opt)
    with pytest.raises(RuntimeError, match="abort"):
        async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
            await tx.stage(op)
            assert len(model.blocks) > 2
            raise RuntimeError("abort")
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "op", [StackBlocks("layers", 2, "whole"), InsertIdentityBlocks("layers", after=(0, 1))]
)
async def test_resume_after_depth_growth_replays_exactly(op) -> None:
    model, opt = _trained(UserLM)
    await ModelSurgeon().apply(model, opt, op, probe=tokens()[0])
    lm_step(model, opt, tokens(seed=3))
    records = [operation_record(op)]
    fresh, fresh_opt = resumed(UserLM, model, opt, records)
    for seed in (4, 5):
        assert lm_step(model, opt, tokens(seed=seed)) == lm_step(
            fresh, fresh_opt, tokens(seed=seed)
        )
    for (n, p), (m, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x)) * self.gate


@pytest.mark.asyncio
async def test_a_branch_without_an_output_projection_is_refused() -> None:
    model = nn.Sequential(_Gated(), _Gated())
    opt = torch.optim.Adam(model.parameters())
    before = fingerprint(model, opt)
    with pytest.raises(GrowthCouplingError, match=r"ends in") as info:
        await ModelSurgeon().apply(
            model, opt, InsertIdentityBlocks("", after=(0,)), probe=torch.randn(2, 8)
        )
    assert info.value.module and info.value.reason
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_bad_depth_arguments_raise() -> None:
    model, opt = _trained(tiny_gpt, steps=0)
    surgeon = ModelSurgeon()
    for op in (StackBlocks("blocks", 1), StackBlocks("wte"), InsertIdentityBlocks(after=(7,))):
        with pytest.raises(SurgeryError):
            await surgeon.apply(model, opt, op, probe=tokens()[0])
