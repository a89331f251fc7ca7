"""``RunOutputs``: what a :class:`~esper_async.Trainer`'s fit writes besides the model.

A trace in a run directory (``run_dir=``), a kernel store for the default compiler (``store=``),
the loop-lag monitor, and experiment loggers called at epoch ends (``loggers=``). Each is opened
for one fit and closed when it returns or raises, so nothing stays open between fits and a
cancelled fit's last spans are still written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ..control import EpochReport
from ..errors import TelemetryConfigError
from ..telemetry import EventLogger, MetricLogger, Telemetry, TelemetryConfig, monitor_loop_lag

if TYPE_CHECKING:  # the store (and SQLite) load only when a store is used
    from ..store import KernelStore
    from ._grower import Grower

__all__ = ("LOOP_LAG_INTERVAL_S", "RunOutputs", "epoch_scalars")

log = structlog.get_logger(__name__)

#: Default period of the loop-lag monitor (s): one wake-up every quarter second costs nothing.
LOOP_LAG_INTERVAL_S = 0.25


def epoch_scalars(report: EpochReport, params: int) -> dict[str, float]:
    """One epoch's figures as the loggers get them: ``epoch``, ``train/loss``, ``val/loss``,
    ``val/<metric>`` for each of the task's metrics, and ``params``; missing or non-finite
    figures are left out.

    :param report: the epoch's report.
    :param params: the model's trainable parameters after the epoch.
    :returns: figure name to value.
    """
    figures: dict[str, float | None] = {
        "epoch": float(report.epoch), "train/loss": report.train_loss,
        "val/loss": report.val_loss, "params": float(params),
    }
    for name, value in report.metrics.items():
        figures[f"val/{name}"] = value
    return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(v)}


class RunOutputs:
    """The outputs of a trainer's fits (see the module doc).

    :param run_dir: a directory where every fit writes its trace (``spans-run-<pid>.jsonl``,
        ``metrics-run-<pid>.jsonl``; ``esper-async trace RUN_DIR --html`` reads it), built with
        ``telemetry_config``; flushed and closed when the fit returns or raises. ``None``:
        nothing is written to disk (spans are made and dropped) unless a telemetry says so.
    :param telemetry_config: export settings of the ``run_dir`` trace (default
        :class:`TelemetryConfig`: JSONL, OTLP when the ``OTEL_EXPORTER_OTLP_*`` variables say so).
    :param store: the default compiler's kernel store: a directory (opened for each fit and
        closed after it) or a :class:`KernelStore` you opened. ``None``: every kernel is compiled.
    :param loggers: experiment loggers (:class:`~esper_async.telemetry.MetricLogger`), given each
        epoch's figures at its end (``epoch``, ``train/loss``, ``val/loss``, ``val/<metric>``,
        ``params``, at the global step) and, for an
        :class:`~esper_async.telemetry.EventLogger`, the epoch's lifecycle transitions; closed
        at the end of the fit. A logger that raises is warned about and training goes on.
    :param loop_lag_interval_s: period of the loop-lag monitor a fit runs beside training
        (``esper.loop.lag``); ``None`` runs none.
    :param telemetry_given, compiler_given: whether the trainer was handed its own.

    :raises ValueError: ``run_dir`` with a given telemetry, ``store`` with a given compiler, or a
        ``loop_lag_interval_s`` that is not positive.
    """

    def __init__(
        self, *, run_dir: str | os.PathLike[str] | None,
        telemetry_config: TelemetryConfig | None,
        store: str | os.PathLike[str] | KernelStore | None, loggers: Sequence[MetricLogger],
        loop_lag_interval_s: float | None, telemetry_given: bool, compiler_given: bool,
    ) -> None:
        if run_dir is not None and telemetry_given:
            raise ValueError(
                "give Trainer a run_dir or a telemetry, not both: a Telemetry made with "
                "Telemetry.create(run_dir=...) writes there already"
            )
        if store is not None and compiler_given:
            raise ValueError(
                "Trainer(store=...) is the default compiler's store: with your own compiler, "
                "pass BlueprintCompiler(store=...) instead"
            )
        if loop_lag_interval_s is not None and not loop_lag_interval_s > 0:
            raise ValueError(
                f"loop_lag_interval_s must be a positive number of seconds or None, "
                f"got {loop_lag_interval_s}"
            )
        #: The directory each fit's trace is written to (``None``: none).
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.telemetry_config = telemetry_config or TelemetryConfig()
        self._owned_store: KernelStore | None = None
        if store is not None and isinstance(store, str | os.PathLike):
            from ..store import KernelStore

            self._owned_store = KernelStore(store)
        #: The default compiler's kernel store (``None``: none).
        self.store: KernelStore | None = self._owned_store or (
            None if store is None or isinstance(store, str | os.PathLike) else store
        )
        self.own_compiler = not compiler_given
        self.loggers: list[MetricLogger] = list(loggers)
        self._grower: Grower | None = None
        self._events_logged = 0
        self.loop_lag_interval_s = loop_lag_interval_s

    async def open(self, stack: AsyncExitStack, trainer: Any) -> None:
        """Open what a fit writes to, each closed by ``stack`` (also when the fit raises): the
        owned kernel store, the ``run_dir`` telemetry (flushed and shut down), the loggers.

        :param trainer: the trainer whose (and whose grower's and compiler's) telemetry is set.
        :raises TelemetryConfigError: ``run_dir`` cannot be created.
        """
        if self._owned_store is not None and trainer.grow:
            await stack.enter_async_context(self._owned_store)
        stack.callback(self._close_loggers)
        if self.run_dir is None:
            stack.push_async_callback(_flush, trainer.telemetry)
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TelemetryConfigError(
                f"cannot write the trace into run_dir {str(self.run_dir)!r}: {exc}; "
                "give Trainer(run_dir=...) a directory you can write"
            ) from exc
        quiet = trainer.telemetry
        self._use(trainer, Telemetry.create(run_dir=self.run_dir, config=self.telemetry_config))

        async def close() -> None:
            telemetry = trainer.telemetry
            self._use(trainer, quiet)
            await telemetry.aclose()  # shielded: a cancelled fit's last spans are written

        stack.push_async_callback(close)

    def _use(self, trainer: Any, telemetry: Telemetry) -> None:
        trainer.grower.use_telemetry(telemetry, compiler=self.own_compiler)

    async def start(self, grower: Grower) -> None:
        """Start the loop-lag monitor in ``grower``'s task group (cancelled when it closes);
        the loggers get the lifecycle transitions the grower records from now on."""
        self._grower, self._events_logged = grower, len(grower.result.events)
        if self.loop_lag_interval_s is not None:
            await grower.start_background(partial(
                monitor_loop_lag, grower.telemetry.metrics, interval_s=self.loop_lag_interval_s,
            ))

    def log_epoch(self, report: EpochReport, step: int, params: int) -> None:
        """Give the loggers the epoch's figures (between epochs, never on the step's path)."""
        if not self.loggers:
            return
        scalars = epoch_scalars(report, params)
        events = [] if self._grower is None else self._grower.result.events
        fresh, self._events_logged = events[self._events_logged :], len(events)
        for logger in self.loggers:
            try:
                if fresh and isinstance(logger, EventLogger):  # before the figures: W&B's step
                    logger.log_events(fresh)  # must not go back
                logger.log_scalars(step, scalars)
            except Exception as exc:  # a logger must never end the run
                log.warning("logger failed", logger=type(logger).__name__, error=repr(exc),
                            epoch=report.epoch)

    def _close_loggers(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:
                log.warning("logger failed to close", logger=type(logger).__name__,
                            error=repr(exc))


async def _flush(telemetry: Telemetry) -> None:
    """Export the fit's last spans and metrics (shielded from cancellation)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(telemetry.force_flush)
