from __future__ import annotations

import gzip
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from esper_async.errors import TelemetryConfigError
from esper_async.telemetry import (
    ATTR_BLUEPRINT,
    METRIC_STEP_DURATION,
    SPAN_COMPILE,
    SPAN_RUN,
    JsonlSpanExporter,
    Telemetry,
    TelemetryConfig,
    console_span_exporter,
    otlp_configured,
    otlp_span_exporter,
    read_span_records,
    span_file_name,
)


class _Collector:
    """A real OTLP/HTTP receiver on loopback that decodes the protobuf trace requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.requests.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[object]:
        trace_service_pb2 = pytest.importorskip(
            "opentelemetry.proto.collector.trace.v1.trace_service_pb2"
        )
        out = []
        for path, body in self.requests:
            assert path == "/v1/traces"
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    out.extend(ss.spans)
        return out


@pytest.fixture
def collector() -> Iterator[_Collector]:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    c = _Collector()
    thread = threading.Thread(target=c.server.serve_forever, daemon=True)
    thread.start()
    yield c
    c.server.shutdown()
    c.server.server_close()
    thread.join()


def test_jsonl_exporter_round_trips_spans(tmp_path: Path) -> None:
    config = TelemetryConfig(otlp=False)
    with Telemetry.create(run_dir=tmp_path, config=config, env={}) as tel:
        with tel.span(SPAN_RUN), tel.span(SPAN_COMPILE, blueprint="conv3x3") as span:
            span.add_event("worker started", {"esper.worker.pid": 42})
    (file,) = tmp_path.glob("spans-*.jsonl")
    assert file.name == span_file_name("run")
    run, compile_ = read_span_records(tmp_path)
    assert (run.name, compile_.name) == (SPAN_RUN, SPAN_COMPILE)
    assert compile_.parent_span_id == run.span_id and run.parent_span_id is None
    assert len(run.trace_id) == 32 and len(run.span_id) == 16
    assert compile_.attributes[ATTR_BLUEPRINT] == "conv3x3"
    assert compile_.events[0]["name"] == "worker started"
    assert compile_.events[0]["attributes"] == {"esper.worker.pid": 42}
    assert run.start_ns <= compile_.start_ns <= compile_.end_ns <= run.end_ns
    assert compile_.resource["service.name"] == "esper_async"
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    assert [sorted(line) for line in lines[:1]] == [["resource"]]  # written once, as a header
    assert all("resource" not in line for line in lines[1:]) and len(lines) == 3


def test_metrics_file_holds_the_run_totals(tmp_path: Path) -> None:
    config = TelemetryConfig(otlp=False)
    with Telemetry.create(run_dir=tmp_path, config=config, env={}) as tel:
        for seconds in (0.01, 0.02):
            tel.metrics.step_finished(seconds)
    (file,) = tmp_path.glob("metrics-*.jsonl")
    last = json.loads(file.read_text().splitlines()[-1])
    metrics = [
        m
        for rm in last["metrics"]["resource_metrics"]
        for sm in rm["scope_metrics"]
        for m in sm["metrics"]
    ]
    (step,) = [m for m in metrics if m["name"] == METRIC_STEP_DURATION]
    (point,) = step["data"]["data_points"]
    assert point["count"] == 2
    assert point["sum"] == pytest.approx(0.03)


def test_reader_skips_a_truncated_last_line(tmp_path: Path) -> None:
    with Telemetry.create(run_dir=tmp_path, config=TelemetryConfig(otlp=False), env={}) as tel:
        with tel.span(SPAN_RUN):
            pass
    (file,) = tmp_path.glob("spans-*.jsonl")
    with file.open("a") as f:
        f.write('{"name": "esper.ep')  # a run killed mid-write
    assert [r.name for r in read_span_records(file)] == [SPAN_RUN]


def test_reader_rejects_a_corrupt_line_in_the_middle(tmp_path: Path) -> None:
    file = tmp_path / "spans-run-1.jsonl"
    file.write_text('not json\n{"name": "x"}\n')
    with pytest.raises(TelemetryConfigError, match=r"spans-run-1\.jsonl:1"):
        read_span_records(tmp_path)


def test_reader_names_the_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TelemetryConfigError, match="no trace at"):
        read_span_records(tmp_path / "nope")


def test_exporter_fails_after_shutdown(tmp_path: Path) -> None:
    exporter = JsonlSpanExporter(tmp_path / "spans-run-1.jsonl")
    exporter.shutdown()
    assert exporter.export([]).name == "FAILURE"


@pytest.mark.parametrize(
    ("env", "endpoint", "expected"),
    [
        pytest.param({}, None, False, id="nothing-set"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None, True, id="base-var"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            None,
            True,
            id="traces-var",
        ),
        pytest.param({"OTEL_TRACES_EXPORTER": "otlp"}, None, True, id="exporter-var"),
        pytest.param({}, "http://c:4318", True, id="config"),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            "http://c:4318",
            False,
            id="disabled-by-env",
        ),
    ],
)
def test_otlp_configured(env: dict[str, str], endpoint: str | None, expected: bool) -> None:
    assert otlp_configured(env, endpoint=endpoint) is expected


def test_otlp_endpoint_must_be_a_url() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with pytest.raises(TelemetryConfigError, match="not an http"):
        otlp_span_exporter("127.0.0.1:4318")


def test_spans_reach_an_otlp_collector_named_in_the_config(collector: _Collector) -> None:
    config = TelemetryConfig(jsonl=False, otlp_endpoint=collector.url, processor="simple")
    with Telemetry.create(config=config, env={}) as tel, tel.span(SPAN_RUN), tel.span(SPAN_COMPILE):
        pass
    spans = {s.name: s for s in collector.spans()}
    assert spans[SPAN_COMPILE].parent_span_id == spans[SPAN_RUN].span_id
    assert spans[SPAN_COMPILE].trace_id == spans[SPAN_RUN].trace_id


def test_spans_reach_an_otlp_collector_named_by_otel_env_vars(
    collector: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    with Telemetry.create(config=TelemetryConfig(jsonl=False)) as tel, tel.span(SPAN_RUN):
        pass  # batch processor: exported at shutdown
    assert [s.name for s in collector.spans()] == [SPAN_RUN]


def test_console_exporter_writes_to_the_given_stream() -> None:
    stream = io.StringIO()
    exporter = console_span_exporter(stream)
    with (
        Telemetry.create(
            config=TelemetryConfig(jsonl=False, otlp=False, processor="simple"),
            span_exporters=[exporter],
            env={},
        ) as tel,
        tel.span(SPAN_RUN),
    ):
        pass
    assert json.loads(stream.getvalue())["name"] == SPAN_RUN


def test_console_config_prints_spans_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    config = TelemetryConfig(jsonl=False, otlp=False, console=True, processor="simple")
    with Telemetry.create(config=config, env={}) as tel, tel.span(SPAN_COMPILE):
        pass
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["name"] == SPAN_COMPILE
