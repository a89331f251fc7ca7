"""Per-run tracing: the :class:`Telemetry` object, spans, step sampling, context propagation.

A run owns one :class:`Telemetry`, which owns its ``TracerProvider`` and ``MeterProvider``; nothing
is installed as the OpenTelemetry global, so two runs (or two tests) in one process never share
exporters. Spans nest through ``contextvars``: a task started in an anyio task group, or a function
run with ``anyio.to_thread.run_sync``, inherits the span that was current where it was started.

Crossing into a worker process::

    carrier = inject_context()                   # in the run: {"traceparent": "00-..."}
    spec = telemetry.worker_spec()               # picklable
    # ... in the worker:
    with Telemetry.for_worker(spec) as wt, wt.span(SPAN_COMPILE_WORKER, parent=carrier):
        ...

Resource handling: exporting runs on the batch processors' threads, never on the caller's.
:meth:`Telemetry.shutdown` flushes and stops them (it blocks: call :meth:`Telemetry.aclose` from
async code). Error handling: a span that an exception leaves gets status ``ERROR``, the exception
as an event and ``esper.error.type``; a cancelled task's span gets ``esper.cancelled`` and no error.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._attributes import (
    ATTR_CANCELLED,
    ATTR_EPOCH,
    ATTR_ERROR_TYPE,
    ATTR_PARAMS,
    ATTR_PROCESS_ROLE,
    ATTR_RUN_ID,
    ATTR_STEP,
    ATTR_TRAIN_LOSS,
    ATTR_VAL_ACC,
    ATTR_VAL_LOSS,
    EVENT_EPOCH_FIGURES,
    SPAN_STEP,
    normalize_attributes,
)
from ._exporters import (
    JsonlMetricExporter,
    JsonlSpanExporter,
    console_span_exporter,
    otlp_configured,
    otlp_metric_exporter,
    otlp_span_exporter,
    span_file_name,
)
from ._metrics import Metrics

__all__ = (
    "StepSampler",
    "Telemetry",
    "TelemetryConfig",
    "WorkerTelemetrySpec",
    "extract_context",
    "inject_context",
)

_SCOPE: Final = "esper_async"
#: W3C trace-context propagator; stateless, so one shared instance is safe.
_PROPAGATOR: Final = TraceContextTextMapPropagator()


def inject_context(context: Context | None = None) -> dict[str, str]:
    """The current span's context as a W3C ``traceparent`` (and ``tracestate``) carrier.

    The dict is plain strings, so it pickles into a worker process or travels in a message.

    :param context: the context to inject; the current one when omitted.
    :returns: ``{"traceparent": "00-<trace>-<span>-01", ...}``, empty when no span is current.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> Context:
    """Rebuild a context from a carrier made by :func:`inject_context`.

    Spans started with it as parent become children of the remote span, in the same trace.

    :param carrier: the propagated headers.
    :returns: a context holding the remote span (an empty context for an empty carrier).
    """
    return _PROPAGATOR.extract(carrier=dict(carrier))


