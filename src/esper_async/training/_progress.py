"""``FitProgress``: what :meth:`~esper_async.Trainer.fit` shows while it trains.

Four modes, chosen with ``Trainer(progress=...)``:

* ``"bar"``: a live `rich <https://rich.readthedocs.io>`_ progress bar on standard error (epoch,
  steps, running loss, last validation figures, elapsed and remaining time), with one line per
  epoch printed above it;
* ``"lines"``: one plain line per epoch on standard error, for logs and pipes;
* ``"off"``: nothing;
* ``"auto"`` (the default): ``"bar"`` when standard error is a terminal, ``"lines"`` when it is
  not, and ``"off"`` on every rank but 0 of an initialised ``torch.distributed`` group.

This is the one thing the library writes to a stream by itself; its logs go through
``logging``/structlog and stay silent until configured. Code that embeds esper_async (a service,
a test) passes ``progress="off"``. The display runs no thread: the bar is redrawn from the
training step at most every :data:`REFRESH_S` seconds.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Literal, get_args

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..control import EpochReport
from ..errors import TelemetryConfigError
from ._results import GrowthEvent

__all__ = ("REFRESH_S", "FitProgress", "ProgressMode", "check_progress", "epoch_line")

#: How ``Trainer(progress=...)`` shows a fit (see the module doc).
ProgressMode = Literal["auto", "bar", "lines", "off"]
_MODES: Final = get_args(ProgressMode)
#: Least seconds between two redraws of the bar: a terminal cannot show more, and a redraw costs
#: about a millisecond, which a step of a tiny model must not pay every time.
REFRESH_S: Final = 0.1


def check_progress(mode: object) -> ProgressMode:
    """``mode`` if it is a progress mode (``False`` is ``"off"``, ``True`` is ``"auto"``).

    :param mode: what was passed as ``Trainer(progress=...)``.
    :returns: the mode.
    :raises TelemetryConfigError: ``mode`` is not one of the modes.
    """
    if mode is True or mode is False:
        return "auto" if mode else "off"
    if mode not in _MODES:
        raise TelemetryConfigError(
            f"Trainer(progress={mode!r}) is not a progress mode: use 'auto' (a bar on a "
            "terminal, one line per epoch otherwise), 'bar', 'lines' or 'off'"
        )
    return mode  # type: ignore[return-value]


def _other_rank() -> bool:
    """Whether this process is a rank other than 0 of an initialised process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _stderr_is_terminal() -> bool:
    """Whether standard error is an interactive terminal that can redraw a line."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") not in ("dumb", "unknown")


def _figure(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def epoch_line(
    report: EpochReport,
    epochs: int,
    params: int,
    events: Sequence[GrowthEvent],
    seconds: float | None = None,
    label: str | None = None,
) -> str:
    """One epoch's line: ``epoch 3/40  train loss 0.4123  val loss 0.3990  accuracy 0.9120
    params 1,394  1.2 s  growth: conv1 germinated``.

    The epoch is counted as the CLI's progress counts it: ``report.epoch + 1`` of ``epochs``
    (epochs and events are 0-based in :class:`FitResult` and in the trace).

    :param report: the epoch's report.
    :param epochs: the fit's epochs.
    :param params: trainable parameters after the epoch.
    :param events: the lifecycle transitions of this epoch.
    :param seconds: the epoch's wall seconds, if known.
    :param label: the run's label, put first when given.
    :returns: the line, without a newline.
    """
    parts = [] if label is None else [label]
    parts += [
        f"epoch {report.epoch + 1}/{epochs}",
        f"train loss {_figure(report.train_loss)}",
        f"val loss {_figure(report.val_loss)}",
    ]
    parts += [f"{name.replace('_', ' ')} {_figure(v)}" for name, v in report.metrics.items()]
    parts.append(f"params {params:,}")
    if report.dropped:
        parts.append(f"dropped {report.dropped}")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    if events:
        parts.append("growth: " + ", ".join(f"{e.slot} {e.target}" for e in events))
    return "  ".join(parts)


class FitProgress:
    """The progress display of one fit (a context manager: closed when the fit ends).

    :param mode: a :data:`ProgressMode`.
    :param epochs: the fit's epochs (``fit(epochs=...)``).
    :param first_epoch: the epoch the fit starts at (later than 0 when it resumed).
    :param steps_per_epoch: training batches per epoch (``0``: unknown; the bar has no total).
    :param label: the run's label, shown first.
    :param console: where to draw (default: a rich console on standard error).
    :param clock: seconds, monotonic (injectable for tests).
    :raises TelemetryConfigError: ``mode`` is not a progress mode.
    """

    def __init__(
        self,
        mode: ProgressMode = "off",
        *,
        epochs: int = 0,
        first_epoch: int = 0,
        steps_per_epoch: int = 0,
        label: str | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        events_seen: int = 0,
    ) -> None:
        mode = check_progress(mode)
        if mode == "auto":
            # rich's own test also says yes under FORCE_COLOR (set by some CI services), where a
            # redrawn bar would fill the log: the default console asks the stream itself.
            terminal = (
                console.is_terminal and not console.is_dumb_terminal
                if console is not None
                else _stderr_is_terminal()
            )
            mode = "off" if _other_rank() else "bar" if terminal else "lines"
        self.console = console or Console(stderr=True, highlight=False)
        #: The mode in use (``"auto"`` resolved).
        self.mode: ProgressMode = mode
        self.epochs, self.label, self._clock = epochs, label, clock
        self._events_seen = events_seen  # a resumed fit's earlier events are not new
        self._steps = 0
        self._loss_sum, self._loss_count = 0.0, 0
        self._last_val = ""
        self._epoch_started = self._drawn = clock()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if mode == "bar":
            total = max(epochs - first_epoch, 0) * steps_per_epoch or None
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[figures]}"),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                console=self.console,
                auto_refresh=False,  # no thread: redrawn by step()
            )
            self._task = self._bar.add_task(self._description(first_epoch), total=total, figures="")
            self._bar.start()

    def _description(self, epoch: int) -> str:
        text = f"epoch {epoch + 1}/{self.epochs}"
        return text if self.label is None else f"{self.label} {text}"

    def step(self, loss: float | None) -> None:
        """Count one training step (``loss`` ``None``: the step was dropped); redraws the bar at
        most every :data:`REFRESH_S` seconds."""
        if self._bar is None:
            return
        self._steps += 1
        if loss is not None:
            self._loss_sum += loss
            self._loss_count += 1
        now = self._clock()
        if now - self._drawn >= REFRESH_S:
            self._drawn = now
            self._redraw()

    def _redraw(self) -> None:
        assert self._bar is not None and self._task is not None
        running = self._loss_sum / self._loss_count if self._loss_count else None
        figures = f"loss {_figure(running)}" + self._last_val
        self._bar.update(self._task, completed=self._steps, figures=figures)
        self._bar.refresh()

    def epoch(self, report: EpochReport, events: Sequence[GrowthEvent], params: int) -> None:
        """Show the end of an epoch: its line (modes ``"bar"`` and ``"lines"``).

        :param report: the epoch's report.
        :param events: every lifecycle transition of the fit so far (the new ones are shown).
        :param params: trainable parameters after the epoch.
        """
        fresh, self._events_seen = events[self._events_seen :], len(events)
        if self.mode == "off":
            return
        now = self._clock()
        line = epoch_line(report, self.epochs, params, fresh, now - self._epoch_started, self.label)
        self._epoch_started = now
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        if self._bar is not None and self._task is not None:
            self._loss_sum, self._loss_count = 0.0, 0
            self._last_val = f"  val loss {_figure(report.val_loss)}"
            next_epoch = min(report.epoch + 1, self.epochs - 1)
            self._bar.update(self._task, description=self._description(next_epoch))
            self._redraw()

    def close(self) -> None:
        """Stop the bar (idempotent); the last drawing stays on the terminal."""
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.stop()

    def __enter__(self) -> FitProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
