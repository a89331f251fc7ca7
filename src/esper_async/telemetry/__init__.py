"""Telemetry of esper_async: OpenTelemetry traces and metrics, and structlog logs.

One :class:`Telemetry` per run holds that run's tracer and meter providers (never the globals).
See ``docs/telemetry.md`` for the attribute scheme and for pointing a run at an OTLP collector.
"""

from __future__ import annotations

from ._attributes import (
    ATTR_ARM_NAMES as ATTR_ARM_NAMES,
)
from ._attributes import (
    ATTR_ARM_VALUES as ATTR_ARM_VALUES,
)
from ._attributes import (
    ATTR_ATTEMPT as ATTR_ATTEMPT,
)
from ._attributes import (
    ATTR_BLUEPRINT as ATTR_BLUEPRINT,
)
from ._attributes import (
    ATTR_BYTES as ATTR_BYTES,
)
from ._attributes import (
    ATTR_CANCELLED as ATTR_CANCELLED,
)
from ._attributes import (
    ATTR_CHECKPOINT_PATH as ATTR_CHECKPOINT_PATH,
)
from ._attributes import (
    ATTR_CHOSEN as ATTR_CHOSEN,
)
from ._attributes import (
    ATTR_COMPILE_BACKEND as ATTR_COMPILE_BACKEND,
)
from ._attributes import (
    ATTR_DURATION_S as ATTR_DURATION_S,
)
from ._attributes import (
    ATTR_EPOCH as ATTR_EPOCH,
)
from ._attributes import (
    ATTR_ERROR_TYPE as ATTR_ERROR_TYPE,
)
from ._attributes import (
    ATTR_GATE_PREFIX as ATTR_GATE_PREFIX,
)
from ._attributes import (
    ATTR_KERNEL_ID as ATTR_KERNEL_ID,
)
from ._attributes import (
    ATTR_LIFECYCLE_FROM as ATTR_LIFECYCLE_FROM,
)
from ._attributes import (
    ATTR_LIFECYCLE_TO as ATTR_LIFECYCLE_TO,
)
from ._attributes import (
    ATTR_LOSS as ATTR_LOSS,
)
from ._attributes import (
    ATTR_OUTCOME as ATTR_OUTCOME,
)
from ._attributes import (
    ATTR_PARAMS as ATTR_PARAMS,
)
from ._attributes import (
    ATTR_PARAMS_ADDED as ATTR_PARAMS_ADDED,
)
from ._attributes import (
    ATTR_PROCESS_ROLE as ATTR_PROCESS_ROLE,
)
from ._attributes import (
    ATTR_RUN_ID as ATTR_RUN_ID,
)
from ._attributes import (
    ATTR_SEED_STATE as ATTR_SEED_STATE,
)
from ._attributes import (
    ATTR_SLOT as ATTR_SLOT,
)
from ._attributes import (
    ATTR_STEP as ATTR_STEP,
)
from ._attributes import (
    ATTR_STORE_HIT as ATTR_STORE_HIT,
)
from ._attributes import (
    ATTR_STORE_TIER as ATTR_STORE_TIER,
)
from ._attributes import (
    ATTR_STRATEGY as ATTR_STRATEGY,
)
from ._attributes import (
    ATTR_SURGERY_OP as ATTR_SURGERY_OP,
)
from ._attributes import (
    ATTR_TRAIN_LOSS as ATTR_TRAIN_LOSS,
)
from ._attributes import (
    ATTR_VAL_ACC as ATTR_VAL_ACC,
)
from ._attributes import (
    ATTR_VAL_LOSS as ATTR_VAL_LOSS,
)
from ._attributes import (
    ATTR_WORKER_PID as ATTR_WORKER_PID,
)
from ._attributes import (
    EVENT_EPOCH_FIGURES as EVENT_EPOCH_FIGURES,
)
from ._attributes import (
    GROWTH_SPAN_NAMES as GROWTH_SPAN_NAMES,
)
from ._attributes import (
    METRIC_COMPILE_DURATION as METRIC_COMPILE_DURATION,
)
from ._attributes import (
    METRIC_LOOP_LAG as METRIC_LOOP_LAG,
)
from ._attributes import (
    METRIC_PARAMS as METRIC_PARAMS,
)
from ._attributes import (
    METRIC_PARAMS_ADDED as METRIC_PARAMS_ADDED,
)
from ._attributes import (
    METRIC_SEEDS as METRIC_SEEDS,
)
from ._attributes import (
    METRIC_STEP_DURATION as METRIC_STEP_DURATION,
)
from ._attributes import (
    METRIC_STORE_LOOKUPS as METRIC_STORE_LOOKUPS,
)
from ._attributes import (
    METRIC_TRAIN_LOSS as METRIC_TRAIN_LOSS,
)
from ._attributes import (
    METRIC_VAL_ACC as METRIC_VAL_ACC,
)
from ._attributes import (
    METRIC_VAL_LOSS as METRIC_VAL_LOSS,
)
from ._attributes import (
    SPAN_CHECKPOINT as SPAN_CHECKPOINT,
)
from ._attributes import (
    SPAN_COMPILE as SPAN_COMPILE,
)
from ._attributes import (
    SPAN_COMPILE_WORKER as SPAN_COMPILE_WORKER,
)
from ._attributes import (
    SPAN_EPOCH as SPAN_EPOCH,
)
from ._attributes import (
    SPAN_GRAFT as SPAN_GRAFT,
)
from ._attributes import (
    SPAN_LIFECYCLE as SPAN_LIFECYCLE,
)
from ._attributes import (
    SPAN_ROLLBACK as SPAN_ROLLBACK,
)
from ._attributes import (
    SPAN_RUN as SPAN_RUN,
)
from ._attributes import (
    SPAN_SELECT as SPAN_SELECT,
)
from ._attributes import (
    SPAN_STEP as SPAN_STEP,
)
from ._attributes import (
    SPAN_STORE_GET as SPAN_STORE_GET,
)
from ._attributes import (
    SPAN_STORE_PUT as SPAN_STORE_PUT,
)
from ._attributes import (
    SPAN_SURGERY as SPAN_SURGERY,
)
from ._attributes import (
    SPAN_VALIDATE as SPAN_VALIDATE,
)
from ._attributes import (
    AttributeValue as AttributeValue,
)
from ._attributes import (
    attribute_key as attribute_key,
)
from ._attributes import (
    gate_attributes as gate_attributes,
)
from ._attributes import (
    normalize_attributes as normalize_attributes,
)
from ._attributes import (
    selection_attributes as selection_attributes,
)
from ._exporters import (
    SPAN_FILE_GLOB as SPAN_FILE_GLOB,
)
from ._exporters import (
    JsonlMetricExporter as JsonlMetricExporter,
)
from ._exporters import (
    JsonlSpanExporter as JsonlSpanExporter,
)
from ._exporters import (
    SpanRecord as SpanRecord,
)
from ._exporters import (
    console_span_exporter as console_span_exporter,
)
from ._exporters import (
    otlp_configured as otlp_configured,
)
from ._exporters import (
    otlp_metric_exporter as otlp_metric_exporter,
)
from ._exporters import (
    otlp_span_exporter as otlp_span_exporter,
)
from ._exporters import (
    read_span_records as read_span_records,
)
from ._exporters import (
    span_file_name as span_file_name,
)
from ._exporters import (
    span_to_record as span_to_record,
)
from ._loggers import EventLogger as EventLogger
from ._loggers import LifecycleEvent as LifecycleEvent
from ._loggers import MetricLogger as MetricLogger
from ._loggers import MlflowLogger as MlflowLogger
from ._loggers import TensorBoardLogger as TensorBoardLogger
from ._loggers import WandbLogger as WandbLogger
from ._logging import add_trace_context as add_trace_context
from ._logging import configure_logging as configure_logging
from ._logging import quiet_by_default as quiet_by_default
from ._metrics import Metrics as Metrics
from ._metrics import monitor_loop_lag as monitor_loop_lag
from ._tracing import (
    StepSampler as StepSampler,
)
from ._tracing import (
    Telemetry as Telemetry,
)
from ._tracing import (
    TelemetryConfig as TelemetryConfig,
)
from ._tracing import (
    WorkerTelemetrySpec as WorkerTelemetrySpec,
)
from ._tracing import (
    extract_context as extract_context,
)
from ._tracing import (
    inject_context as inject_context,
)

