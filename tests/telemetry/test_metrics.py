from __future__ import annotations

import enum
import time
from functools import partial
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from esper_async.telemetry import (
    ATTR_BLUEPRINT,
    ATTR_OUTCOME,
    ATTR_SEED_STATE,
    ATTR_SLOT,
    ATTR_STORE_HIT,
    METRIC_COMPILE_DURATION,
    METRIC_LOOP_LAG,
    METRIC_PARAMS,
    METRIC_PARAMS_ADDED,
    METRIC_SEEDS,
    METRIC_STEP_DURATION,
    METRIC_STORE_LOOKUPS,
    METRIC_TRAIN_LOSS,
    METRIC_VAL_ACC,
    METRIC_VAL_LOSS,
    Metrics,
    monitor_loop_lag,
)


class State(enum.Enum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def metrics(reader: InMemoryMetricReader) -> Metrics:
    return Metrics(MeterProvider(metric_readers=[reader]))


def test_compile_latency_is_a_histogram_by_blueprint_and_outcome(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    metrics.compile_finished(1.5, blueprint="conv3x3")
    metrics.compile_finished(2.5, blueprint="conv3x3")
    metrics.compile_finished(30.0, blueprint="mlp", outcome="timeout")
    points = {
        (p.attributes[ATTR_BLUEPRINT], p.attributes[ATTR_OUTCOME]): p
        for p in _points(reader, METRIC_COMPILE_DURATION)
    }
    assert points[("conv3x3", "ok")].count == 2
    assert points[("conv3x3", "ok")].sum == pytest.approx(4.0)
    assert points[("mlp", "timeout")].count == 1
    # Seconds-scale buckets, not the SDK's millisecond defaults.
    assert 1.0 in points[("mlp", "timeout")].explicit_bounds


def test_store_lookups_count_hits_and_misses(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    for hit in (True, True, False, True):
        metrics.store_lookup(hit=hit)
    counts = {p.attributes[ATTR_STORE_HIT]: p.value for p in _points(reader, METRIC_STORE_LOOKUPS)}
    assert counts == {True: 3, False: 1}


def test_seeds_by_state_follow_transitions(metrics: Metrics, reader: InMemoryMetricReader) -> None:
    for _ in range(3):
        metrics.seed_added(State.DORMANT)
    metrics.seed_transition(State.DORMANT, State.GERMINATED)
    metrics.seed_transition(State.GERMINATED, "TRAINING")
    metrics.seed_transition(State.DORMANT, State.GERMINATED)
    by_state = {p.attributes[ATTR_SEED_STATE]: p.value for p in _points(reader, METRIC_SEEDS)}
    assert by_state == {"DORMANT": 1, "GERMINATED": 1, "TRAINING": 1}


def test_step_time_and_params_added(metrics: Metrics, reader: InMemoryMetricReader) -> None:
    for seconds in (0.002, 0.004, 0.003):
        metrics.step_finished(seconds)
    metrics.params_added(1200, slot="l1", blueprint="conv3x3")
    metrics.params_added(300, slot="l1", blueprint="conv3x3")
    (step,) = _points(reader, METRIC_STEP_DURATION)
    assert step.count == 3
    assert step.sum == pytest.approx(0.009)
    (params,) = _points(reader, METRIC_PARAMS_ADDED)
    assert params.value == 1500
    assert params.attributes[ATTR_SLOT] == "l1"


def test_params_added_rejects_a_negative_count(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        metrics.params_added(-5)


@pytest.mark.asyncio
async def test_loop_lag_monitor_sees_a_blocked_loop(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(monitor_loop_lag, metrics, interval_s=0.01))
        await anyio.sleep(0.03)
        time.sleep(0.2)  # noqa: ASYNC251 -- block the event loop on purpose
        await anyio.sleep(0.03)
        tg.cancel_scope.cancel()
    (lag,) = _points(reader, METRIC_LOOP_LAG)
    assert lag.count >= 2
    assert lag.max >= 0.15  # the blocked wake-up is in there
    assert lag.min >= 0.0


@pytest.mark.asyncio
async def test_loop_lag_monitor_uses_the_injected_clock(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    ticks = [0.0, 0.5, 1.0, 1.05]  # first sample 0.499 s late, second 0.049 s
    two_samples_taken = anyio.Event()

    def clock() -> float:
        if ticks:
            return ticks.pop(0)
        two_samples_taken.set()  # the monitor asks for the start of a third sample
        return 2.0

    async with anyio.create_task_group() as tg:
        await tg.start(partial(monitor_loop_lag, metrics, interval_s=0.001, clock=clock))
        await two_samples_taken.wait()
        tg.cancel_scope.cancel()
    (lag,) = _points(reader, METRIC_LOOP_LAG)
    assert lag.count == 2
    assert lag.max == pytest.approx(0.499)
    assert lag.min == pytest.approx(0.049)


@pytest.mark.asyncio
async def test_loop_lag_monitor_rejects_a_zero_interval(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="positive"):
        await monitor_loop_lag(metrics, interval_s=0)


def test_seeds_never_go_below_zero_when_seeds_were_not_announced(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    # The Trainer reports transitions only (no seed_added): the figure must not go negative.
    metrics.seed_transition("dormant", "germinated")
    metrics.seed_transition("germinated", "training")
    metrics.seed_transition("dormant", "germinated")
    by_state = {p.attributes[ATTR_SEED_STATE]: p.value for p in _points(reader, METRIC_SEEDS)}
    assert min(by_state.values()) >= 0
    assert by_state["training"] == 1 and by_state["germinated"] == 1
    assert by_state.get("dormant", 0) == 0
    assert metrics.seed_counts() == {"germinated": 1, "training": 1}


def test_epoch_figures_are_gauges_skipping_missing_and_non_finite(
    metrics: Metrics, reader: InMemoryMetricReader
) -> None:
    metrics.epoch_finished(train_loss=0.9, val_loss=0.8, val_acc=0.7, params=123)
    metrics.epoch_finished(train_loss=None, val_loss=float("nan"), val_acc=0.75, params=130)
    values = {
        name: [p.value for p in _points(reader, name)]
        for name in (METRIC_TRAIN_LOSS, METRIC_VAL_LOSS, METRIC_VAL_ACC, METRIC_PARAMS)
    }
    assert values == {
        METRIC_TRAIN_LOSS: [0.9],
        METRIC_VAL_LOSS: [0.8],
        METRIC_VAL_ACC: [0.75],
        METRIC_PARAMS: [130],
    }
