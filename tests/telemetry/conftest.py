from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from esper_async.telemetry import Telemetry, TelemetryConfig


@pytest.fixture
def memory_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def telemetry(
    memory_exporter: InMemorySpanExporter, metric_reader: InMemoryMetricReader
) -> Iterator[Telemetry]:
    """A run's telemetry exporting to memory only, spans exported as they end."""
    tel = Telemetry.create(
        config=TelemetryConfig(jsonl=False, otlp=False, processor="simple", step_every=1),
        run_id="test-run",
        span_exporters=[memory_exporter],
        metric_readers=[metric_reader],
        env={},
    )
    with tel:
        yield tel


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
