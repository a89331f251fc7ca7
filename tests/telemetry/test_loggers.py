"""The experiment loggers: TensorBoard, W&B (offline) and MLflow (a file store), each read back
from what it wrote; refused clearly when their package is missing."""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from esper_async.errors import TelemetryConfigError
from esper_async.telemetry import (
    EventLogger,
    MetricLogger,
    MlflowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from esper_async.telemetry._loggers import _event_line
from esper_async.training import GrowthEvent


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


_EVENTS = [
    GrowthEvent(0, 4, "conv1", "dormant", "germinated", "room to grow: val loss 0.50 flat"),
    GrowthEvent(1, 8, "conv2", "training", "culled", "hurts: val loss 0.40 with, 0.38 without"),
    GrowthEvent(
        1, 8, "conv1", "probation", "fossilized", "helps: val loss 0.30 with, 0.41 without"
    ),
]


def test_tensorboard_logger_writes_growth_events_as_text_and_counts(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    assert isinstance(logger, EventLogger)
    logger.log_events(_EVENTS[:1])
    logger.log_scalars(4, {"val/loss": 0.5})
    logger.log_events(_EVENTS[1:])
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    texts = [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in events.Tensors("growth/events/text_summary")
    ]
    assert texts == [(e.step, _event_line(e)) for e in _EVENTS]
    assert "conv2: training -> culled (hurts: val loss 0.40 with, 0.38 without)" in texts[1][1]
    assert [(e.step, e.value) for e in events.Scalars("growth/germinated")] == [(4, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("growth/culled")] == [(8, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("growth/fossilized")] == [(8, 1.0)]


def _wandb_records(directory: Path) -> list[dict[str, str]]:
    """The history rows of every offline run under ``directory``, read from the ``.wandb``
    files (W&B's record log: a 7-byte header, then 32 KiB blocks of checksum, length and type
    framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, pending, block = 7, b"", 32768
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:  # the block's tail is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append(
                        {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                    )
    return rows


def test_wandb_logger_writes_figures_and_events_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(
        project="esper-test",
        mode="offline",
        dir=str(tmp_path),
        settings=wandb.Settings(silent=True, console="off"),
    )
    assert isinstance(logger, EventLogger) and logger.run is None  # nothing started yet
    logger.log_events(_EVENTS[:1])
    logger.log_scalars(4, {"val/loss": 0.5, "params": 120.0})
    logger.log_events(_EVENTS[1:])
    logger.log_scalars(8, {"val/loss": 0.25, "params": 150.0})
    run_id = logger.run.id
    logger.close()
    logger.close()  # idempotent
    assert logger.run is None
    # finish() can return before W&B's service process has written the records out; its
    # teardown waits for that process to exit (in a user's program, interpreter exit does).
    wandb.teardown()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert path.name == f"run-{run_id}.wandb"
    rows = _wandb_records(tmp_path)
    figures = [(r["_step"], r["val/loss"], r["params"]) for r in rows if "val/loss" in r]
    assert figures == [("4", "0.5", "120"), ("8", "0.25", "150")]
    assert [(r["_step"], r["growth/culled"]) for r in rows if "growth/culled" in r] == [("8", "1")]
    # the table of step 8 holds every event; the history row names its file
    (row,) = [r for r in rows if r["_step"] == "8" and "growth/events/path" in r]
    saved = json.loads((path.parent / "files" / json.loads(row["growth/events/path"])).read_text())
    assert saved["columns"] == ["epoch", "step", "slot", "source", "target", "reason"]
    assert saved["data"] == [[getattr(e, c) for c in saved["columns"]] for e in _EVENTS]


def test_mlflow_logger_writes_figures_and_events_to_a_file_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants it for file stores
    uri = (tmp_path / "mlruns").as_uri()
    logger = MlflowLogger(tracking_uri=uri, experiment="esper-test", run_name="tiny")
    assert isinstance(logger, EventLogger)
    logger.log_events(_EVENTS[:1])
    logger.log_scalars(4, {"val/loss": 0.5, "params": 120.0})
    logger.close()
    logger.log_events(_EVENTS[1:])  # a second fit: the same run goes on
    logger.log_scalars(8, {"val/loss": 0.25, "params": 150.0})
    logger.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("esper-test").experiment_id])
    assert run.info.run_id == logger.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [(m.step, m.value) for m in history] == [(4, 0.5), (8, 0.25)]
    assert [
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "growth/fossilized")
    ] == [(8, 1.0)]
    text = Path(
        client.download_artifacts(run.info.run_id, MlflowLogger.EVENTS_ARTIFACT, str(tmp_path))
    )
    assert text.read_text().splitlines() == [_event_line(e) for e in _EVENTS]


def test_mlflow_logger_explains_a_refused_file_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TelemetryConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        MlflowLogger(tracking_uri=(tmp_path / "mlruns").as_uri())


@pytest.mark.parametrize(
    ("module", "build", "extra"),
    [
        pytest.param("wandb", lambda: WandbLogger(project="p"), "wandb", id="wandb"),
        pytest.param("mlflow", lambda: MlflowLogger(), "mlflow", id="mlflow"),
    ],
)
def test_without_the_package_a_logger_names_the_extra(
    module: str, build: Callable[[], object], extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(
        TelemetryConfigError, match=re.escape(f"pip install 'esper_async[{extra}]'")
    ):
        build()


def test_wandb_logger_refuses_a_run_and_init_options_together() -> None:
    pytest.importorskip("wandb")
    with pytest.raises(TelemetryConfigError, match="not both"):
        WandbLogger(run=object(), project="p")
