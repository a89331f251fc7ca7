"""Experiment loggers: the :class:`MetricLogger` protocol, and TensorBoard, Weights & Biases
and MLflow implementations.

A logger receives a handful of named scalars at a step (the :class:`~esper_async.Trainer` calls
it once per epoch, never on the training step's path) and is closed at the end of the run. A
logger that also has ``log_events`` (:class:`EventLogger`) gets the run's lifecycle transitions
(germinations, fossilizations, culls ...) as they happen. The three shipped loggers import their
package when built and raise :class:`TelemetryConfigError` naming the extra to install
(``pip install 'esper_async[wandb]'``, ``[mlflow]``, ``[tensorboard]``). Any other tracking
service plugs in with a few lines (see ``docs/telemetry.md``, "Experiment loggers").
"""

from __future__ import annotations

import importlib
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Protocol, runtime_checkable

from ..errors import TelemetryConfigError

__all__ = (
    "EventLogger",
    "LifecycleEvent",
    "MetricLogger",
    "MlflowLogger",
    "TensorBoardLogger",
    "WandbLogger",
)

#: Transitions counted as ``growth/<target>`` scalars (the ones the dashboard marks on curves).
_COUNTED: Final = ("germinated", "fossilized", "culled")
#: Columns of an event table, in order (the attributes of :class:`LifecycleEvent`).
_EVENT_COLUMNS: Final = ("epoch", "step", "slot", "source", "target", "reason")


