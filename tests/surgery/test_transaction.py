from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import (
    AddResidual,
    AddSkip,
    GatedResidual,
    InsertAfter,
    ModelSurgeon,
    RemoveLayer,
    SurgeryBudget,
    SurgeryOperation,
    SurgeryValidationConfig,
    Widen,
    identity_conv2d,
    identity_linear,
)

from ._helpers import TinyNet, assert_same, evaluate, fingerprint, images, train

# Factories, because inserted modules must be fresh objects. Some fail on some states (a later op
# may no longer fit after an earlier one): the property tests exercise both paths.
PRESERVING: list[Callable[[], SurgeryOperation]] = [
    lambda: Widen("layer1.0.conv1", 9, seed=1),
    lambda: Widen("layer1.1.conv1", 11, seed=2),
    lambda: Widen("head.0", 16, seed=3),
    lambda: InsertAfter("head.1", identity_linear(12)),
    lambda: InsertAfter("layer1.0.bn1", identity_conv2d(6)),
    lambda: InsertAfter("stem", GatedResidual(nn.Conv2d(6, 6, 3, padding=1))),
    lambda: AddResidual("layer1.1"),
    lambda: AddResidual("head.0"),
    lambda: AddSkip("layer1.0.conv1", "layer1.0.bn2", scope="layer1.0"),
    lambda: AddSkip("layer1.0", "layer1.1", scope="layer1"),
]
OTHERS: list[Callable[[], SurgeryOperation]] = [
    lambda: RemoveLayer("layer1.0"),
    lambda: RemoveLayer("layer1.1"),
    lambda: RemoveLayer("head.1"),
    lambda: Widen("stem.0", 8),
    lambda: RemoveLayer("no.such.layer"),
    lambda: InsertAfter("head.0", nn.Linear(12, 12), preserves_function=True),
]
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


class _Abort(Exception):
    pass


def _setup(optimizer: str, warm_steps: int, seed: int) -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyNet()
    opt = OPTIMIZERS[optimizer](list(model.parameters()))
    train(model, opt, images(), warm_steps)
    return model, opt


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, len(PRESERVING) + len(OTHERS) - 1), min_size=1, max_size=4),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    warm_steps=st.integers(0, 2),
    seed=st.integers(0, 3),
)
def test_any_sequence_then_rollback_restores_the_exact_state(
    picks: list[int], optimizer: str, warm_steps: int, seed: int
) -> None:
    model, opt = _setup(optimizer, warm_steps, seed)
    before = fingerprint(model, opt)
    factories = PRESERVING + OTHERS

    async def run() -> int:
        staged = 0
        surgeon = ModelSurgeon()
        with pytest.raises(_Abort):
            async with surgeon.transaction(model, opt, probe=images(4, seed=9)[0]) as tx:
                for pick in picks:
                    try:
                        await tx.stage(factories[pick]())
                        staged += 1
                    except SurgeryError:
                        pass
                raise _Abort
        return staged

    anyio.run(run)
    assert_same(before, fingerprint(model, opt))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    picks=st.lists(st.integers(0, len(PRESERVING) - 1), min_size=1, max_size=4),
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    seed=st.integers(0, 3),
)
def test_committed_preserving_sequences_keep_the_output(
    picks: list[int], optimizer: str, seed: int
) -> None:
    model, opt = _setup(optimizer, 2, seed)
    x = images(8, seed=5)[0]
    expected = evaluate(model, x)

    async def run() -> nn.Module:
        async with ModelSurgeon().transaction(model, opt, probe=images(4, seed=9)[0]) as tx:
            for pick in picks:
                try:
                    await tx.stage(PRESERVING[pick]())
                except SurgeryError:
                    pass
        return tx.model

    changed = anyio.run(run)
    assert torch.allclose(evaluate(changed, x), expected, rtol=1e-4, atol=1e-5)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in changed.parameters() if p.requires_grad)
    losses = train(changed, opt, images(), 3)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.asyncio
async def test_a_failed_stage_is_undone_and_the_transaction_goes_on() -> None:
    model, opt = _setup("adam", 1, 0)
    surgeon = ModelSurgeon()
    async with surgeon.transaction(model, opt, probe=images(4)[0]) as tx:
        before = fingerprint(model, opt)
        with pytest.raises(SurgeryError, match="no module named 'layer9'"):
            await tx.stage(Widen("layer9", 4))
        with pytest.raises(SurgeryError, match="altered the output"):
            await tx.stage(InsertAfter("head.0", nn.Linear(12, 12)))
        assert_same(before, fingerprint(model, opt))
        await tx.stage(Widen("head.0", 20))
    assert tx.operations == ["widen 'head.0' to 20"]
    assert tx.report is not None and tx.report.ok
    assert model.head[0].out_features == 20


@pytest.mark.asyncio
async def test_a_budget_violation_rolls_everything_back() -> None:
    model, opt = _setup("adam", 1, 0)
    before = fingerprint(model, opt)
    budget = SurgeryBudget(max_growth=1.01)
    surgeon = ModelSurgeon(validation=SurgeryValidationConfig(budget=budget))
    with pytest.raises(SurgeryError, match="exceed"):
        async with surgeon.transaction(model, opt, probe=images(4)[0]) as tx:
            await tx.stage(Widen("layer1.1.conv1", 32))
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_an_error_in_the_block_rolls_back_and_propagates() -> None:
    model, opt = _setup("sgd_momentum", 2, 0)
    before = fingerprint(model, opt)
    with pytest.raises(KeyError):
        async with ModelSurgeon().transaction(model, opt, probe=images(4)[0]) as tx:
            await tx.stage(RemoveLayer("layer1.0"))
            await tx.stage(AddResidual("head.0"))
            raise KeyError("boom")
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_cancellation_rolls_back() -> None:
    model, opt = _setup("adam", 1, 0)
    before = fingerprint(model, opt)
    with anyio.CancelScope() as scope:
        async with ModelSurgeon().transaction(model, opt, probe=images(4)[0]) as tx:
            await tx.stage(Widen("head.0", 14))
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_explicit_rollback_then_leaving_changes_nothing() -> None:
    model, opt = _setup("adam", 1, 0)
    before = fingerprint(model, opt)
    async with ModelSurgeon().transaction(model, opt, probe=images(4)[0]) as tx:
        await tx.stage(InsertAfter("head.1", identity_linear(12)))
        await tx.rollback()
    assert_same(before, fingerprint(model, opt))
    with pytest.raises(SurgeryError, match="not open"):
        await tx.stage(Widen("head.0", 14))


@pytest.mark.asyncio
async def test_transactions_on_one_surgeon_run_one_at_a_time() -> None:
    model, opt = _setup("adam", 1, 0)
    surgeon, order = ModelSurgeon(), []

    async def one(name: str, op: SurgeryOperation) -> None:
        async with surgeon.transaction(model, opt, probe=images(4)[0]) as tx:
            order.append(f"{name} in")
            await tx.stage(op)
            await anyio.sleep(0.01)
            order.append(f"{name} out")

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "a", Widen("head.0", 14))
        tg.start_soon(one, "b", AddResidual("layer1.1"))
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


@pytest.mark.asyncio
async def test_apply_runs_one_operation_and_returns_the_model() -> None:
    model, opt = _setup("adam", 1, 0)
    out = await ModelSurgeon().apply(model, opt, Widen("head.0", 13), probe=images(4)[0])
    assert out is model and model.head[0].out_features == 13
