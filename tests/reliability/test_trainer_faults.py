"""Faults met by a real trainer: bad losses, refused germinations, checkpoints and resume, and a
reduced fault drill with every kind of fault (real compiles, real worker kills)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper_async import Blueprint
from esper_async.apps.drill import DrillConfig, run_drill
from esper_async.compiler import BlueprintCompiler
from esper_async.control._controller import Decision, EpochReport, Germinate
from esper_async.reliability import (
    BreakerConfig,
    FaultKind,
    GovernorConfig,
    GovernorError,
    IncidentKind,
    ReliabilityConfig,
)
from esper_async.seeds import SeedSlot, SeedState, wrap
from esper_async.training.trainer import Trainer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]


def _loaders(bad: dict[int, float] | None = None, n: int = 96) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    batches = [(x[i : i + 16].clone(), y[i : i + 16]) for i in range(0, n, 16)]
    for index, scale in (bad or {}).items():
        batches[index] = (batches[index][0] * scale, batches[index][1])
    return batches, [(x, y)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))


def _trainer(model: nn.Module, **kwargs: object) -> Trainer:
    return Trainer(
        model, grow=False, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        reliability=ReliabilityConfig(governor=GovernorConfig(warmup=4, spike_factor=5.0)),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("scale", "kind"),
    [
        pytest.param(1e4, IncidentKind.LOSS_SPIKE, id="spike"),
        pytest.param(math.nan, IncidentKind.NON_FINITE_LOSS, id="non-finite"),
    ],
)
async def test_a_bad_batch_rolls_back_and_training_continues(
    scale: float, kind: IncidentKind, device: str
) -> None:
    train, val = _loaders(bad={4: scale})  # epoch 0 trains batches 0..5; batch 4 is bad
    model = _model()
    trainer = _trainer(model, device=device)
    fit = await trainer.fit(train, val, epochs=3)
    assert [i.kind for i in fit.incidents] == [kind] * 3  # once per epoch: the batch repeats
    assert trainer.governor.rollbacks == 3
    assert all(math.isfinite(r.train_loss) for r in fit.history)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert fit.history[-1].val_loss < fit.history[0].val_loss  # it still learns


@pytest.mark.asyncio
async def test_rollback_restores_the_snapshot_exactly() -> None:
    train, val = _loaders(bad={5: math.nan})  # the last batch of the epoch is bad
    model = _model()
    trainer = _trainer(model)
    await trainer.fit(train, val, epochs=1)
    snapshot = trainer.governor.snapshot
    assert snapshot is not None
    # Rolled back to the start of the epoch, then the end-of-epoch snapshot was taken: the
    # model equals its copy, and equals the initial model (every good step was undone).
    initial = _model().state_dict()
    assert all(torch.equal(model.state_dict()[k], snapshot.model_state[k]) for k in initial)
    assert all(torch.equal(model.state_dict()[k], initial[k]) for k in initial)


@pytest.mark.asyncio
async def test_the_governor_gives_up_when_rollbacks_cannot_help() -> None:
    train, val = _loaders(bad={i: math.nan for i in range(6)})
    trainer = Trainer(
        _model(), grow=False,
        reliability=ReliabilityConfig(governor=GovernorConfig(max_rollbacks_per_epoch=3)),
    )
    with pytest.raises(GovernorError, match="rollbacks in epoch 0 did not make training sound"):
        await trainer.fit(train, val, epochs=1)


def _shuffled(seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=gen)
    ds = TensorDataset(x, (x[:, 1] > 0).long())
    return DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))


@pytest.mark.asyncio
@pytest.mark.parametrize("device", DEVICES)
async def test_resume_continues_exactly_as_an_uninterrupted_run(
    tmp_path: Path, device: str
) -> None:
    def run_parts() -> tuple[nn.Module, Trainer, DataLoader]:
        model = _model().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        trainer = Trainer(model, grow=False, optimizer=opt, scheduler=sched, device=device)
        return model, trainer, _shuffled()

    val = _loaders()[1]
    straight_model, straight, loader = run_parts()
    expected = await straight.fit(loader, val, epochs=5)

    _, first, loader = run_parts()
    await first.fit(loader, val, epochs=3, checkpoint_dir=tmp_path, checkpoint_every=1)
    resumed_model, resumed, loader = run_parts()  # a fresh process would build these anew
    torch.manual_seed(12345)  # the checkpoint's RNG states replace whatever is current
    fit = await resumed.fit(loader, val, epochs=5, checkpoint_dir=tmp_path, resume=True)

    assert [r.val_loss for r in fit.history] == [r.val_loss for r in expected.history]
    assert resumed.step == straight.step == 20
    state, want = resumed_model.state_dict(), straight_model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert resumed.scheduler is not None and straight.scheduler is not None
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


@pytest.mark.asyncio
async def test_a_non_writing_rank_writes_no_checkpoint_but_resumes_from_the_writers(
    tmp_path: Path,
) -> None:
    """Under DDP only rank 0 writes (``writes_checkpoints=ctx.is_leader``); the others resume from
    the same directory. Trainers in one process stand in for the ranks of one job."""
    train, val = _loaders()
    silent_dir, shared = tmp_path / "silent", tmp_path / "shared"
    silent = Trainer(_model(), grow=False, writes_checkpoints=False)
    await silent.fit(train, val, epochs=2, checkpoint_dir=silent_dir)
    assert not list(silent_dir.glob("*.pt"))

    straight = Trainer(_model(), grow=False)
    await straight.fit(train, val, epochs=3)
    writer = Trainer(_model(), grow=False)
    await writer.fit(train, val, epochs=2, checkpoint_dir=shared)  # stopped after epoch 2 of 3
    written = sorted(shared.glob("*.pt"))
    assert written
    reader = Trainer(_model(), grow=False, writes_checkpoints=False)
    await reader.fit(train, val, epochs=3, checkpoint_dir=shared, resume=True)
    assert sorted(shared.glob("*.pt")) == written  # the reader trained on, and wrote nothing
    assert reader.step == straight.step
    state, want = reader.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)


class _GerminateEveryEpoch:
    """A controller that asks for the same blueprint in the same slot at every boundary."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        slot = next(iter(slots.values()))
        if slot.state is SeedState.DORMANT:
            return [Germinate(slot.slot_name, self.blueprint, "test")]
        return []


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_an_open_breaker_refuses_germination_until_its_cooldown_ends() -> None:
    train, val = _loaders()
    model = _model()
    wrap(model, ["0"], example_input=torch.zeros(2, 6))
    blueprint = Blueprint("low_rank", {"rank": 2})
    clock = _Clock()
    trainer = Trainer(
        model, controller=_GerminateEveryEpoch(blueprint),
        compiler=BlueprintCompiler(workers=1),
        reliability=ReliabilityConfig(
            breaker=BreakerConfig(threshold=2, cooldown_s=60.0), clock=clock
        ),
    )
    for _ in range(2):
        trainer.breakers[blueprint.id].record_failure("earlier failures")

    def tick(report: EpochReport, fit: object) -> None:
        clock.now += 40.0  # decisions at 0 s and 40 s are refused, at 80 s the trial goes

    fit = await trainer.fit(train, val, epochs=3, on_epoch=tick)
    kinds = [i.kind for i in fit.incidents]
    # The trial trains at once as its eager module (graft="auto"); the run ends before its kernel.
    assert kinds == [IncidentKind.GERMINATION_REFUSED] * 2 + [IncidentKind.ENDED_EAGER]
    details = [i.detail.split(" for ")[1] for i in fit.incidents[:2]]
    assert details == ["60.0 s more", "20.0 s more"]
    assert [(e.target, e.epoch) for e in fit.events] == [("germinated", 2), ("training", 2)]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_reduced_fault_drill_recovers_from_every_kind_of_fault() -> None:
    report = await run_drill(
        DrillConfig(
            # Eight warm-up operations, then each kind of fault exactly once in sixteen.
            operations=24, fault_rate=0.0, compile_timeout_s=4.0, kill_build_ms=1000,
            checkpoint_every=5,
        )
    )
    assert report.training_crashes == 0
    assert report.committed_data_lost == 0
    assert report.non_finite_losses_recorded == 0
    assert report.operations >= 24
    assert set(report.faults_injected) == {k.value for k in FaultKind}, report.faults_injected
    assert report.checkpoints_verified >= 1
    assert report.success_rate >= 0.95, report.failures
    for kind, (ok, _) in report.recovered.items():
        assert ok >= 1, (kind, report.failures)


