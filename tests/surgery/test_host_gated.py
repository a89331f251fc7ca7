"""A gated MLP's hidden width grows with its gate and up projections together (WidenGated)."""

from __future__ import annotations

import pytest
import torch

from esper_async.surgery import (
    GrowthCouplingError,
    ModelSurgeon,
    WidenGated,
    WidenResidual,
    operation_record,
)

from ._helpers import assert_same, evaluate, fingerprint
from ._host_models import UserLM, adamw, lm_step, resumed, tokens


def _trained():
    torch.manual_seed(0)
    model = UserLM()
    opt = adamw(model)
    for i in range(3):
        lm_step(model, opt, tokens(seed=i))
    return model, opt


def _op(width: int = 128, seed: int = 1) -> WidenGated:
    return WidenGated("layers.0.mlp.gate", "layers.0.mlp.up", width, seed=seed)


@pytest.mark.asyncio
async def test_gate_and_up_widen_together_and_preserve_function() -> None:
    model, opt = _trained()
    mlp = model.layers[0].mlp
    gate, up, down = mlp.gate.weight.detach().clone(), mlp.up.weight.detach().clone(), None
    down = mlp.down.weight.detach().clone()
    up_state = {k: v.clone() for k, v in opt.state[mlp.up.weight].items()}
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    await ModelSurgeon().apply(model, opt, _op(), probe=tokens()[0])
    mlp = model.layers[0].mlp
    assert mlp.gate.out_features == mlp.up.out_features == mlp.down.in_features == 128
    assert torch.allclose(evaluate(model, x), before, rtol=1e-4, atol=1e-5)
    # one unit map: each new unit copies the same old unit in gate and up
    for k in range(96, 128):
        source = int(torch.nonzero((gate == mlp.gate.weight[k]).all(1))[0])
        assert torch.equal(mlp.up.weight[k], up[source])
    # down's columns of a unit's replicas sum to the old column
    assert torch.allclose(
        mlp.down.weight[:, :96].sum() + mlp.down.weight[:, 96:].sum(), down.sum(), atol=1e-4
    )
    state = opt.state[mlp.up.weight]
    assert torch.equal(state["step"], up_state["step"]) and state["exp_avg"].shape == (128, 32)
    lm_step(model, opt, tokens(seed=4))
    assert mlp.gate.weight.grad[96:].abs().sum() > 0 and mlp.up.weight.grad[96:].abs().sum() > 0


@pytest.mark.asyncio
async def test_gated_widening_rolls_back_bitwise_and_replays() -> None:
    model, opt = _trained()
    before = fingerprint(model, opt)
    with pytest.raises(RuntimeError, match="abort"):
        async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
            await tx.stage(_op())
            raise RuntimeError("abort")
    assert_same(before, fingerprint(model, opt))
    ops = [WidenResidual(48, seed=2), _op(150, seed=3)]  # d_model, then the hidden width
    async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
        for op in ops:
            await tx.stage(op)
    lm_step(model, opt, tokens(seed=4))
    fresh, fresh_opt = resumed(UserLM, model, opt, [operation_record(op) for op in ops])
    assert lm_step(model, opt, tokens(seed=5)) == lm_step(fresh, fresh_opt, tokens(seed=5))


@pytest.mark.asyncio
async def test_projections_that_are_not_gated_together_are_refused() -> None:
    model, opt = _trained()
    with pytest.raises(GrowthCouplingError, match="not multiplied"):
        await ModelSurgeon().apply(
            model,
            opt,
            WidenGated("layers.0.attn.wq", "layers.0.attn.wk", 64),
            probe=tokens()[0],
        )