@dataclass(frozen=True, slots=True)
class StepSampler:
    """Decides which training steps get a span: every ``every``-th step, starting at step 0.

    :ivar every: the sampling period; 1 traces every step, 0 traces none.
    :raises ValueError: when ``every`` is negative.
    """

    every: int = 10

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(
                f"StepSampler.every must be >= 0 (0 disables step spans), got {self.every}"
            )

    def should_sample(self, step: int) -> bool:
        """Whether ``step`` gets a span.

        :param step: the global step number.
        """
        return self.every > 0 and step % self.every == 0


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """How a run's telemetry is exported. Picklable, so workers rebuild the same set-up.

    :ivar service_name: the ``service.name`` resource attribute.
    :ivar jsonl: write spans and metrics as JSON lines in the run directory.
    :ivar otlp: ``None``: export over OTLP/HTTP when :attr:`otlp_endpoint` or the
        ``OTEL_EXPORTER_OTLP_*`` variables say so; ``True``: always (default endpoint
        ``http://localhost:4318``); ``False``: never.
    :ivar otlp_endpoint: the collector's base URL (``/v1/traces`` is appended).
    :ivar otlp_headers: extra HTTP headers for the collector.
    :ivar otlp_metrics: also send metrics over OTLP (not every trace viewer accepts them).
    :ivar console: print spans on stderr (debugging).
    :ivar step_every: trace every N-th training step (see :class:`StepSampler`).
    :ivar processor: ``batch`` (export on a background thread) or ``simple`` (export inline,
        for tests and short scripts only).
    :ivar export_delay_ms: how long the batch processor gathers spans before an export.
    :ivar metric_interval_s: how often metrics are exported.
    :ivar resource_attributes: extra resource attributes (``openinference.project.name`` for
        Phoenix, ``deployment.environment`` ...).
    """

    service_name: str = "esper_async"
    jsonl: bool = True
    otlp: bool | None = None
    otlp_endpoint: str | None = None
    otlp_headers: Mapping[str, str] = field(default_factory=dict)
    otlp_metrics: bool = False
    console: bool = False
    step_every: int = 10
    processor: Literal["batch", "simple"] = "batch"
    export_delay_ms: int = 2_000
    metric_interval_s: float = 30.0
    resource_attributes: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.processor not in ("batch", "simple"):
            raise ValueError(
                f"TelemetryConfig.processor must be 'batch' or 'simple', got {self.processor!r}"
            )
        if self.metric_interval_s <= 0:
            raise ValueError(
                f"TelemetryConfig.metric_interval_s must be positive, got {self.metric_interval_s}"
            )


@dataclass(frozen=True, slots=True)
class WorkerTelemetrySpec:
    """What a worker process needs to rebuild the run's telemetry (:meth:`Telemetry.for_worker`).

    :ivar config: the run's telemetry config.
    :ivar run_dir: the run directory, where the worker writes its own span file.
    :ivar run_id: the run's id.
    """

    config: TelemetryConfig
    run_dir: str | None
    run_id: str | None


class _SpanScope:
    """Context manager that makes a span current and ends it; a class, not a generator, because
    it sits on the training step's path."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: object | None = None

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        try:
            if exc is not None and span.is_recording():
                if isinstance(exc, asyncio.CancelledError | GeneratorExit):
                    span.set_attribute(ATTR_CANCELLED, True)
                else:
                    span.record_exception(exc)
                    span.set_attribute(ATTR_ERROR_TYPE, type(exc).__qualname__)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            span.end()
            if self._token is not None:
                otel_context.detach(self._token)  # type: ignore[arg-type]


class _NoSpan:
    """What an unsampled step span yields: a span that records nothing."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return trace.INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN: Final = _NoSpan()


