"""Training outcomes that used to pass silently: an epoch in which every step was dropped, a
non-finite validation loss, an empty loader and a one-shot iterator reused across epochs. Each is
now an incident and a warning, or a clear error, and never a reported loss of 0.0."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import pytest
import structlog
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from esper_async import LoaderError
from esper_async.compiler import BlueprintCompiler, ProcessPool
from esper_async.controller import Decision, EpochReport, plateaued
from esper_async.reliability import GovernorError, IncidentKind, ReliabilityConfig
from esper_async.reliability._record import report_from_json, report_to_json
from esper_async.seeds import SeedSlot
from esper_async.trainer import Trainer

Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(n: int = 32, size: int = 16) -> list[Batch]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


class _Passes:
    """A re-iterable loader (like a DataLoader) whose inputs are multiplied by ``scale`` on the
    listed passes (0-based): NaN makes every training step's loss bad, inf a validation loss."""

    def __init__(self, batches: list[Batch], poisoned: set[int], scale: float) -> None:
        self.batches, self.poisoned, self.scale = batches, poisoned, scale
        self.passes = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        bad = self.passes in self.poisoned
        self.passes += 1
        for x, y in self.batches:
            yield (x * self.scale if bad else x), y


class _SameIterator:
    """Has a ``len`` and looks re-iterable, but hands out one iterator: empty after one pass."""

    def __init__(self, batches: list[Batch]) -> None:
        self.n, self.it = len(batches), iter(batches)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Batch]:
        return self.it


class _NoData(IterableDataset):
    """A dataset with no examples and no ``len``: only iterating it shows it is empty."""

    def __iter__(self) -> Iterator[Batch]:
        return iter(())


class _Recorder:
    """A controller that decides nothing and records the epochs it was asked about."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        self.asked.append(report.epoch)
        return []


def _trainer(**kwargs: object) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    kwargs.setdefault("grow", False)
    return Trainer(
        model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        **kwargs,  # type: ignore[arg-type]
    )


# --- every step dropped ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_epoch_whose_every_step_was_dropped_reports_none_not_zero() -> None:
    train = _Passes(_batches(), poisoned={0}, scale=math.nan)  # epoch 0: every loss is NaN
    trainer = _trainer()
    with structlog.testing.capture_logs() as logs:
        fit = await trainer.fit(train, _batches(), epochs=3)
    first, *rest = fit.history
    assert first.train_loss is None and (first.steps, first.dropped) == (0, 2)
    assert all(r.train_loss is not None and math.isfinite(r.train_loss) for r in rest)
    assert [(r.steps, r.dropped) for r in rest] == [(2, 0), (2, 0)]
    stalls = [i for i in fit.incidents if i.kind is IncidentKind.EPOCH_WITHOUT_STEPS]
    assert [i.epoch for i in stalls] == [0]
    assert "all 2 steps of epoch 0 were dropped" in stalls[0].detail
    warned = [e for e in logs if e["log_level"] == "warning" and e.get("kind") == stalls[0].kind]
    assert len(warned) == 1
    # A checkpoint's record of the epoch keeps "no steps" as it is.
    assert report_from_json(report_to_json(first)) == first


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("limit", "stops"),
    [pytest.param(2, True, id="limit-reached"), pytest.param(3, False, id="below-limit")],
)
async def test_epochs_in_a_row_without_a_step_stop_the_run(limit: int, stops: bool) -> None:
    train = _Passes(_batches(), poisoned={0, 1}, scale=math.nan)
    trainer = _trainer(reliability=ReliabilityConfig(max_epochs_without_steps=limit))
    if stops:
        with pytest.raises(GovernorError, match="every step of the last 2 epoch"):
            await trainer.fit(train, _batches(), epochs=4)
        assert [r.train_loss for r in trainer.result.history] == [None, None]
    else:
        fit = await trainer.fit(train, _batches(), epochs=4)
        assert [r.steps for r in fit.history] == [0, 0, 2, 2]


# --- non-finite validation loss ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_non_finite_validation_loss_is_an_incident_and_no_decision_is_taken() -> None:
    val = _Passes(_batches(), poisoned={1}, scale=math.inf)  # epoch 1's validation loss is NaN
    controller = _Recorder()
    compiler = BlueprintCompiler(executor=ProcessPool(1, prestart=False))  # never compiles
    trainer = _trainer(grow=True, controller=controller, compiler=compiler)
    with structlog.testing.capture_logs() as logs:
        fit = await trainer.fit(_batches(), val, epochs=3)
    assert [r.val_finite for r in fit.history] == [True, False, True]
    assert not math.isfinite(fit.history[1].val_loss)
    assert controller.asked == [0, 2]  # epoch 1 is judged by nobody
    bad = [i for i in fit.incidents if i.kind is IncidentKind.NON_FINITE_VALIDATION]
    assert [i.epoch for i in bad] == [1]
    assert any(e.get("kind") == IncidentKind.NON_FINITE_VALIDATION for e in logs)


def test_a_plateau_is_judged_without_non_finite_epochs() -> None:
    def reports(*losses: float) -> list[EpochReport]:
        return [EpochReport(i, 1.0, v, 0.5) for i, v in enumerate(losses)]

    # One early NaN epoch used to make "the best loss before" NaN, and no plateau ever showed.
    assert plateaued(reports(math.nan, 1.0, 1.0), patience=1, tolerance=0.05)
    assert not plateaued(reports(math.nan, 1.0, 0.5), patience=1, tolerance=0.05)
    assert not plateaued(reports(math.nan, math.inf, 1.0), patience=1, tolerance=0.05)


# --- loaders that cannot serve the run ---------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["training", "validation"])
@pytest.mark.parametrize(
    "empty",
    [
        pytest.param(lambda: [], id="empty-list"),
        pytest.param(lambda: DataLoader(_NoData(), batch_size=4), id="empty-iterable-dataset"),
    ],
)
async def test_an_empty_loader_is_a_clear_error(which: str, empty: object) -> None:
    loader = empty()  # type: ignore[operator]
    train, val = (loader, _batches()) if which == "training" else (_batches(), loader)
    trainer = _trainer()
    with pytest.raises(LoaderError, match=f"the {which} loader yielded no batches") as info:
        await trainer.fit(train, val, epochs=2)
    assert isinstance(info.value, ValueError) and info.value.loader == which
    assert trainer.result.history == []  # nothing was reported as an ordinary epoch


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["training", "validation"])
async def test_a_generator_is_refused_for_several_epochs_before_any_step(which: str) -> None:
    one_shot = (b for b in _batches())
    train, val = (one_shot, _batches()) if which == "training" else (_batches(), one_shot)
    trainer = _trainer()
    with pytest.raises(LoaderError, match=r"one-shot iterator.*a DataLoader or a list"):
        await trainer.fit(train, val, epochs=2)
    assert trainer.step == 0


@pytest.mark.asyncio
async def test_a_generator_serves_a_single_epoch() -> None:
    trainer = _trainer()
    fit = await trainer.fit((b for b in _batches()), (b for b in _batches()), epochs=1)
    assert [r.steps for r in fit.history] == [2]


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["training", "validation"])
async def test_a_loader_empty_after_its_first_epoch_is_a_clear_error(which: str) -> None:
    spent = _SameIterator(_batches())
    train, val = (spent, _batches()) if which == "training" else (_batches(), spent)
    trainer = _trainer()
    with pytest.raises(LoaderError, match="in epoch 1, though it did in an earlier epoch"):
        await trainer.fit(train, val, epochs=3)
    assert len(trainer.result.history) == 1
