"""Lagged verdicts: the loss judged on the device, the update masked there, the verdict read a
step later. A bad step changes neither the parameters nor the optimizer state, the steps launched
behind it apply nothing and are run again, and a whole run gives the same model as the
synchronous one."""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
import pytest
import torch
from tests.reliability import _helpers as helpers
from torch import nn

from esper_async.reliability import GovernorConfig, IncidentKind, ReliabilityConfig
from esper_async.seeds import SeedState, find_slots
from esper_async.training._masked import MaskedStep
from esper_async.training._verdict import LaggedVerdicts
from esper_async.training.trainer import Trainer

OptFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: list[OptFactory] = [
    lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.RMSprop(p, lr=1e-2),
]
IDS = ["adam-fused", "adamw-fused", "adam", "sgd-momentum", "rmsprop"]


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [
        t.clone() for t in helpers.optimizer_tensors(opt)
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=IDS)
def test_a_bad_step_and_the_steps_behind_it_change_nothing(make_opt: OptFactory) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = make_opt(list(model.parameters()))
    masked, verdicts = MaskedStep(opt), LaggedVerdicts(torch.device("cpu"), lag=1)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(scale: float, threshold: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y) * scale
        ok, apply = verdicts.judge(loss, threshold)
        loss.backward()
        masked.step(apply)
        return ok, apply

    for _ in range(3):  # good steps: state exists from here on
        ok, apply = step(1.0)
        assert bool(ok) and bool(apply)
    before = _state(model, opt)
    reads = masked.host_reads
    ok, apply = step(math.nan)  # non-finite
    assert not bool(ok) and not bool(apply)
    assert _same(before, _state(model, opt))
    ok, apply = step(1.0)  # launched behind the bad step: a good loss, halted
    assert bool(ok) and not bool(apply)
    assert _same(before, _state(model, opt))
    assert masked.host_reads == reads  # no host read of the verdict on these steps
    verdicts.clear()
    ok, apply = step(1e6, threshold=10.0)  # a spike against the threshold
    assert not bool(ok) and not bool(apply)
    assert _same(before, _state(model, opt))
    verdicts.clear()
    ok, apply = step(1.0)
    assert bool(apply)
    assert not _same(before, _state(model, opt))  # good steps do update


def _loaders(bad: dict[int, float]) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    batches = [(x[i : i + 16].clone(), y[i : i + 16]) for i in range(0, 96, 16)]
    for index, scale in bad.items():
        batches[index] = (batches[index][0] * scale, batches[index][1])
    return batches, [(x, y)]


def _fit(verdict: str, bad: dict[int, float], lag: int = 1) -> tuple[Trainer, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    trainer = Trainer(
        model, grow=False, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        reliability=ReliabilityConfig(
            governor=GovernorConfig(warmup=4, spike_factor=5.0), verdict=verdict,  # type: ignore[arg-type]
            verdict_lag=lag),
    )
    train, val = _loaders(bad)
    anyio.run(lambda: trainer.fit(train, val, epochs=3))
    return trainer, model


@pytest.mark.parametrize("lag", [1, 2])
@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        pytest.param({4: 1e4}, IncidentKind.LOSS_SPIKE, id="spike"),
        pytest.param({4: math.nan}, IncidentKind.NON_FINITE_LOSS, id="non-finite"),
        pytest.param({1: math.nan, 2: math.nan, 5: 1e4}, None, id="several"),
    ],
)
def test_a_lagged_run_equals_the_synchronous_run(
    bad: dict[int, float], kind: IncidentKind | None, lag: int
) -> None:
    sync, sync_model = _fit("sync", bad)
    lagged, lagged_model = _fit("lagged", bad, lag)
    assert lagged.verdicts is not None and sync.verdicts is None
    assert lagged.verdicts.reads >= lagged.step  # every step's verdict was read, lagged
    if kind is not None:
        assert [i.kind for i in lagged.result.incidents] == [kind] * 3
    assert [(i.kind, i.step) for i in lagged.result.incidents] == [
        (i.kind, i.step) for i in sync.result.incidents]
    assert lagged.step == sync.step
    assert [r.train_loss for r in lagged.result.history] == [
        r.train_loss for r in sync.result.history]
    assert all(torch.equal(a, b) for a, b in zip(
        sync_model.state_dict().values(), lagged_model.state_dict().values(), strict=True))
    assert _same(helpers.optimizer_tensors(sync.optimizer),
                 helpers.optimizer_tensors(lagged.optimizer))


