from __future__ import annotations

import io
import json

import anyio
import anyio.lowlevel
import pytest
import structlog
from opentelemetry.trace import format_span_id, format_trace_id

from esper_async.telemetry import (
    SPAN_COMPILE,
    SPAN_RUN,
    Telemetry,
    add_trace_context,
    configure_logging,
)

pytestmark = pytest.mark.usefixtures("restore_structlog")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_lines_carry_the_current_trace_and_span(telemetry: Telemetry) -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    log = structlog.get_logger("esper_async.compiler")
    log.info("outside any span")
    with telemetry.span(SPAN_RUN), telemetry.span(SPAN_COMPILE) as span:
        log.info("compile started", blueprint="conv3x3")
    outside, inside = _lines(stream)
    ctx = span.get_span_context()
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == format_trace_id(ctx.trace_id)
    assert inside["span_id"] == format_span_id(ctx.span_id)
    assert inside["event"] == "compile started"
    assert inside["blueprint"] == "conv3x3"
    assert inside["level"] == "info"


@pytest.mark.asyncio
async def test_log_lines_of_concurrent_tasks_point_at_their_own_spans(telemetry: Telemetry) -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    log = structlog.get_logger("esper_async.store")
    span_ids: dict[str, str] = {}

    async def get(key: str) -> None:
        with telemetry.span("esper.store.get", kernel_id=key) as span:
            span_ids[key] = format_span_id(span.get_span_context().span_id)
            await anyio.lowlevel.checkpoint()
            log.info("store get", key=key)

    async with anyio.create_task_group() as tg:
        for key in ("k1", "k2"):
            tg.start_soon(get, key)
    assert {line["key"]: line["span_id"] for line in _lines(stream)} == span_ids


def test_level_filters_lower_levels() -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream, level="warning")
    log = structlog.get_logger()
    log.info("dropped")
    log.warning("kept")
    assert [line["event"] for line in _lines(stream)] == ["kept"]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="chatty")


def test_interactive_stream_gets_console_output(telemetry: Telemetry) -> None:
    terminal = _Terminal()
    configure_logging(json=None, stream=terminal)
    with telemetry.span(SPAN_RUN) as span:
        structlog.get_logger().info("run started", epochs=3)
    text = terminal.getvalue()
    assert "run started" in text
    assert format_trace_id(span.get_span_context().trace_id) in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_non_interactive_stream_gets_json() -> None:
    stream = io.StringIO()
    configure_logging(json=None, stream=stream)
    structlog.get_logger().info("hello")
    assert _lines(stream)[0]["event"] == "hello"


def test_processor_keeps_ids_the_caller_set(telemetry: Telemetry) -> None:
    with telemetry.span(SPAN_RUN):
        event = add_trace_context(None, "info", {"event": "x", "trace_id": "given"})
    assert event["trace_id"] == "given"
    assert len(str(event["span_id"])) == 16