class _Shifting:
    """Training batches that change for good at epoch ``at``: a deliberate data shift."""

    def __init__(self, before: list, after: list) -> None:
        self.before, self.after, self.shifted = before, after, False

    def __len__(self) -> int:
        return len(self.after if self.shifted else self.before)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.after if self.shifted else self.before)


def _random_batches(seed: int, n: int, size: int = 8) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 10, generator=gen), torch.randint(0, 4, (size,), generator=gen))
            for _ in range(n)]


@pytest.mark.asyncio
async def test_a_data_shift_is_a_new_loss_level_and_the_run_goes_on() -> None:
    # Memorise 4 batches of random labels (the loss falls near 0), then train on new batches:
    # their loss is far above the old one, on every batch, for good (as after a change of data).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
    train = _Shifting(_random_batches(0, 4), _random_batches(1, 16))
    trainer = Trainer(model, grow=False,
                      optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))

    def shift(report: EpochReport, _: object) -> None:
        train.shifted = report.epoch >= 39

    fit = await trainer.fit(train, train.before[:1], epochs=42, on_epoch=shift)
    memorised = fit.history[39].train_loss
    assert memorised is not None and memorised < 0.05
    spikes = [i for i in fit.incidents if i.kind is IncidentKind.LOSS_SPIKE]
    assert 1 <= len(spikes) <= 2 and all(i.epoch == 40 for i in spikes)  # then a level
    assert trainer.governor.judge_part.levels == 1
    assert all(r.steps > 0 for r in fit.history[40:])  # it trains on the new data
    assert fit.history[-1].train_loss < fit.history[40].train_loss


@pytest.mark.asyncio
async def test_a_real_divergence_still_stops_the_run() -> None:
    # From epoch 3 the learning rate is 10^4 times larger (and snapshots carry it): every step
    # from a good model diverges, a rollback brings a good step back, and the rollbacks run out.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 if e < 3 else 1e4)
    train = _random_batches(0, 24)
    trainer = Trainer(model, grow=False, optimizer=optimizer, scheduler=scheduler)
    with pytest.raises(GovernorError, match="rollbacks in epoch 3 did not make training sound"):
        await trainer.fit(train, train[:1], epochs=6)
    assert trainer.governor.judge_part.levels == 0
