"""Tests of the PerformanceTracker: statistics, windows, discounting and persistence."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper_async.errors import SelectionError
from esper_async.selection import PerformanceTracker, SeedOutcome


class FakeClock:
    """A settable clock: tests advance time without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_contribution_is_loss_without_minus_loss_with() -> None:
    tracker = PerformanceTracker()
    got = tracker.record_contribution(
        "b1", "bp-x", loss_with=0.40, loss_without=0.55, acc_with=0.9, acc_without=0.8
    )
    assert got == pytest.approx(0.15)
    pair = tracker.pair("b1", "bp-x")
    assert pair is not None
    assert pair.window_contribution == pytest.approx(0.15)
    assert pair.window_accuracy_delta == pytest.approx(0.1)
    assert pair.observations == 1


def test_window_keeps_only_the_latest_observations() -> None:
    tracker = PerformanceTracker(window=3, discount=1.0)
    for c in [10.0, 1.0, 2.0, 3.0]:
        tracker.record_contribution("s", "bp", loss_with=0.0, loss_without=c)
    pair = tracker.pair("s", "bp")
    assert pair is not None
    assert pair.window_contribution == pytest.approx(2.0)
    assert pair.discounted_contribution == pytest.approx(4.0)  # discount 1: mean of all
    assert pair.observations == 4


def test_discounted_mean_weighs_recent_observations_more() -> None:
    tracker = PerformanceTracker(discount=0.5)
    for c in [1.0, 0.0]:
        tracker.record_contribution("s", "bp", loss_with=0.0, loss_without=c)
    pair = tracker.pair("s", "bp")
    assert pair is not None
    assert pair.discounted_contribution == pytest.approx((0.5 * 1.0 + 0.0) / (0.5 + 1.0))


def test_outcomes_costs_and_clock() -> None:
    clock = FakeClock()
    tracker = PerformanceTracker(clock=clock)
    tracker.record_outcome("s", "bp", "fossilized", loss_before=1.0, loss_after=0.6)
    clock.now = 1234.5
    tracker.record_outcome("s", "bp", SeedOutcome.CULLED, loss_before=0.6, loss_after=0.7)
    tracker.record_cost("s", "bp", latency_ms=2.0, memory_bytes=100, param_count=50)
    tracker.record_cost("s", "bp", latency_ms=4.0, memory_bytes=80)
    pair = tracker.pair("s", "bp")
    assert pair is not None
    assert (pair.lives, pair.fossilized, pair.culled, pair.fossilize_rate) == (2, 1, 1, 0.5)
    assert pair.mean_loss_improvement == pytest.approx((0.4 - 0.1) / 2)
    assert pair.mean_latency_ms == pytest.approx(3.0)
    assert pair.peak_memory_bytes == 100 and pair.param_count == 50
    assert pair.last_updated == 1234.5
    assert pair.window_contribution is None and pair.observations == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda t: t.record_contribution("s", "b", loss_with=float("nan"), loss_without=1.0),
            "loss_with .* must be finite",
            id="nan-loss",
        ),
        pytest.param(
            lambda t: t.record_contribution(
                "s", "b", loss_with=1.0, loss_without=1.0, acc_with=1.0
            ),
            "both acc_with and acc_without",
            id="one-accuracy",
        ),
        pytest.param(
            lambda t: t.record_outcome("s", "b", "pruned", loss_before=1.0, loss_after=0.5),
            "unknown seed outcome 'pruned'; use one of fossilized, culled",
            id="bad-outcome",
        ),
        pytest.param(
            lambda t: t.record_cost("s", "b", memory_bytes=-1), "must be >= 0", id="negative-cost"
        ),
    ],
)
def test_bad_records_are_refused(call, match: str) -> None:
    tracker = PerformanceTracker()
    with pytest.raises(SelectionError, match=match):
        call(tracker)


@pytest.mark.parametrize(
    ("window", "discount"),
    [
        pytest.param(0, 0.9, id="window-0"),
        pytest.param(5, 0.0, id="discount-0"),
        pytest.param(5, 1.5, id="discount-1.5"),
    ],
)
def test_bad_settings_are_refused(window: int, discount: float) -> None:
    with pytest.raises(SelectionError):
        PerformanceTracker(window=window, discount=discount)


records = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["bp-1", "bp-2"]),
        st.floats(-10, 10),
        st.floats(-10, 10),
        st.sampled_from(["fossilized", "culled", None]),
        st.one_of(st.none(), st.integers(0, 10**6)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(records=records, window=st.integers(1, 8), discount=st.floats(0.1, 1.0))
def test_persistence_round_trip(tmp_path_factory, records, window: int, discount: float) -> None:
    path = tmp_path_factory.mktemp("tracker") / "tracker.json"
    tracker = PerformanceTracker(window=window, discount=discount, clock=FakeClock())
    for slot, bp, a, b, outcome, params in records:
        tracker.record_contribution(
            slot, bp, loss_with=a, loss_without=b, acc_with=b, acc_without=a
        )
        if outcome is not None:
            tracker.record_outcome(slot, bp, outcome, loss_before=a, loss_after=b)
        tracker.record_cost(slot, bp, param_count=params, memory_bytes=params)
    tracker.save(path)
    restored = PerformanceTracker.load(path, clock=FakeClock())
    assert restored.state_dict() == tracker.state_dict()
    assert restored.summary() == tracker.summary()
    # The restored tracker keeps counting where the original left off.
    for t in (tracker, restored):
        t.record_contribution("a", "bp-1", loss_with=0.0, loss_without=1.0)
    assert restored.summary() == tracker.summary()


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path) -> None:
    path = tmp_path / "tracker.json"
    tracker = PerformanceTracker()
    tracker.save(path)
    tracker.record_contribution("s", "bp", loss_with=0.1, loss_without=0.2)
    tracker.save(path)
    assert os.listdir(tmp_path) == ["tracker.json"]
    assert json.loads(path.read_text())["pairs"][0]["slot"] == "s"


def test_save_into_a_missing_folder_fails_clearly(tmp_path) -> None:
    with pytest.raises(SelectionError, match="could not save the tracker"):
        PerformanceTracker().save(tmp_path / "nope" / "tracker.json")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(None, "could not load", id="missing"),
        pytest.param("{not json", "could not load", id="corrupt"),
        pytest.param('{"version": 99}', "version 99 is not supported", id="version"),
        pytest.param('{"version": 1, "window": 3}', "malformed tracker state", id="truncated"),
        pytest.param("[1, 2]", "does not hold a tracker state", id="not-a-mapping"),
    ],
)
def test_load_refuses_bad_files(tmp_path, content: str | None, match: str) -> None:
    path = tmp_path / "tracker.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SelectionError, match=match):
        PerformanceTracker.load(path)
