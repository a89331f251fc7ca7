from __future__ import annotations

import pytest

from esper_async.reliability import BreakerBoard, BreakerConfig, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CONFIG = BreakerConfig(threshold=3, window_s=60.0, cooldown_s=30.0, max_cooldown_s=100.0)


def test_opens_at_the_threshold_and_refuses_until_the_cooldown_ends() -> None:
    clock = Clock()
    breaker = CircuitBreaker("bp", CONFIG, clock=clock)
    for _ in range(2):
        breaker.record_failure("boom")
        assert breaker.allow()
    breaker.record_failure("boom")
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    assert breaker.retry_after() == pytest.approx(30.0)
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # others wait for it


@pytest.mark.parametrize(
    ("trial_succeeds", "state", "next_cooldown"),
    [
        pytest.param(True, BreakerState.CLOSED, 0.0, id="trial-succeeds-closes"),
        pytest.param(False, BreakerState.OPEN, 60.0, id="trial-fails-reopens-longer"),
    ],
)
def test_half_open_trial_decides(
    trial_succeeds: bool, state: BreakerState, next_cooldown: float
) -> None:
    clock = Clock()
    breaker = CircuitBreaker("bp", CONFIG, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 31
    assert breaker.allow()
    if trial_succeeds:
        breaker.record_success()
    else:
        breaker.record_failure()
    assert breaker.state is state
    assert breaker.retry_after() == pytest.approx(next_cooldown)


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    breaker = CircuitBreaker("bp", CONFIG, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 61
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_cooldown_is_capped() -> None:
    clock = Clock()
    breaker = CircuitBreaker("bp", CONFIG, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    for _ in range(5):
        clock.now += breaker.retry_after() + 0.01
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.retry_after() == pytest.approx(100.0)


def test_board_keeps_one_breaker_per_key_and_round_trips_its_state() -> None:
    clock = Clock()
    board = BreakerBoard(CONFIG, clock=clock)
    for _ in range(3):
        board["a"].record_failure()
    board["b"].record_failure()
    assert board.open_keys() == ["a"]
    assert not board.allow("a") and board.allow("b")
    clock.now += 10
    state = board.state_dict()
    other_clock = Clock()
    other_clock.now = 5.0  # another process: another clock origin
    restored = BreakerBoard(CONFIG, clock=other_clock)
    restored.load_state_dict(state)
    assert restored.open_keys() == ["a"]
    assert restored["a"].retry_after() == pytest.approx(20.0)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="threshold"):
        BreakerConfig(threshold=0)
