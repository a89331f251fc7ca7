"""The Grower's public steps and state path, and the options fit and the grower refuse (fast:
nothing grows, so no compile worker starts)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import esper_async as ea
from esper_async.errors import ControllerConfigError, TrainingConfigError


def _data(seed: int = 0, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(n)
    ]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    ea.wrap(model, ["0"], example_input=torch.zeros(2, 6))
    return model


@pytest.mark.parametrize("epochs", [-3, 0, True, "3", 2.5])
@pytest.mark.asyncio
async def test_fit_refuses_epochs_that_are_not_an_int_of_at_least_one(epochs: Any) -> None:
    trainer = ea.Trainer(_model(), grow=False)
    with pytest.raises(TrainingConfigError, match=r"fit\(epochs=...\) must be an int >= 1"):
        await trainer.fit(_data(), _data(1, 1), epochs=epochs)
    assert trainer.step == 0


def test_width_slots_that_name_no_slot_are_refused_with_the_slots_there_are() -> None:
    config = ea.ControllerConfig(width_growth=True, width_slots=("0", "fc9"))
    with pytest.raises(ControllerConfigError, match=r"\['fc9'\].*its slots are \['0'\]"):
        ea.Trainer(_model(), controller=ea.HeuristicController(config))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.asyncio
async def test_end_epoch_leaves_the_model_in_the_mode_it_found(training: bool) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    async with ea.Grower(model, optimizer, grow=False) as grower:
        model.train(training)
        for x, y in _data():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            grower.after_step(loss)
        await grower.end_epoch(_data(1, 1))
        assert model.training is training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.asyncio
async def test_tensor_losses_give_the_mean_of_the_values_and_stay_as_they_were(
    dtype: torch.dtype,
) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    losses = [(torch.rand((), generator=generator) * 10).to(dtype) for _ in range(37)]
    kept = [loss.clone() for loss in losses]
    async with ea.Grower(model, optimizer, grow=False) as grower:
        for loss in losses:
            grower.after_step(loss)
        report = await grower.end_epoch(_data(1, 1))
    # The mean of the values read one by one, summed in float64 in step order: bit for bit.
    total = 0.0
    for loss in kept:
        total += float(loss.double())
    assert report.train_loss == total / len(kept) and report.steps == len(kept)
    # The bookkeeping never writes into the loop's tensors (a float64 loss is not aliased).
    assert all(torch.equal(a, b) for a, b in zip(losses, kept, strict=True))


async def _own_loop(grower: ea.Grower, model: nn.Module, epochs: range, one_by_one: bool) -> None:
    optimizer = grower.optimizer
    for _ in epochs:
        model.train()
        for x, y in _data():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            grower.after_step(loss)
        if not one_by_one:
            await grower.end_epoch(_data(1, 1))
            continue
        # end_epoch's steps, called one by one (what a loop that wants its own order does).
        report = await grower.measure(_data(1, 1))
        await grower.graft_due()
        assert await grower.decide(report, _data(1, 1)) == []  # grow=False: nothing decided
        grower.close_epoch(report)
        assert await grower.snapshot()


@pytest.mark.asyncio
async def test_the_public_steps_one_by_one_measure_what_end_epoch_measures() -> None:
    reports = []
    for one_by_one in (False, True):
        model = _model()
        grower = ea.Grower(model, torch.optim.SGD(model.parameters(), lr=0.1), grow=False)
        async with grower:
            await _own_loop(grower, model, range(2), one_by_one)
        reports.append(
            [(r.epoch, r.train_loss, r.val_loss, r.steps) for r in grower.result.history]
        )
    assert reports[0] == reports[1] and [r[0] for r in reports[0]] == [0, 1]


@pytest.mark.asyncio
async def test_grower_state_dict_holds_the_run_and_a_fresh_grower_resumes_it() -> None:
    model = _model()
    grower = ea.Grower(model, torch.optim.Adam(model.parameters(), lr=1e-2), grow=False)
    async with grower:
        await _own_loop(grower, model, range(2), one_by_one=False)
    payload = grower.state_dict()
    assert set(payload["stateful"]) >= {"controller", "governor", "breakers"}
    fresh = _model()
    resumed = ea.Grower(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-2), grow=False)
    restored = resumed.load_state_dict(payload)
    assert (restored.epoch, resumed.epoch, resumed.step) == (2, 2, grower.step)
    assert [r.val_loss for r in resumed.result.history] == [
        r.val_loss for r in grower.result.history
    ]
    assert resumed.governor.state_dict() == grower.governor.state_dict()
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
    assert all(math.isfinite(r.val_loss) for r in resumed.result.history)


def test_width_slots_are_not_checked_when_nothing_grows() -> None:
    """A static arm may share its growth arm's controller, width_slots and all."""
    config = ea.ControllerConfig(width_growth=True, width_slots=("fc9",))
    trainer = ea.Trainer(_model(), grow=False, controller=ea.HeuristicController(config))
    assert not trainer.grow


class _Agreed:
    """A ``StepConsensus`` loss over one rank (every rank agrees with itself): what a
    data-parallel task's loss is to the grower."""

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets)

    def failed_forward(self) -> float:
        return math.nan

    def agree_culprit(self, index: int) -> int:
        return index

    def agree_all(self, ok: bool) -> bool:
        return ok


@pytest.mark.parametrize(
    ("loss_fn", "graft"),
    [
        pytest.param(None, "eager", id="one-process"),
        pytest.param(_Agreed(), "epoch", id="data-parallel"),
    ],
)
def test_the_default_graft_is_eager_except_under_data_parallelism(loss_fn: Any, graft: str) -> None:
    trainer = ea.Trainer(_model(), loss_fn=loss_fn)
    assert trainer.graft == graft
    if loss_fn is not None:
        with pytest.raises(ValueError, match="under data parallelism use graft='epoch'"):
            ea.Trainer(_model(), loss_fn=loss_fn, graft="eager")


def test_the_default_graft_is_epoch_on_one_of_several_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A DDP job whose loss is not a StepConsensus (e.g. a plain loss under ddp_wrapper): kernels
    # swapped in at a different step on each rank would rebuild DDP out of step.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    assert ea.Trainer(_model()).graft == "epoch"
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    assert ea.Trainer(_model()).graft == "eager"


def test_an_unknown_graft_mode_is_refused_with_the_modes_there_are() -> None:
    with pytest.raises(ValueError, match="'auto', 'epoch', 'step' or 'eager'"):
        ea.Trainer(_model(), graft="later")  # type: ignore[arg-type]


class _SnapshotFails(ea.Grower):
    """A grower whose first snapshot fails (a full disk, a cancelled run), as it enters."""

    async def snapshot(self, *, replace: bool = False) -> bool:
        raise OSError("no space left for the snapshot")


@pytest.mark.asyncio
async def test_a_grower_that_fails_entering_closes_what_it_opened() -> None:
    # Entered inside an open compiler, as the demo does: the compiler's own exit must still
    # find its task group on top (before the fix: "Attempted to exit a cancel scope that isn't
    # the current task's current cancel scope", which hid the first error).
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    async with ea.BlueprintCompiler(workers=1) as compiler:
        grower = _SnapshotFails(model, opt, compiler=compiler)
        with pytest.raises(OSError, match="no space left"):
            async with grower:
                pass
        assert not grower.compiles.open
