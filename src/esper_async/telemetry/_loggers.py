"""Experiment loggers: the :class:`MetricLogger` protocol and a TensorBoard implementation.

A logger receives a handful of named scalars at a step (the :class:`~esper_async.Trainer` calls
it once per epoch, never on the training step's path) and is closed at the end of the run. Any
tracking service plugs in with a few lines (see ``docs/telemetry.md``, "Experiment loggers").
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import TelemetryConfigError

__all__ = ("MetricLogger", "TensorBoardLogger")


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
                "not installed: pip install tensorboard (or pass a different logger)"
            ) from exc
        self._writer_type: Any = module.SummaryWriter
        self.log_dir = Path(log_dir)
        self._kwargs = kwargs
        self._writer: Any = None

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Add each scalar under its name at ``step``.

        :param step: the global step (TensorBoard's x axis).
        :param scalars: figure name to value; ``/`` in a name groups figures in TensorBoard.
        """
        if self._writer is None:
            self._writer = self._writer_type(log_dir=str(self.log_dir), **self._kwargs)
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
