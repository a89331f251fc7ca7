from __future__ import annotations

import pickle
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from esper_async.telemetry import (
    ATTR_CANCELLED,
    ATTR_EPOCH,
    ATTR_ERROR_TYPE,
    ATTR_LIFECYCLE_FROM,
    ATTR_RUN_ID,
    ATTR_SLOT,
    ATTR_STEP,
    SPAN_COMPILE,
    SPAN_COMPILE_WORKER,
    SPAN_EPOCH,
    SPAN_RUN,
    SPAN_STEP,
    SPAN_STORE_GET,
    SPAN_VALIDATE,
    StepSampler,
    Telemetry,
    TelemetryConfig,
    extract_context,
    inject_context,
    read_span_records,
)

from ._worker import run_worker, span_files


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_nested_spans_share_a_trace_and_link_parents(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    with telemetry.span(SPAN_RUN) as run, telemetry.span(SPAN_EPOCH, epoch=3):
        assert run.is_recording()
    spans = memory_exporter.get_finished_spans()
    (run_span,) = _by_name(spans, SPAN_RUN)
    (epoch_span,) = _by_name(spans, SPAN_EPOCH)
    assert epoch_span.parent is not None
    assert epoch_span.parent.span_id == run_span.context.span_id
    assert epoch_span.context.trace_id == run_span.context.trace_id
    assert epoch_span.attributes[ATTR_EPOCH] == 3
    assert run_span.resource.attributes[ATTR_RUN_ID] == "test-run"


@pytest.mark.asyncio
async def test_spans_started_in_task_group_tasks_are_children_of_the_spawning_span(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    async def store_get(key: str) -> None:
        with telemetry.span(SPAN_STORE_GET, kernel_id=key):
            await anyio.lowlevel.checkpoint()  # interleave the tasks while their spans are open

    with telemetry.span(SPAN_EPOCH, epoch=0) as epoch:
        async with anyio.create_task_group() as tg:
            for key in ("a", "b", "c"):
                tg.start_soon(store_get, key)
        epoch_id = epoch.get_span_context().span_id

    gets = _by_name(memory_exporter.get_finished_spans(), SPAN_STORE_GET)
    assert len(gets) == 3
    assert {g.parent.span_id for g in gets if g.parent} == {epoch_id}
    # Sibling tasks never became each other's parents despite interleaving.
    assert len({g.context.span_id for g in gets}) == 3


@pytest.mark.asyncio
async def test_spans_in_worker_threads_inherit_the_current_span(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    def train_step() -> None:
        with telemetry.step_span(7):
            pass

    with telemetry.span(SPAN_EPOCH, epoch=0) as epoch:
        await anyio.to_thread.run_sync(train_step)
    (step,) = _by_name(memory_exporter.get_finished_spans(), SPAN_STEP)
    assert step.parent is not None
    assert step.parent.span_id == epoch.get_span_context().span_id
    assert step.attributes[ATTR_STEP] == 7


def test_inject_and_extract_round_trip_the_w3c_traceparent(telemetry: Telemetry) -> None:
    assert inject_context() == {}
    with telemetry.span(SPAN_COMPILE) as span:
        carrier = inject_context()
    ctx = span.get_span_context()
    trace_hex, span_hex = format_trace_id(ctx.trace_id), format_span_id(ctx.span_id)
    version, trace_part, span_part, flags = carrier["traceparent"].split("-")
    assert (version, trace_part, span_part) == ("00", trace_hex, span_hex)
    assert int(flags, 16) & 0x01  # sampled
    remote = trace.get_current_span(extract_context(carrier)).get_span_context()
    assert remote.is_remote
    assert (remote.trace_id, remote.span_id) == (ctx.trace_id, ctx.span_id)


def test_a_carrier_parent_continues_the_trace(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    with telemetry.span(SPAN_COMPILE) as compile_span:
        carrier = inject_context()
    # Outside any span, as a worker would be.
    with telemetry.span(SPAN_COMPILE_WORKER, parent=carrier):
        pass
    (worker,) = _by_name(memory_exporter.get_finished_spans(), SPAN_COMPILE_WORKER)
    assert worker.parent is not None and worker.parent.is_remote
    assert worker.parent.span_id == compile_span.get_span_context().span_id
    assert worker.context.trace_id == compile_span.get_span_context().trace_id


@pytest.mark.asyncio
async def test_one_trace_spans_the_run_and_a_spawned_worker_process(tmp_path: Path) -> None:
    config = TelemetryConfig(otlp=False, processor="simple")
    async with Telemetry.create(run_dir=tmp_path, config=config, run_id="r", env={}) as tel:
        with tel.span(SPAN_RUN), tel.span(SPAN_COMPILE, blueprint="conv3x3"):
            carrier = inject_context()
            exitcode = await anyio.to_thread.run_sync(run_worker, tel, carrier)
    assert exitcode == 0
    files = span_files(tmp_path)
    assert len(files) == 2, files  # one file per process
    records = {r.name: r for r in read_span_records(tmp_path)}
    compile_rec = records[SPAN_COMPILE]
    worker_rec = records[SPAN_COMPILE_WORKER]
    validate_rec = records[SPAN_VALIDATE]
    assert worker_rec.parent_span_id == compile_rec.span_id
    assert validate_rec.parent_span_id == worker_rec.span_id
    assert (
        compile_rec.trace_id
        == worker_rec.trace_id
        == validate_rec.trace_id
        == records[SPAN_RUN].trace_id
    )
    assert worker_rec.resource["process.pid"] != compile_rec.resource["process.pid"]
    assert worker_rec.resource["esper.process.role"] == "worker"
    assert worker_rec.resource[ATTR_RUN_ID] == "r"


def test_short_attribute_names_follow_the_scheme(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    with telemetry.span(
        "esper.lifecycle", {"esper.gate.alpha": 0.5}, slot="l1", lifecycle__from="TRAINING"
    ):
        pass
    (span,) = memory_exporter.get_finished_spans()
    assert span.attributes[ATTR_SLOT] == "l1"
    assert span.attributes[ATTR_LIFECYCLE_FROM] == "TRAINING"
    assert span.attributes["esper.gate.alpha"] == 0.5


def test_an_exception_marks_the_span_as_error_and_propagates(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(KeyError), telemetry.span(SPAN_COMPILE):
        raise KeyError("blueprint")
    (span,) = memory_exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[ATTR_ERROR_TYPE] == "KeyError"
    assert [e.name for e in span.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN  # context restored


@pytest.mark.asyncio
async def test_a_cancelled_task_span_is_marked_cancelled_not_error(
    telemetry: Telemetry, memory_exporter: InMemorySpanExporter
) -> None:
    started = anyio.Event()

    async def compile_forever() -> None:
        with telemetry.span(SPAN_COMPILE):
            started.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(compile_forever)
        await started.wait()
        tg.cancel_scope.cancel()
    (span,) = memory_exporter.get_finished_spans()
    assert span.attributes[ATTR_CANCELLED] is True
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("every", "expected"),
    [
        pytest.param(1, list(range(10)), id="every-step"),
        pytest.param(4, [0, 4, 8], id="every-4th"),
        pytest.param(0, [], id="disabled"),
    ],
)
def test_step_sampler_picks_every_nth_step(every: int, expected: list[int]) -> None:
    sampler = StepSampler(every)
    assert [s for s in range(10) if sampler.should_sample(s)] == expected


def test_step_sampler_rejects_a_negative_period() -> None:
    with pytest.raises(ValueError, match=r"StepSampler\.every"):
        StepSampler(-1)


def test_unsampled_steps_record_no_span(memory_exporter: InMemorySpanExporter) -> None:
    config = TelemetryConfig(jsonl=False, otlp=False, processor="simple", step_every=5)
    with Telemetry.create(config=config, span_exporters=[memory_exporter], env={}) as tel:
        for step in range(12):
            with tel.step_span(step) as span:
                span.set_attribute("esper.loss", 0.1)  # a no-op on unsampled steps
    steps = [s.attributes[ATTR_STEP] for s in memory_exporter.get_finished_spans()]
    assert steps == [0, 5, 10]


def test_worker_spec_pickles_and_rebuilds_telemetry(tmp_path: Path) -> None:
    config = TelemetryConfig(otlp=False, step_every=3, resource_attributes={"team": "esper"})
    with Telemetry.create(run_dir=tmp_path, config=config, run_id="r9", env={}) as tel:
        spec = pickle.loads(pickle.dumps(tel.worker_spec()))
    assert spec.config == config
    memory = InMemorySpanExporter()
    with (
        Telemetry.for_worker(spec, span_exporters=[memory], env={}) as worker,
        worker.span(SPAN_VALIDATE),
    ):
        pass
    (span,) = memory.get_finished_spans()
    assert span.resource.attributes["team"] == "esper"
    assert span.resource.attributes["esper.process.role"] == "worker"
    assert worker.step_sampler.every == 3


def test_batch_processor_exports_on_shutdown(tmp_path: Path) -> None:
    config = TelemetryConfig(otlp=False, export_delay_ms=60_000)
    tel = Telemetry.create(run_dir=tmp_path, config=config, env={})
    with tel.span(SPAN_RUN):
        pass
    assert read_span_records(tmp_path) == []  # still queued on the batch processor
    tel.shutdown()
    tel.shutdown()  # idempotent
    assert [r.name for r in read_span_records(tmp_path)] == [SPAN_RUN]


def test_config_rejects_an_unknown_processor() -> None:
    with pytest.raises(ValueError, match="processor"):
        TelemetryConfig(processor="sync")  # type: ignore[arg-type]