@runtime_checkable
class MetricLogger(Protocol):
    """Something that records named scalars at a step: TensorBoard, W&B, MLflow, a CSV file."""

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` at ``step``.

        :param step: the global training step the figures belong to.
        :param scalars: figure name to value (finite floats).
        """
        ...

    def close(self) -> None:
        """Write out what is buffered and release resources (a later ``log_scalars`` may
        reopen them)."""
        ...


class LifecycleEvent(Protocol):
    """One lifecycle transition, as a logger reads it (:class:`esper_async.training.GrowthEvent`
    is one): the 0-based epoch and global step it happened at, the slot, the states before and
    after, and the reason with its figures."""

    @property
    def epoch(self) -> int: ...
    @property
    def step(self) -> int: ...
    @property
    def slot(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def reason(self) -> str: ...


@runtime_checkable
class EventLogger(MetricLogger, Protocol):
    """A :class:`MetricLogger` that also records lifecycle transitions."""

    def log_events(self, events: Sequence[LifecycleEvent]) -> None:
        """Record ``events`` (new since the last call, in order; each carries its own step).

        :param events: the transitions.
        """
        ...


def _import(module: str, who: str, extra: str) -> ModuleType:
    """``module``, or a :class:`TelemetryConfigError` that says which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TelemetryConfigError(
            f"{who} needs the {extra} package, which is not installed: pip install "
            f"'esper_async[{extra}]' (or pass a different logger)"
        ) from exc


def _event_line(event: LifecycleEvent) -> str:
    """``epoch 3 step 120 conv1: training -> culled (why)``: one transition as text."""
    return (
        f"epoch {event.epoch} step {event.step} {event.slot}: {event.source} -> "
        f"{event.target} ({event.reason})"
    )


class _Counts:
    """Cumulative counts of the :data:`_COUNTED` transitions, as ``growth/<target>`` scalars."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, events: Sequence[LifecycleEvent]) -> dict[str, float]:
        """Count ``events``; :returns: the counts that changed, by scalar name."""
        changed = {e.target for e in events if e.target in _COUNTED}
        self.counts.update(e.target for e in events if e.target in _COUNTED)
        return {f"growth/{t}": float(self.counts[t]) for t in sorted(changed)}


class TensorBoardLogger:
    """A :class:`MetricLogger` writing TensorBoard event files with
    ``torch.utils.tensorboard.SummaryWriter``.

    The writer is created at the first :meth:`log_scalars` (and again after :meth:`close`), so
    building the logger costs nothing. TensorBoard is not a dependency of esper_async: install
    it with ``pip install tensorboard``.

    :param log_dir: where the event files go (``tensorboard --logdir`` this directory).
    :param kwargs: more ``SummaryWriter`` options (``flush_secs``, ``comment`` ...).
    :raises TelemetryConfigError: ``tensorboard`` is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        try:
            module = importlib.import_module("torch.utils.tensorboard")
        except ImportError as exc:
            raise TelemetryConfigError(
                f"TensorBoardLogger({str(log_dir)!r}) needs the tensorboard package, which is "
                "not installed: pip install tensorboard (or 'esper_async[tensorboard]'; or pass "
                "a different logger)"
            ) from exc
        self._writer_type: Any = module.SummaryWriter
        self.log_dir = Path(log_dir)
        self._kwargs = kwargs
        self._writer: Any = None
        self._counts = _Counts()

    def _open(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_type(log_dir=str(self.log_dir), **self._kwargs)
        return self._writer

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Add each scalar under its name at ``step``.

        :param step: the global step (TensorBoard's x axis).
        :param scalars: figure name to value; ``/`` in a name groups figures in TensorBoard.
        """
        writer = self._open()
        for name, value in scalars.items():
            writer.add_scalar(name, value, global_step=step)

    def log_events(self, events: Sequence[LifecycleEvent]) -> None:
        """Write each transition as a text summary ``growth/events`` at its step (TensorBoard's
        Text tab; the tag is ``growth/events/text_summary`` in the event file), and the
        cumulative counts of germinations, fossilizations and culls as scalars
        ``growth/germinated``, ``growth/fossilized``, ``growth/culled`` (markers on the Scalars
        tab, at the step where they change).

        :param events: the transitions, in order.
        """
        writer = self._open()
        for event in events:
            writer.add_text("growth/events", _event_line(event), global_step=event.step)
            for name, value in self._counts.add([event]).items():
                writer.add_scalar(name, value, global_step=event.step)

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


class WandbLogger:
    """A :class:`MetricLogger` (and :class:`EventLogger`) writing to a Weights & Biases run.

    A run is started with ``wandb.init(**init_kwargs)`` at the first figures (so building the
    logger starts nothing) and finished at :meth:`close`: each fit is one W&B run. Pass
    ``run=`` to log into a run you started (several fits in one run) and will finish.
    Lifecycle transitions go to a ``growth/events`` table (epoch, step, slot, source, target,
    reason) and to the ``growth/<target>`` counts. Offline: ``mode="offline"`` (or
    ``WANDB_MODE=offline``) writes under ``dir`` for a later ``wandb sync``.

    :param run: a run from ``wandb.init()`` to log into (not finished by :meth:`close`).
    :param init_kwargs: ``wandb.init`` options (``project=``, ``name=``, ``mode=``, ``dir=``,
        ``config=`` ...); not together with ``run``.
    :raises TelemetryConfigError: ``wandb`` is not installed (``pip install
        'esper_async[wandb]'``), or both ``run`` and ``init_kwargs`` are given.
    """

    def __init__(self, *, run: Any = None, **init_kwargs: Any) -> None:
        self._wandb: Any = _import("wandb", "WandbLogger", "wandb")
        if run is not None and init_kwargs:
            raise TelemetryConfigError(
                f"WandbLogger(run=..., {', '.join(init_kwargs)}=...): give a run you started, "
                "or wandb.init options for the logger to start one, not both"
            )
        self._run: Any = run
        self._owns = run is None
        self._init_kwargs = init_kwargs
        self._rows: list[list[Any]] = []
        self._counts = _Counts()

    @property
    def run(self) -> Any:
        """The W&B run being logged into (``None`` before the first figures or after close)."""
        return self._run

    def _open(self) -> Any:
        if self._run is None:
            self._run = self._wandb.init(**self._init_kwargs)
            self._rows, self._counts = [], _Counts()  # a new run starts its table again
        return self._run

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """``run.log(scalars, step=step)``.

        :param step: the global step (W&B's ``_step``; it must not go back).
        :param scalars: figure name to value.
        """
        self._open().log(dict(scalars), step=step)

    def log_events(self, events: Sequence[LifecycleEvent]) -> None:
        """Log the ``growth/events`` table (every transition so far: W&B tables are replaced,
        not appended) and the changed ``growth/<target>`` counts, at the last event's step.

        :param events: the transitions, in order.
        """
        if not events:
            return
        run = self._open()
        self._rows += [[getattr(e, c) for c in _EVENT_COLUMNS] for e in events]
        table = self._wandb.Table(columns=list(_EVENT_COLUMNS), data=[list(r) for r in self._rows])
        figures: dict[str, Any] = {"growth/events": table, **self._counts.add(events)}
        run.log(figures, step=max(e.step for e in events))

    def close(self) -> None:
        """Finish the run the logger started (idempotent); a run passed in is left open.

        W&B's service process may write the last records out after ``finish()`` returns; it
        does by the time the program exits (or ``wandb.teardown()`` returns).
        """
        run, self._run = self._run, (None if self._owns else self._run)
        if run is not None and self._owns:
            run.finish()


class MlflowLogger:
    """A :class:`MetricLogger` (and :class:`EventLogger`) writing to an MLflow run through an
    explicit ``MlflowClient`` (MLflow's global active run is left alone).

    The run is created in ``experiment`` (made if missing) at the first figures, or ``run_id``
    is logged into; :meth:`close` marks a run it created finished (a later fit sets it running
    again and goes on). Lifecycle transitions go to the text artifact ``growth_events.txt`` (one
    line per transition, rewritten with every new one) and to the ``growth/<target>`` counts.

    Offline: a local file store, ``tracking_uri="file:///path/mlruns"``. MLflow 3 refuses its
    file store unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set (its ``sqlite:`` store needs the
    full ``mlflow`` package, not ``mlflow-skinny``); the error says so.

    :param tracking_uri: where runs go (default: MLflow's, from ``MLFLOW_TRACKING_URI``).
    :param experiment: the experiment's name (default ``"esper_async"``).
    :param run_name: the new run's name.
    :param run_id: an existing run to log into (not finished by :meth:`close`).
    :param tags: tags of the new run.
    :raises TelemetryConfigError: ``mlflow`` is not installed (``pip install
        'esper_async[mlflow]'``), or the tracking store cannot be opened.
    """

    #: The artifact the transitions are written to.
    EVENTS_ARTIFACT: Final = "growth_events.txt"

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str = "esper_async",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        tracking: Any = _import("mlflow.tracking", "MlflowLogger", "mlflow")
        self._entities: Any = _import("mlflow.entities", "MlflowLogger", "mlflow")
        try:
            self.client: Any = tracking.MlflowClient(tracking_uri=tracking_uri)
        except Exception as exc:  # MlflowException: a store it cannot open
            raise TelemetryConfigError(
                f"MlflowLogger cannot open the tracking store {tracking_uri!r}: {exc} (for a "
                "local file store set MLFLOW_ALLOW_FILE_STORE=true; or point tracking_uri at "
                "an MLflow server)"
            ) from exc
        self.experiment, self.run_name, self._tags = experiment, run_name, dict(tags or {})
        #: The run logged into (``None`` until the first figures, unless given).
        self.run_id = run_id
        self._owns = run_id is None
        self._open_now = False
        self._lines: list[str] = []
        self._counts = _Counts()

    def _open(self) -> str:
        if self.run_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(self.experiment)
            )
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self._tags)
            self.run_id = run.info.run_id
        elif self._owns and not self._open_now:  # a later fit: the finished run goes on
            self.client.update_run(self.run_id, status="RUNNING")
        self._open_now = True
        assert self.run_id is not None
        return self.run_id

    def _metrics(self, step: int, scalars: Mapping[str, float]) -> list[Any]:
        now = int(time.time() * 1000)
        return [self._entities.Metric(k, float(v), now, step) for k, v in scalars.items()]

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log each scalar as a metric at ``step`` (one batch request).

        :param step: the global step.
        :param scalars: figure name to value (``/`` is kept: MLflow groups by it).
        """
        run_id = self._open()
        self.client.log_batch(run_id, metrics=self._metrics(step, scalars))

    def log_events(self, events: Sequence[LifecycleEvent]) -> None:
        """Rewrite ``growth_events.txt`` with every transition so far and log the changed
        ``growth/<target>`` counts at the last event's step.

        :param events: the transitions, in order.
        """
        if not events:
            return
        run_id = self._open()
        self._lines += [_event_line(e) for e in events]
        self.client.log_text(run_id, "\n".join(self._lines) + "\n", self.EVENTS_ARTIFACT)
        counts = self._counts.add(events)
        if counts:
            step = max(e.step for e in events)
            self.client.log_batch(run_id, metrics=self._metrics(step, counts))

    def close(self) -> None:
        """Mark the run the logger created finished (idempotent); a given run is left as is."""
        if self._open_now and self._owns and self.run_id is not None:
            self.client.set_terminated(self.run_id)
        self._open_now = False
