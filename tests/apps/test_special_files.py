"""The apps and the span files never write through a planted link and never read a FIFO or a
device: the trace page, ``demo.json`` and span files."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from esper_async.apps.demo import DemoConfig, _save_config, load_demo_config
from esper_async.apps.trace_view import add_trace_parser
from esper_async.errors import DemoConfigError, TelemetryConfigError
from esper_async.telemetry import (
    SPAN_RUN,
    JsonlSpanExporter,
    Telemetry,
    TelemetryConfig,
    read_span_records,
)


def _trace(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="esper-async")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    with Telemetry.create(run_dir=tmp_path, config=TelemetryConfig(otlp=False), env={}) as tel:
        with tel.span(SPAN_RUN):
            pass
    return tmp_path


def test_the_trace_page_is_not_written_through_a_planted_link(
    run_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    victim = tmp_path_factory.mktemp("elsewhere") / "victim"
    victim.write_text("precious")
    (run_dir / "trace.html.tmp").symlink_to(victim)
    code, _, _ = _trace(["trace", str(run_dir), "--html"])
    assert code == 0
    assert victim.read_text() == "precious"
    page = run_dir / "trace.html"
    assert not page.is_symlink() and page.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_span_file_that_is_not_a_file_is_refused_unread(run_dir: Path, kind: str) -> None:
    special = run_dir / "spans-evil.jsonl"
    if kind == "fifo":
        os.mkfifo(special)  # no writer: a plain read blocks forever
    else:
        special.symlink_to("/dev/zero")
    with pytest.raises(TelemetryConfigError, match="not a regular file"):
        read_span_records(run_dir)


def test_spans_are_not_appended_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "spans-1.jsonl").symlink_to(victim)
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("test").start_as_current_span("esper.run"):
        pass
    exporter = JsonlSpanExporter(tmp_path / "spans-1.jsonl")
    assert exporter.export(memory.get_finished_spans()) is SpanExportResult.FAILURE
    assert victim.read_text() == "precious"
    exporter = JsonlSpanExporter(tmp_path / "spans-2.jsonl")  # a plain file: written
    assert exporter.export(memory.get_finished_spans()) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert [r.name for r in read_span_records(tmp_path / "spans-2.jsonl")] == ["esper.run"]


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_demo_json_that_is_not_a_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    special = tmp_path / "demo.json"
    if kind == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to("/dev/zero")
    with pytest.raises(DemoConfigError, match="not a regular file"):
        load_demo_config(tmp_path)


def test_demo_json_is_not_written_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "demo.json.tmp").symlink_to(victim)
    _save_config(DemoConfig(epochs=3), run_dir)
    assert victim.read_text() == "precious"
    assert load_demo_config(run_dir).epochs == 3
