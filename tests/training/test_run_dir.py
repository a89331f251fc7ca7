"""What a fit writes beside training: the run directory's trace, the loop-lag metric, the
experiment loggers, and the kernel store named by path."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from torch import nn

import esper_async as ea
from esper_async.apps.dashboard_data import dashboard_data
from esper_async.apps.trace_view import add_trace_parser
from esper_async.errors import TelemetryConfigError
from esper_async.telemetry import METRIC_LOOP_LAG, MetricLogger, Telemetry, read_span_records

EPOCHS = 3


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _data() -> tuple[Batches, Batches]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    train = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    return train, [(x[:16], y[:16])]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _fit(trainer: ea.Trainer, epochs: int = EPOCHS) -> ea.FitResult:
    train, val = _data()
    return anyio.run(lambda: trainer.fit(train, val, epochs=epochs))


def _lag_samples(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        point.count
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == METRIC_LOOP_LAG
        for point in metric.data.data_points
    )


def test_a_fit_with_a_run_dir_writes_a_trace_the_dashboard_reads(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = ea.Trainer(_model(), grow=False, run_dir=run, loop_lag_interval_s=1e-4)
    result = _fit(trainer)

    (view,) = dashboard_data(read_span_records(run))
    assert view.complete
    assert view.figures["val_loss"] == {e: r.val_loss for e, r in enumerate(result.history)}
    assert view.figures["train_loss"] == {e: r.train_loss for e, r in enumerate(result.history)}
    assert view.figures["val_acc"] == {e: r.val_acc for e, r in enumerate(result.history)}
    assert view.figures["params"][EPOCHS - 1] == trainer.param_count()
    # The metrics file was flushed at the end of fit, the loop lag among them.
    (metrics_file,) = run.glob("metrics-run-*.jsonl")
    names = {
        m["name"]
        for line in metrics_file.read_text().splitlines()
        for rm in json.loads(line)["metrics"]["resource_metrics"]
        for sm in rm["scope_metrics"]
        for m in sm["metrics"]
    }
    assert METRIC_LOOP_LAG in names
    # `esper-async trace RUN_DIR --html` (its sub-command; the CLI's main also sets up logging)
    parser = argparse.ArgumentParser()
    add_trace_parser(parser.add_subparsers())
    args = parser.parse_args(["trace", str(run), "--html"])
    assert args.func(args, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert "esper_async run: run" in (run / "trace.html").read_text()


def test_a_second_fit_appends_to_the_same_trace(tmp_path: Path) -> None:
    trainer = ea.Trainer(_model(), grow=False, run_dir=tmp_path)
    _fit(trainer, epochs=1)
    _fit(trainer, epochs=2)  # the first epoch of this fit is epoch 0 again
    records = read_span_records(tmp_path)
    assert sum(r.name == ea.telemetry.SPAN_RUN for r in records) == 2
    # Between fits the trainer holds no open telemetry of the run directory.
    assert trainer.telemetry.run_dir is None


def test_without_a_run_dir_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _fit(ea.Trainer(_model(), grow=False))
    assert list(tmp_path.iterdir()) == []


def test_the_loop_lag_monitor_runs_during_fit_only() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry.create(metric_readers=[reader])
    try:
        _fit(ea.Trainer(_model(), grow=False, telemetry=telemetry, loop_lag_interval_s=1e-4))
        during = _lag_samples(reader)
        assert during > 0
        anyio.run(anyio.sleep, 0.01)  # a monitor left running would sample here
        assert _lag_samples(reader) == during
        # No monitor: no samples.
        quiet = InMemoryMetricReader()
        other = Telemetry.create(metric_readers=[quiet])
        _fit(ea.Trainer(_model(), grow=False, telemetry=other, loop_lag_interval_s=None))
        assert _lag_samples(quiet) == 0
        other.shutdown()
    finally:
        telemetry.shutdown()


class _Recorder:
    """A logger of the test's own: it implements the protocol and keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.closed = 0

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.calls.append((step, dict(scalars)))

    def close(self) -> None:
        self.closed += 1


class _Broken:
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise OSError("the tracking server is down")

    def close(self) -> None:
        raise OSError("the tracking server is down")


def test_loggers_get_each_epochs_figures_once() -> None:
    recorder = _Recorder()
    assert isinstance(recorder, MetricLogger)
    trainer = ea.Trainer(_model(), grow=False, loggers=[_Broken(), recorder])
    result = _fit(trainer)  # the broken logger is warned about; training goes on

    assert len(recorder.calls) == EPOCHS and recorder.closed == 1
    steps_per_epoch = len(_data()[0])
    for epoch, ((step, scalars), report) in enumerate(zip(recorder.calls, result.history,
                                                          strict=True)):
        assert step == steps_per_epoch * (epoch + 1)
        expected: dict[str, Any] = {
            "epoch": float(epoch), "train/loss": report.train_loss, "val/loss": report.val_loss,
            "val/accuracy": report.metrics["accuracy"], "params": float(trainer.param_count()),
        }
        assert scalars == expected


def test_bad_options_are_refused(tmp_path: Path) -> None:
    telemetry = Telemetry.create()
    with pytest.raises(ValueError, match="run_dir or a telemetry"):
        ea.Trainer(_model(), run_dir=tmp_path, telemetry=telemetry)
    telemetry.shutdown()
    with pytest.raises(ValueError, match="BlueprintCompiler"):
        ea.Trainer(_model(), store=tmp_path, compiler=ea.BlueprintCompiler())
    with pytest.raises(ValueError, match="loop_lag_interval_s"):
        ea.Trainer(_model(), loop_lag_interval_s=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    trainer = ea.Trainer(_model(), grow=False, run_dir=blocker / "run")
    with pytest.raises(TelemetryConfigError, match="run_dir"):
        _fit(trainer, epochs=1)


@pytest.mark.slow
def test_a_store_named_by_path_serves_the_next_run(tmp_path: Path) -> None:
    def grown() -> ea.Trainer:
        model = _model()
        ea.wrap(model, ["0"], example_input=torch.zeros(2, 4))
        controller = ea.HeuristicController(ea.ControllerConfig.eager())
        # graft="epoch": the first run waits for its kernel, so the store holds it
        return ea.Trainer(
            model, controller=controller, store=tmp_path / "kernels", graft="epoch"
        )

    first = grown()
    _fit(first, epochs=3)  # germinated after epoch 1, grafted (waited for) after epoch 2
    assert first.compiler.compiles >= 1
    second = grown()
    result = _fit(second, epochs=3)
    assert "training" in [e.target for e in result.events]  # a kernel was grafted ...
    assert second.compiler.compiles == 0  # the same blueprint, contract and seed: a store hit


@pytest.mark.slow
def test_the_own_model_example_writes_its_run_directory(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import own_model

    result = anyio.run(own_model.train, 3, tmp_path, 0, 300)
    assert result.events, "nothing grew: the trace would show no lifecycle"
    (view,) = dashboard_data(read_span_records(tmp_path))
    assert sorted(view.figures["val_loss"]) == [0, 1, 2]
    assert [e["to"] for e in view.events] == [e.target for e in result.events]
    rows = (tmp_path / "epochs.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and "val/accuracy" in rows[0]
    assert (tmp_path / "kernels").is_dir()
