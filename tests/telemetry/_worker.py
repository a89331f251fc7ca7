"""Targets for spawned worker processes (a child can import these, not a test's local function)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping
from pathlib import Path

from esper_async.telemetry import (
    SPAN_COMPILE_WORKER,
    SPAN_VALIDATE,
    Telemetry,
    WorkerTelemetrySpec,
)


def emit_worker_spans(
    spec: WorkerTelemetrySpec, carrier: Mapping[str, str], blueprint: str
) -> None:
    """Continue the run's trace in this process: a worker span with a validation child.

    The worker rebuilds its telemetry from ``spec`` (its own span file, the same collector) and
    shuts it down before returning, so every span is exported when the process exits.
    """
    with Telemetry.for_worker(spec) as telemetry:
        with telemetry.span(
            SPAN_COMPILE_WORKER, parent=carrier, blueprint=blueprint, worker__pid=os.getpid()
        ):
            with telemetry.span(SPAN_VALIDATE, blueprint=blueprint, outcome="ok"):
                pass


def run_worker(telemetry: Telemetry, carrier: dict[str, str], blueprint: str = "conv3x3") -> int:
    """Spawn a real worker process that continues the trace; returns its exit code."""
    process = multiprocessing.get_context("spawn").Process(
        target=emit_worker_spans, args=(telemetry.worker_spec(), carrier, blueprint)
    )
    process.start()
    process.join(120)
    if process.exitcode is None:
        process.kill()
        process.join()
    return process.exitcode if process.exitcode is not None else -1


def span_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("spans-*.jsonl"))
