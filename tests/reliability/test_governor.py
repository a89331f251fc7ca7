from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper_async.reliability import Governor, GovernorConfig, Snapshot, is_out_of_memory


@pytest.mark.parametrize(
    ("loss", "verdict"),
    [
        pytest.param(1.0, None, id="normal"),
        pytest.param(9.9, None, id="high-but-below-factor"),
        pytest.param(10.1, "spike", id="spike"),
        pytest.param(math.nan, "non_finite", id="nan"),
        pytest.param(math.inf, "non_finite", id="inf"),
    ],
)
def test_judges_losses_against_the_recent_median(loss: float, verdict: str | None) -> None:
    governor = Governor(GovernorConfig(spike_factor=10.0, window=8, warmup=4))
    for value in (0.9, 1.0, 1.1, 1.0):
        governor.accept(value)
    assert governor.judge(loss) == verdict


def test_a_spike_must_also_clear_the_floor() -> None:
    governor = Governor(GovernorConfig(spike_factor=10.0, spike_floor=1.0, warmup=2))
    for value in (1e-6, 1e-6):
        governor.accept(value)
    assert governor.judge(1e-3) is None  # 1000x, but far below the floor: noise
    assert governor.judge(1.5) == "spike"


def test_no_spike_judgement_during_warmup() -> None:
    governor = Governor(GovernorConfig(warmup=4))
    governor.accept(1.0)
    assert governor.judge(1e6) is None
    assert governor.judge(math.nan) == "non_finite"


def test_refuses_a_snapshot_with_non_finite_parameters() -> None:
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    governor = Governor()
    assert governor.offer(Snapshot.take(0, model, opt, {}))
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    assert not governor.offer(Snapshot.take(1, model, opt, {}))
    assert governor.snapshot is not None and governor.snapshot.step == 0
    assert governor.snapshots_refused == 1


def test_rollback_budget_per_epoch() -> None:
    governor = Governor(GovernorConfig(max_rollbacks_per_epoch=2))
    assert governor.note_rollback() and governor.note_rollback()
    assert not governor.note_rollback()
    governor.new_epoch()
    assert governor.note_rollback()
    assert governor.rollbacks == 4


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda: torch.empty(1 << 60, dtype=torch.uint8), True, id="cpu-allocator"),
        pytest.param(lambda: torch.zeros(2) @ torch.zeros(3), False, id="shape-error"),
    ],
)
def test_recognises_out_of_memory(make: object, expected: bool) -> None:
    try:
        make()  # type: ignore[operator]
    except RuntimeError as exc:
        wrapped = ValueError("seed failed")
        wrapped.__cause__ = exc
        assert is_out_of_memory(wrapped) is expected
    else:
        raise AssertionError("expected an error")


def test_spikes_in_a_row_at_one_level_are_a_new_level_not_a_spike() -> None:
    governor = Governor(GovernorConfig(warmup=4, level_steps=3, level_spread=2.0))
    for value in (0.01, 0.012, 0.011, 0.01):
        governor.accept(value)
    assert [governor.judge(v) for v in (2.4, 3.1, 2.6)] == ["spike"] * 3
    assert not governor.new_level(2.4) and not governor.new_level(3.1)
    assert governor.new_level(2.6)  # the third in a row, all within 2x: the loss moved there
    assert governor.judge_part.levels == 1 and governor.warming_up  # judged afresh from it
    assert governor.judge(math.nan) == "non_finite"


@pytest.mark.parametrize(
    "losses",
    [
        pytest.param((20.0, 400.0, 8000.0), id="growing"),
        pytest.param((24.0, math.inf, 25.0), id="non-finite-among-them"),
    ],
)
def test_a_divergence_is_no_level(losses: tuple[float, ...]) -> None:
    governor = Governor(GovernorConfig(warmup=4, level_steps=3))
    for value in (1.0, 1.1, 0.9, 1.0):
        governor.accept(value)
    assert not any(governor.new_level(v) for v in losses)
    assert governor.judge(losses[-1]) is not None


def test_a_good_step_between_spikes_ends_the_run_of_spikes() -> None:
    governor = Governor(GovernorConfig(warmup=2, level_steps=3))
    governor.accept(0.1)
    governor.accept(0.1)
    assert not governor.new_level(5.0) and not governor.new_level(5.0)
    governor.accept(0.1)  # a rollback brought back a good step: those were spikes
    assert not governor.new_level(5.0)


def test_the_level_run_is_checkpointed() -> None:
    governor = Governor(GovernorConfig(warmup=2))
    governor.accept(0.1)
    governor.accept(0.1)
    governor.new_level(5.0)
    copy = Governor(GovernorConfig(warmup=2))
    copy.load_state_dict(governor.state_dict())
    assert copy.state_dict() == governor.state_dict() and copy.judge_part.spikes == [5.0]
