"""Span and metric exporters: a JSON-lines file in the run directory, OTLP over HTTP, console.

The JSON-lines exporters need nothing installed or started: one span (or one metrics export) per
line, appended by the export thread of a batch processor, so writing never happens on the event
loop. Each process writes its own file (``spans-<role>-<pid>.jsonl``): a run and its compile
workers never interleave writes, and the viewer reads every ``spans-*.jsonl`` of a run directory.

OTLP over HTTP (``opentelemetry-exporter-otlp-proto-http``) is used when the run's config names an
endpoint or the standard ``OTEL_EXPORTER_OTLP_*`` variables are set; see :func:`otlp_configured`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import structlog
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import format_span_id, format_trace_id

from .._files import open_append, read_regular
from ..errors import TelemetryConfigError
from ._span_fields import check_resource, span_fields

__all__ = (
    "SPAN_FILE_GLOB",
    "JsonlMetricExporter",
    "JsonlSpanExporter",
    "SpanRecord",
    "console_span_exporter",
    "otlp_configured",
    "otlp_metric_exporter",
    "otlp_span_exporter",
    "read_span_records",
    "span_file_name",
    "span_to_record",
)

_log = structlog.get_logger(__name__)

#: The files of a run directory that hold spans (one per process).
SPAN_FILE_GLOB = "spans-*.jsonl"
#: Largest span file read (bytes): far above what a run writes, and a bound on what one read takes.
_MAX_SPAN_FILE_BYTES = 1 << 30

_OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"
_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")




def span_file_name(role: str, pid: int | None = None) -> str:
    """The name of the span file a process writes in a run directory.

    :param role: ``run`` for the training process, ``worker`` for compile workers, ...
    :param pid: the process id; the current process's when omitted.
    """
    return f"spans-{role}-{os.getpid() if pid is None else pid}.jsonl"


def span_to_record(span: ReadableSpan, *, with_resource: bool = True) -> dict[str, Any]:
    """One span as a JSON-ready dict (ids in lowercase hex, times in Unix nanoseconds).

    :param span: a finished span.
    :param with_resource: include the resource attributes (the span file writes them once, in
        a header line, instead).
    """
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format_trace_id(ctx.trace_id) if ctx else None,
        "span_id": format_span_id(ctx.span_id) if ctx else None,
        "parent_span_id": format_span_id(parent.span_id) if parent else None,
        "parent_is_remote": bool(parent.is_remote) if parent else False,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_message": span.status.description or "",
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
    } | (
        {"resource": dict(span.resource.attributes) if span.resource else {}}
        if with_resource
        else {}
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return list(value)
    return str(value)


class _LineWriter:
    """Appends lines to a file, opened lazily; shared by the span and metric exporters."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def write(self, lines: Sequence[str]) -> None:
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open_append(self.path)  # never through a link or into a FIFO
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class JsonlSpanExporter(SpanExporter):
    """Writes finished spans to a JSON-lines file, one span per line (see :func:`span_to_record`).

    The resource (service, process id, role, run id) is the same for every span of a process, so
    it is written once, as a header line ``{"resource": {...}}``, before the first span and again
    whenever it changes; :func:`read_span_records` gives it back to each span. Meant to sit
    behind a ``BatchSpanProcessor``: :meth:`export` runs on the processor's thread.

    :param path: the file to append to; its directory is created on first export.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._writer = _LineWriter(Path(path))
        self._shut_down = False
        self._resource: object | None = None

    @property
    def path(self) -> Path:
        """The file spans are written to."""
        return self._writer.path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append ``spans`` to the file.

        :param spans: finished spans.
        :returns: ``SUCCESS``, or ``FAILURE`` when the file cannot be written (logged).
        """
        if self._shut_down:
            return SpanExportResult.FAILURE
        try:
            lines: list[str] = []
            for span in spans:
                if span.resource is not self._resource:
                    self._resource = span.resource
                    attrs = dict(span.resource.attributes) if span.resource else {}
                    lines.append(json.dumps({"resource": attrs}, default=_json_default))
                lines.append(
                    json.dumps(span_to_record(span, with_resource=False), default=_json_default)
                )
            self._writer.write(lines)
        except OSError as exc:
            _log.error("span export failed", path=str(self.path), error=str(exc))
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Nothing is buffered here (each export is flushed), so this always succeeds."""
        return True

    def shutdown(self) -> None:
        """Close the file; later exports fail."""
        self._shut_down = True
        self._writer.close()


class JsonlMetricExporter(MetricExporter):
    """Writes each metrics collection as one JSON line ``{"time_ns": ..., "metrics": {...}}``.

    The ``metrics`` object is the OpenTelemetry SDK's own JSON form of the collection. Cumulative
    temporality (the default), so the last line of a file holds the run's totals.

    :param path: the file to append to.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(preferred_temporality={}, preferred_aggregation={})
        self._writer = _LineWriter(Path(path))

    @property
    def path(self) -> Path:
        """The file metrics are written to."""
        return self._writer.path

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Append one line holding ``metrics_data``.

        :param metrics_data: one collection of the reader.
        :param timeout_millis: unused (a local file write).
        """
        try:
            payload = json.loads(metrics_data.to_json(indent=None))
            line = json.dumps({"time_ns": time.time_ns(), "metrics": payload})
            self._writer.write([line])
        except OSError as exc:
            _log.error("metric export failed", path=str(self.path), error=str(exc))
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Each export is flushed already."""
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Close the file."""
        self._writer.close()


def otlp_configured(env: Mapping[str, str] | None = None, *, endpoint: str | None = None) -> bool:
    """Whether spans should go to an OTLP collector.

    True when ``endpoint`` is given, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or when ``OTEL_TRACES_EXPORTER`` names
    ``otlp``; false when ``OTEL_TRACES_EXPORTER`` is ``none``.

    :param env: the environment to read; ``os.environ`` when omitted.
    :param endpoint: an endpoint from the run's config.
    """
    env = os.environ if env is None else env
    exporters = {e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters == {"none"}:
        return False
    if endpoint:
        return True
    return "otlp" in exporters or any(env.get(v) for v in _OTLP_ENDPOINT_VARS)


def _signal_url(endpoint: str, signal: str) -> str:
    if not endpoint.startswith(("http://", "https://")):
        raise TelemetryConfigError(
            f"OTLP endpoint {endpoint!r} is not an http(s) URL; give the collector's base URL, "
            f"e.g. http://127.0.0.1:4318 (the exporter appends /v1/{signal})"
        )
    return endpoint.rstrip("/") + f"/v1/{signal}"


def _resolve_url(endpoint: str | None, env: Mapping[str, str] | None, signal: str) -> str | None:
    """The full URL for ``signal``: ``endpoint`` (a base URL), else the signal's own variable
    (a full URL), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL), else ``None`` (the
    exporter's default, ``http://localhost:4318/v1/<signal>``)."""
    if endpoint:
        return _signal_url(endpoint, signal)
    env = os.environ if env is None else env
    if full := env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"):
        return full
    if base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return _signal_url(base, signal)
    return None


def otlp_span_exporter(
    endpoint: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
) -> SpanExporter:
    """An OTLP/HTTP (protobuf) span exporter.

    :param endpoint: the collector's base URL (``http://host:4318``); ``/v1/traces`` is appended.
        When omitted: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (a full URL), else
        ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL), else ``http://localhost:4318``.
    :param headers: extra HTTP headers (an API key); default from ``OTEL_EXPORTER_OTLP_HEADERS``.
    :param timeout_s: the export timeout; default from ``OTEL_EXPORTER_OTLP_TIMEOUT`` (10 s).
    :param env: the environment to read; ``os.environ`` when omitted.
    :raises TelemetryConfigError: when the exporter package is not installed or the endpoint is
        not an http(s) URL.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TelemetryConfigError(
            f"OTLP export was asked for but {_OTLP_PACKAGE} is not installed: "
            f"pip install {_OTLP_PACKAGE}"
        ) from exc
    return OTLPSpanExporter(
        endpoint=_resolve_url(endpoint, env, "traces"),
        headers=dict(headers) if headers else None,
        timeout=timeout_s,
    )


def otlp_metric_exporter(
    endpoint: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> MetricExporter:
    """An OTLP/HTTP metric exporter (``/v1/metrics``), configured like :func:`otlp_span_exporter`.

    :param endpoint: the collector's base URL; the ``OTEL_*`` variables when omitted.
    :param headers: extra HTTP headers.
    :param env: the environment to read; ``os.environ`` when omitted.
    :raises TelemetryConfigError: when the exporter package is not installed.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError as exc:
        raise TelemetryConfigError(
            f"OTLP metric export was asked for but {_OTLP_PACKAGE} is not installed: "
            f"pip install {_OTLP_PACKAGE}"
        ) from exc
    return OTLPMetricExporter(
        endpoint=_resolve_url(endpoint, env, "metrics"),
        headers=dict(headers) if headers else None,
        preferred_temporality={},
    )


def console_span_exporter(stream: IO[str] | None = None) -> SpanExporter:
    """Spans pretty-printed as JSON on ``stream`` (stderr by default), for debugging.

    :param stream: where to write.
    """
    return ConsoleSpanExporter(out=stream or sys.stderr)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """A span read back from a JSON-lines span file.

    :ivar name: the span's name.
    :ivar trace_id: 32 hex digits.
    :ivar span_id: 16 hex digits.
    :ivar parent_span_id: the parent's id, or ``None`` for a root span.
    :ivar start_ns: start, Unix nanoseconds.
    :ivar end_ns: end, Unix nanoseconds.
    :ivar status: ``UNSET``, ``OK`` or ``ERROR``.
    :ivar attributes: the span's attributes.
    :ivar events: the span's events (dicts with ``name``, ``time_ns``, ``attributes``).
    :ivar resource: the resource attributes of the process that recorded it.
    """

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_ns: int
    end_ns: int
    status: str
    attributes: Mapping[str, Any]
    events: tuple[Mapping[str, Any], ...]
    resource: Mapping[str, Any]

    @property
    def duration_s(self) -> float:
        """The span's duration in seconds."""
        return (self.end_ns - self.start_ns) / 1e9


def _span_text(file: Path) -> str:
    """The text of the span file ``file``, read as a regular file of at most
    :data:`_MAX_SPAN_FILE_BYTES` (1 GiB).

    :raises TelemetryConfigError: if it is not a regular file, is larger, cannot be read or is
        not UTF-8.
    """
    try:
        return read_regular(file, cap=_MAX_SPAN_FILE_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TelemetryConfigError(f"cannot read span file {file}: {exc}") from exc


def _span_files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(path.glob(SPAN_FILE_GLOB))
    elif path.is_file():
        yield path
    else:
        raise TelemetryConfigError(
            f"no trace at {str(path)!r}: give a run directory (holding {SPAN_FILE_GLOB}) "
            "or a span file"
        )


def read_span_records(path: str | os.PathLike[str]) -> list[SpanRecord]:
    """Read the spans of a run directory (every ``spans-*.jsonl``) or of one span file.

    A truncated last line (a run that was killed mid-write) is skipped and logged.

    :param path: a run directory or a span file.
    :returns: the spans, ordered by start time.
    :raises TelemetryConfigError: when ``path`` does not exist or a line is not a span.
    """
    records: list[SpanRecord] = []
    for file in _span_files(Path(path)):
        lines = _span_text(file).splitlines()
        resource: Mapping[str, Any] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if isinstance(raw, dict) and "name" not in raw and "resource" in raw:  # header
                    resource = check_resource(raw["resource"])
                    continue
                records.append(SpanRecord(**span_fields(raw, resource)))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    _log.warning("skipping truncated last line", file=str(file), line=number)
                    continue
                raise TelemetryConfigError(f"{file}:{number} is not JSON: {exc}") from exc
            except RecursionError as exc:
                raise TelemetryConfigError(
                    f"{file}:{number} is not a span record: JSON nested too deep"
                ) from exc
            except ValueError as exc:
                raise TelemetryConfigError(f"{file}:{number} is not a span record: {exc}") from exc
    records.sort(key=lambda r: (r.start_ns, r.end_ns))
    return records
