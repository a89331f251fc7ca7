"""The TensorBoard logger: refused clearly without tensorboard, event files with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from esper_async.errors import TelemetryConfigError
from esper_async.telemetry import MetricLogger, TensorBoardLogger


def test_without_tensorboard_the_logger_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail as it does where tensorboard is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TelemetryConfigError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path)


def test_tensorboard_logger_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    assert isinstance(logger, MetricLogger)
    logger.log_scalars(10, {"val/loss": 0.5, "params": 120.0})
    logger.log_scalars(20, {"val/loss": 0.25, "params": 150.0})
    logger.close()
    logger.close()  # idempotent
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(10, 0.5), (20, 0.25)]
    assert [e.value for e in events.Scalars("params")] == [120.0, 150.0]