class Telemetry:
    """The telemetry of one run (or of one worker process of a run).

    Build it with :meth:`create` (exporters from a :class:`TelemetryConfig`) or pass providers you
    made yourself. Use it as a context manager (sync or async) so that it is shut down and its
    last spans are flushed.

    :param tracer_provider: the run's tracer provider.
    :param meter_provider: the run's meter provider; a provider without readers when omitted
        (metrics are then recorded and dropped).
    :param config: the config it was built from (used by :meth:`worker_spec`).
    :param run_dir: the run directory, if any.
    :param run_id: the run's id, added to the resource.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider | None = None,
        config: TelemetryConfig | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.config = config or TelemetryConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_id = run_id
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider or MeterProvider(shutdown_on_exit=False)
        self.tracer = tracer_provider.get_tracer(_SCOPE)
        self.metrics = Metrics(self.meter_provider)
        self.step_sampler = StepSampler(self.config.step_every)
        self._closed = False

    @classmethod
    def create(
        cls,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        config: TelemetryConfig | None = None,
        run_id: str | None = None,
        role: str = "run",
        span_exporters: Sequence[SpanExporter] = (),
        metric_readers: Sequence[MetricReader] = (),
        env: Mapping[str, str] | None = None,
    ) -> Telemetry:
        """Build providers and exporters for a run.

        Spans go to: ``RUN_DIR/spans-<role>-<pid>.jsonl`` (when ``run_dir`` is given and
        ``config.jsonl``), an OTLP collector (see :attr:`TelemetryConfig.otlp`), stderr
        (``config.console``), and every exporter in ``span_exporters``. Metrics go to
        ``RUN_DIR/metrics-<role>-<pid>.jsonl``, OTLP when ``config.otlp_metrics``, and the
        given readers.

        :param run_dir: the run directory.
        :param config: the export settings; defaults when omitted.
        :param run_id: the run's id (resource attribute ``esper.run_id``).
        :param role: ``run`` or ``worker``; names the files and the ``esper.process.role``.
        :param span_exporters: extra exporters (an ``InMemorySpanExporter`` in tests).
        :param metric_readers: extra readers (an ``InMemoryMetricReader`` in tests).
        :param env: the environment for the ``OTEL_*`` variables; ``os.environ`` when omitted.
        :raises TelemetryConfigError: when OTLP is asked for but cannot be set up.
        """
        config = config or TelemetryConfig()
        attrs: dict[str, Any] = {
            "service.name": config.service_name,
            "process.pid": os.getpid(),
            ATTR_PROCESS_ROLE: role,
        }
        if run_id is not None:
            attrs[ATTR_RUN_ID] = run_id
        attrs.update(config.resource_attributes)
        resource = Resource.create(attrs)

        exporters: list[SpanExporter] = []
        readers: list[MetricReader] = list(metric_readers)
        directory = Path(run_dir) if run_dir is not None else None
        if directory is not None and config.jsonl:
            exporters.append(JsonlSpanExporter(directory / span_file_name(role)))
            metrics_file = directory / span_file_name(role).replace("spans-", "metrics-", 1)
            readers.append(
                PeriodicExportingMetricReader(
                    JsonlMetricExporter(metrics_file),
                    export_interval_millis=config.metric_interval_s * 1000,
                )
            )
        use_otlp = config.otlp is True or (
            config.otlp is None and otlp_configured(env, endpoint=config.otlp_endpoint)
        )
        if use_otlp:
            exporters.append(
                otlp_span_exporter(
                    config.otlp_endpoint, headers=config.otlp_headers or None, env=env
                )
            )
            if config.otlp_metrics:
                readers.append(
                    PeriodicExportingMetricReader(
                        otlp_metric_exporter(
                            config.otlp_endpoint, headers=config.otlp_headers or None, env=env
                        ),
                        export_interval_millis=config.metric_interval_s * 1000,
                    )
                )
        if config.console:
            exporters.append(console_span_exporter())
        exporters.extend(span_exporters)

        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter in exporters:
            tracer_provider.add_span_processor(_processor(exporter, config))
        meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
        return cls(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            config=config,
            run_dir=directory,
            run_id=run_id,
        )

    @classmethod
    def for_worker(cls, spec: WorkerTelemetrySpec, **kwargs: Any) -> Telemetry:
        """Rebuild a run's telemetry inside a worker process.

        The worker writes its own ``spans-worker-<pid>.jsonl`` beside the run's and exports to the
        same OTLP collector. Call :meth:`force_flush` after each task if the pool may be torn down
        without :meth:`shutdown`.

        :param spec: from :meth:`worker_spec` of the run's telemetry.
        :param kwargs: passed on to :meth:`create` (``span_exporters``, ``env`` ...).
        """
        return cls.create(
            run_dir=spec.run_dir, config=spec.config, run_id=spec.run_id, role="worker", **kwargs
        )

    def worker_spec(self) -> WorkerTelemetrySpec:
        """A picklable description of this telemetry, for :meth:`for_worker` in a worker process."""
        return WorkerTelemetrySpec(
            config=self.config,
            run_dir=str(self.run_dir) if self.run_dir is not None else None,
            run_id=self.run_id,
        )

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        /,
        *,
        parent: Context | Mapping[str, str] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        **attrs: Any,
    ) -> _SpanScope:
        """Start a span, make it current for the ``with`` block, end it on exit.

        ``telemetry.span(SPAN_LIFECYCLE, slot="l1", lifecycle__from="TRAINING")`` records
        ``esper.slot`` and ``esper.lifecycle.from`` (see :func:`attribute_key`).

        :param name: the span's name, one of the ``SPAN_*`` constants.
        :param attributes: attributes under their full names.
        :param parent: the parent: a context, a carrier from :func:`inject_context` (a worker
            continuing the run's trace), or ``None`` for the current span.
        :param kind: the OpenTelemetry span kind.
        :param attrs: attributes under short names.
        :returns: a context manager yielding the ``Span`` (to add attributes or events).
        """
        if parent is not None and not isinstance(parent, Context):
            parent = extract_context(parent)
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=kind,
            attributes=normalize_attributes(attributes, **attrs),
            record_exception=False,
            set_status_on_exception=False,
        )
        return _SpanScope(span)

    def step_span(self, step: int, **attrs: Any) -> _SpanScope | _NoSpan:
        """A ``esper.step`` span for sampled steps (see :class:`StepSampler`), a no-op otherwise.

        :param step: the global step number.
        :param attrs: more attributes under short names.
        """
        if not self.step_sampler.should_sample(step):
            return _NO_SPAN
        attributes = normalize_attributes(**attrs)
        attributes[ATTR_STEP] = step
        span = self.tracer.start_span(
            SPAN_STEP, attributes=attributes, record_exception=False, set_status_on_exception=False
        )
        return _SpanScope(span)

    @staticmethod
    def event(name: str, attributes: Mapping[str, Any] | None = None, /, **attrs: Any) -> None:
        """Add an event to the current span (nothing happens when no span is recording).

        :param name: the event's name.
        :param attributes: attributes under full names.
        :param attrs: attributes under short names.
        """
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, normalize_attributes(attributes, **attrs))

    def epoch_figures(
        self, report: Any, *, params: int | None = None, span: Span | None = None
    ) -> None:
        """Record one epoch's figures: an ``esper.epoch.figures`` event on ``span`` (the current
        span when omitted) and the per-epoch gauges of :class:`Metrics`.

        The event carries ``esper.epoch``, ``esper.train_loss``, ``esper.val_loss``,
        ``esper.val_acc`` and ``esper.params`` (those known); the trace viewer draws its curves
        from these events.

        :param report: the epoch's report (an ``EpochReport``: ``epoch``, ``train_loss``,
            ``val_loss``, ``val_acc``; missing fields are left out).
        :param params: the model's trainable parameters after the epoch.
        :param span: the span to add the event to (e.g. the epoch span).
        """
        train_loss = getattr(report, "train_loss", None)
        val_loss = getattr(report, "val_loss", None)
        val_acc = getattr(report, "val_acc", None)
        self.metrics.epoch_finished(
            train_loss=train_loss, val_loss=val_loss, val_acc=val_acc, params=params
        )
        target = span if span is not None else trace.get_current_span()
        if not target.is_recording():
            return
        figures = {
            ATTR_EPOCH: getattr(report, "epoch", None),
            ATTR_TRAIN_LOSS: train_loss,
            ATTR_VAL_LOSS: val_loss,
            ATTR_VAL_ACC: val_acc,
            ATTR_PARAMS: params,
        }
        target.add_event(EVENT_EPOCH_FIGURES, normalize_attributes(figures))

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Export every finished span and metric now. Blocks.

        :param timeout_s: how long to wait.
        :returns: whether everything was exported in time.
        """
        millis = int(timeout_s * 1000)
        spans_ok = self.tracer_provider.force_flush(millis)
        metrics_ok = self.meter_provider.force_flush(millis)
        return bool(spans_ok) and bool(metrics_ok)

    def shutdown(self) -> None:
        """Flush and stop every processor and reader. Blocks; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    async def aclose(self) -> None:
        """:meth:`shutdown` on a worker thread, shielded from cancellation so the last spans of a
        cancelled run are still written."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.shutdown)

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> Telemetry:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _processor(exporter: SpanExporter, config: TelemetryConfig) -> SpanProcessor:
    if config.processor == "simple":
        return SimpleSpanProcessor(exporter)
    # When the queue is full the processor drops spans instead of blocking the training loop.
    return BatchSpanProcessor(exporter, schedule_delay_millis=config.export_delay_ms)