def _seeded_fit(verdict: str, fault: str = "nan") -> tuple[Trainer, nn.Module]:
    model = helpers.host()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    helpers.grow(model, opt, "0", rank=2)  # a seed in TRAINING in slot "0"; slot "2" dormant
    trainer = Trainer(model, grow=False, optimizer=opt,
                      reliability=ReliabilityConfig(verdict=verdict))  # type: ignore[arg-type]
    seed = find_slots(model)["0"].seed
    assert seed is not None
    gen = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))
             for _ in range(6)]
    seen: list[int] = []
    calls = 0

    def nan_from_the_fourth_call(_m: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls >= 4 and fault == "raise":
            raise RuntimeError("injected")
        return out * math.nan if calls >= 4 else out

    seed.register_forward_hook(nan_from_the_fourth_call)  # batch 3 on, the seed's output is NaN

    def on_step(step: int, loss: float | None) -> None:
        seen.append(step)

    anyio.run(lambda: trainer.fit(train, train[:1], epochs=2, on_step=on_step))
    assert seen == list(range(1, 13))
    return trainer, model


@pytest.mark.parametrize(("fault", "kind"), [("nan", IncidentKind.SEED_NON_FINITE),
                                             ("raise", IncidentKind.SEED_RAISED)])
def test_a_culprit_seed_is_culled_after_the_lagged_read_and_training_continues(
    fault: str, kind: IncidentKind
) -> None:
    lagged, model = _seeded_fit("lagged", fault)
    slot = find_slots(model)["0"]
    assert slot.state is SeedState.EMBARGOED and slot.seed is None
    kinds = [i.kind for i in lagged.result.incidents]
    assert kinds == [kind]
    assert lagged.governor.rollbacks == 0  # culled and the step redone: nothing rolled back
    assert [r.dropped for r in lagged.result.history] == [0, 0]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    sync, sync_model = _seeded_fit("sync", fault)
    assert [(i.kind, i.step) for i in sync.result.incidents] == [
        (i.kind, i.step) for i in lagged.result.incidents]
    assert all(torch.equal(a, b) for a, b in zip(
        sync_model.state_dict().values(), model.state_dict().values(), strict=True))


class _Broken:
    """Good batches, a NaN batch, then a loader error while that bad step is still in flight."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches) + 1

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self.batches
        raise OSError("the data disk went away")


def test_a_fit_left_by_an_error_behind_a_bad_step_does_not_halt_the_next_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    trainer = Trainer(
        model, grow=False, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        reliability=ReliabilityConfig(governor=GovernorConfig(warmup=2), verdict="lagged"),
    )
    good, val = _loaders({})
    bad = [*good[:4], (good[4][0] * math.nan, good[4][1])]
    with pytest.raises(OSError, match="disk went away"):
        anyio.run(lambda: trainer.fit(_Broken(bad), val, epochs=1))
    assert trainer.verdicts is not None
    before, steps = [p.detach().clone() for p in model.parameters()], trainer.step
    anyio.run(lambda: trainer.fit(good, val, epochs=1))
    assert trainer.step == steps + len(good) and not trainer.result.incidents
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "kwargs", [{"launch": "inline"}, {"verdict_lag": 0}, {"verdict": "later"}]
)
def test_bad_verdict_settings_are_refused_with_the_choices(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        ReliabilityConfig(**kwargs)  # type: ignore[arg-type]


def test_a_cpu_trainer_never_launches_on_the_loop_even_when_asked() -> None:
    # CPU steps are judged on the host: they block, so they always run in a worker thread.
    trainer = Trainer(nn.Linear(4, 2), grow=False, reliability=ReliabilityConfig(launch="loop"))
    assert trainer.verdicts is None and not trainer._steps.launch_on_loop