__all__ = (
    "ATTR_ARM_NAMES",
    "ATTR_ARM_VALUES",
    "ATTR_ATTEMPT",
    "ATTR_BLUEPRINT",
    "ATTR_BYTES",
    "ATTR_CANCELLED",
    "ATTR_CHECKPOINT_PATH",
    "ATTR_CHOSEN",
    "ATTR_COMPILE_BACKEND",
    "ATTR_DURATION_S",
    "ATTR_EPOCH",
    "ATTR_ERROR_TYPE",
    "ATTR_GATE_PREFIX",
    "ATTR_KERNEL_ID",
    "ATTR_LIFECYCLE_FROM",
    "ATTR_LIFECYCLE_TO",
    "ATTR_LOSS",
    "ATTR_OUTCOME",
    "ATTR_PARAMS",
    "ATTR_PARAMS_ADDED",
    "ATTR_PROCESS_ROLE",
    "ATTR_RUN_ID",
    "ATTR_SEED_STATE",
    "ATTR_SLOT",
    "ATTR_STEP",
    "ATTR_STORE_HIT",
    "ATTR_STORE_TIER",
    "ATTR_STRATEGY",
    "ATTR_SURGERY_OP",
    "ATTR_TRAIN_LOSS",
    "ATTR_VAL_ACC",
    "ATTR_VAL_LOSS",
    "ATTR_WORKER_PID",
    "EVENT_EPOCH_FIGURES",
    "GROWTH_SPAN_NAMES",
    "METRIC_COMPILE_DURATION",
    "METRIC_LOOP_LAG",
    "METRIC_PARAMS",
    "METRIC_PARAMS_ADDED",
    "METRIC_SEEDS",
    "METRIC_STEP_DURATION",
    "METRIC_STORE_LOOKUPS",
    "METRIC_TRAIN_LOSS",
    "METRIC_VAL_ACC",
    "METRIC_VAL_LOSS",
    "SPAN_CHECKPOINT",
    "SPAN_COMPILE",
    "SPAN_COMPILE_WORKER",
    "SPAN_EPOCH",
    "SPAN_FILE_GLOB",
    "SPAN_GRAFT",
    "SPAN_LIFECYCLE",
    "SPAN_ROLLBACK",
    "SPAN_RUN",
    "SPAN_SELECT",
    "SPAN_STEP",
    "SPAN_STORE_GET",
    "SPAN_STORE_PUT",
    "SPAN_SURGERY",
    "SPAN_VALIDATE",
    "AttributeValue",
    "EventLogger",
    "JsonlMetricExporter",
    "JsonlSpanExporter",
    "LifecycleEvent",
    "MetricLogger",
    "Metrics",
    "MlflowLogger",
    "SpanRecord",
    "StepSampler",
    "Telemetry",
    "TelemetryConfig",
    "TensorBoardLogger",
    "WandbLogger",
    "WorkerTelemetrySpec",
    "add_trace_context",
    "attribute_key",
    "configure_logging",
    "console_span_exporter",
    "extract_context",
    "gate_attributes",
    "inject_context",
    "monitor_loop_lag",
    "normalize_attributes",
    "otlp_configured",
    "otlp_metric_exporter",
    "otlp_span_exporter",
    "quiet_by_default",
    "read_span_records",
    "selection_attributes",
    "span_file_name",
    "span_to_record",
)
