"""The run's metrics: a small facade over the instruments of the run's ``MeterProvider``.

One :class:`Metrics` per run, built on the provider the run's :class:`Telemetry` owns (never the
global one). Durations are in seconds, with bucket boundaries chosen for each figure: a compile
takes seconds, a training step milliseconds, loop lag should stay under a millisecond.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus
from opentelemetry.metrics import MeterProvider

from ._attributes import (
    ATTR_BLUEPRINT,
    ATTR_OUTCOME,
    ATTR_SEED_STATE,
    ATTR_SLOT,
    ATTR_STORE_HIT,
    ATTR_STORE_TIER,
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
)

__all__ = ("Metrics", "monitor_loop_lag")

#: Compile latency buckets (s): torch.export of a small block takes ~1 s on one CPU core,
#: an Inductor compile 10-20 s.
_COMPILE_BUCKETS_S: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
#: Step time buckets (s): from a tiny CPU step (~0.1 ms) to a slow one (1 s).
_STEP_BUCKETS_S: Final = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
#: Loop lag buckets (s): under 1 ms is healthy, 10 ms and more means something blocks the loop.
_LAG_BUCKETS_S: Final = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)

_SCOPE: Final = "esper_async"


def _state_name(state: Any) -> str:
    return state.name if hasattr(state, "name") else str(state)


class Metrics:
    """Counters and histograms of one run.

    ========================== ============== ===== =========================================
    instrument                 kind           unit  attributes
    ========================== ============== ===== =========================================
    ``esper.compile.duration`` histogram      s     ``esper.blueprint``, ``esper.outcome``
    ``esper.store.lookups``    counter        1     ``esper.store.hit``, ``esper.store.tier``
    ``esper.seeds``            up-down counter 1    ``esper.seed.state``
    ``esper.step.duration``    histogram      s     --
    ``esper.loop.lag``         histogram      s     --
    ``esper.params.added``     counter        1     ``esper.slot``, ``esper.blueprint``
    ``esper.epoch.train_loss`` gauge          1     --
    ``esper.epoch.val_loss``   gauge          1     --
    ``esper.epoch.val_acc``    gauge          1     --
    ``esper.params``           gauge          1     --
    ========================== ============== ===== =========================================

    The seeds-by-state figure never goes below zero: a transition out of a state that holds no
    counted seed (a seed that was never announced with :meth:`seed_added`) only counts the seed
    into its new state.

    :param meter_provider: the run's meter provider.
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        meter = meter_provider.get_meter(_SCOPE)
        self._compile = meter.create_histogram(
            METRIC_COMPILE_DURATION,
            unit="s",
            description="Time to turn a blueprint into a validated kernel",
            explicit_bucket_boundaries_advisory=_COMPILE_BUCKETS_S,
        )
        self._store = meter.create_counter(
            METRIC_STORE_LOOKUPS, unit="1", description="Kernel store lookups, by hit or miss"
        )
        self._seeds = meter.create_up_down_counter(
            METRIC_SEEDS, unit="1", description="Seeds in each lifecycle state"
        )
        self._step = meter.create_histogram(
            METRIC_STEP_DURATION,
            unit="s",
            description="Wall time of one training step",
            explicit_bucket_boundaries_advisory=_STEP_BUCKETS_S,
        )
        self._lag = meter.create_histogram(
            METRIC_LOOP_LAG,
            unit="s",
            description="How late the event loop woke a sleeping task",
            explicit_bucket_boundaries_advisory=_LAG_BUCKETS_S,
        )
        self._params = meter.create_counter(
            METRIC_PARAMS_ADDED, unit="1", description="Parameters added to the model by growth"
        )
        self._train_loss = meter.create_gauge(
            METRIC_TRAIN_LOSS, unit="1", description="Mean training loss of the last epoch"
        )
        self._val_loss = meter.create_gauge(
            METRIC_VAL_LOSS, unit="1", description="Validation loss after the last epoch"
        )
        self._val_acc = meter.create_gauge(
            METRIC_VAL_ACC, unit="1", description="Validation accuracy after the last epoch"
        )
        self._param_count = meter.create_gauge(
            METRIC_PARAMS, unit="1", description="Trainable parameters of the model"
        )
        self._seed_counts: Counter[str] = Counter()

    def compile_finished(
        self, duration_s: float, *, blueprint: str | None = None, outcome: str = "ok"
    ) -> None:
        """Record one compile's latency.

        :param duration_s: wall time from request to validated kernel (or failure).
        :param blueprint: the blueprint's name.
        :param outcome: ``ok``, ``error``, ``timeout``, ``invalid`` ...
        """
        attrs: dict[str, str] = {ATTR_OUTCOME: outcome}
        if blueprint is not None:
            attrs[ATTR_BLUEPRINT] = blueprint
        self._compile.record(duration_s, attrs)

    def store_lookup(self, *, hit: bool, tier: str | None = None) -> None:
        """Count one kernel-store lookup.

        :param hit: whether the kernel was found.
        :param tier: which tier answered (``memory``, ``disk``), for hits.
        """
        attrs: dict[str, str | bool] = {ATTR_STORE_HIT: hit}
        if tier is not None:
            attrs[ATTR_STORE_TIER] = tier
        self._store.add(1, attrs)

    def seed_added(self, state: Any) -> None:
        """Count a seed that came into being in ``state`` (usually ``DORMANT``).

        :param state: a lifecycle state (an enum, whose name is used, or a string).
        """
        name = _state_name(state)
        self._seed_counts[name] += 1
        self._seeds.add(1, {ATTR_SEED_STATE: name})

    def seed_transition(self, source: Any, target: Any) -> None:
        """Move one seed from ``source`` to ``target`` in the seeds-by-state figure.

        A seed that was not counted in ``source`` (never announced with :meth:`seed_added`) is
        only counted into ``target``: no state's count goes below zero.

        :param source: the state it left.
        :param target: the state it entered.
        """
        left, entered = _state_name(source), _state_name(target)
        if self._seed_counts[left] > 0:
            self._seed_counts[left] -= 1
            self._seeds.add(-1, {ATTR_SEED_STATE: left})
        self._seed_counts[entered] += 1
        self._seeds.add(1, {ATTR_SEED_STATE: entered})

    def seed_counts(self) -> dict[str, int]:
        """The seeds counted in each state (states with none left out).

        :returns: state name to count.
        """
        return {state: n for state, n in self._seed_counts.items() if n > 0}

    def epoch_finished(
        self,
        *,
        train_loss: float | None,
        val_loss: float | None,
        val_acc: float | None,
        params: int | None = None,
    ) -> None:
        """Record one epoch's figures as gauges (non-finite and missing values are skipped).

        :param train_loss: mean training loss of the epoch.
        :param val_loss: validation loss.
        :param val_acc: validation accuracy.
        :param params: the model's trainable parameters.
        """
        for gauge, value in (
            (self._train_loss, train_loss),
            (self._val_loss, val_loss),
            (self._val_acc, val_acc),
            (self._param_count, params),
        ):
            if value is not None and math.isfinite(value):
                gauge.set(value)

    def step_finished(self, duration_s: float) -> None:
        """Record one training step's wall time.

        :param duration_s: seconds.
        """
        self._step.record(duration_s)

    def loop_lag(self, lag_s: float) -> None:
        """Record one loop-lag sample.

        :param lag_s: seconds the loop was late (negative values are recorded as 0).
        """
        self._lag.record(max(lag_s, 0.0))

    def params_added(
        self, count: int, *, slot: str | None = None, blueprint: str | None = None
    ) -> None:
        """Count parameters added by a graft or a surgery.

        :param count: number of new trainable parameters (elements, not tensors).
        :param slot: the slot that grew.
        :param blueprint: the blueprint grafted.
        :raises ValueError: when ``count`` is negative (removal is not growth).
        """
        if count < 0:
            raise ValueError(f"params_added takes a non-negative count, got {count}")
        attrs: dict[str, str] = {}
        if slot is not None:
            attrs[ATTR_SLOT] = slot
        if blueprint is not None:
            attrs[ATTR_BLUEPRINT] = blueprint
        self._params.add(count, attrs)


async def monitor_loop_lag(
    metrics: Metrics,
    *,
    interval_s: float = 0.25,
    clock: Callable[[], float] = time.perf_counter,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Sample event-loop lag forever: sleep ``interval_s`` and record how late the wake-up was.

    Start it in the run's task group with ``await tg.start(monitor_loop_lag, metrics)`` (wrap it
    in ``functools.partial`` for the keyword options); it reports readiness at once and ends when
    its task group is cancelled.

    :param metrics: where the samples go.
    :param interval_s: time between samples.
    :param clock: a monotonic clock in seconds (injectable for tests).
    :param task_status: set by ``TaskGroup.start``.
    :raises ValueError: when ``interval_s`` is not positive.
    """
    if interval_s <= 0:
        raise ValueError(f"loop-lag interval must be positive, got {interval_s}")
    task_status.started()
    while True:
        before = clock()
        await anyio.sleep(interval_s)
        metrics.loop_lag(clock() - before - interval_s)
