"""The names esper_async gives its spans, span attributes and metrics.

Every name lives here as a constant so that the trainer, the compiler and the viewer agree on one
scheme; ``docs/telemetry.md`` lists the same names with their meaning, and a test fails when one
of these constants is missing from that page.

Attribute names are dotted and start with ``esper.``; span names are the attribute namespace of
the unit of work they time (``esper.compile``, ``esper.store.get``). Keyword arguments given to
:meth:`Telemetry.span` are turned into attribute names by :func:`attribute_key`
(``lifecycle__from`` -> ``esper.lifecycle.from``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, Final

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
    "attribute_key",
    "gate_attributes",
    "normalize_attributes",
    "selection_attributes",
)

#: A value OpenTelemetry accepts as a span attribute.
AttributeValue = (
    str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]
)

# -- span names ------------------------------------------------------------------------------
SPAN_RUN: Final = "esper.run"
SPAN_EPOCH: Final = "esper.epoch"
SPAN_STEP: Final = "esper.step"
SPAN_COMPILE: Final = "esper.compile"
#: The part of a compile that runs in the worker process, a child of :data:`SPAN_COMPILE`.
SPAN_COMPILE_WORKER: Final = "esper.compile.worker"
SPAN_VALIDATE: Final = "esper.validate"
SPAN_STORE_GET: Final = "esper.store.get"
SPAN_STORE_PUT: Final = "esper.store.put"
SPAN_SELECT: Final = "esper.select"
SPAN_LIFECYCLE: Final = "esper.lifecycle"
SPAN_GRAFT: Final = "esper.graft"
SPAN_SURGERY: Final = "esper.surgery"
SPAN_ROLLBACK: Final = "esper.surgery.rollback"
SPAN_CHECKPOINT: Final = "esper.checkpoint"

#: Spans the viewer lists on its timeline of growth events.
GROWTH_SPAN_NAMES: Final = frozenset(
    {
        SPAN_SELECT,
        SPAN_COMPILE,
        SPAN_VALIDATE,
        SPAN_GRAFT,
        SPAN_LIFECYCLE,
        SPAN_SURGERY,
        SPAN_ROLLBACK,
        SPAN_CHECKPOINT,
    }
)

# -- attribute names -------------------------------------------------------------------------
ATTR_RUN_ID: Final = "esper.run_id"
ATTR_EPOCH: Final = "esper.epoch"
ATTR_STEP: Final = "esper.step"
ATTR_LOSS: Final = "esper.loss"
ATTR_SLOT: Final = "esper.slot"
ATTR_BLUEPRINT: Final = "esper.blueprint"
#: The sha256 of a kernel artifact (the kernel's identity).
ATTR_KERNEL_ID: Final = "esper.kernel_id"
ATTR_SEED_STATE: Final = "esper.seed.state"
ATTR_LIFECYCLE_FROM: Final = "esper.lifecycle.from"
ATTR_LIFECYCLE_TO: Final = "esper.lifecycle.to"
#: Prefix of the figures a lifecycle gate looked at: ``esper.gate.<figure>`` (a float).
ATTR_GATE_PREFIX: Final = "esper.gate."
ATTR_STRATEGY: Final = "esper.selection.strategy"
ATTR_CHOSEN: Final = "esper.selection.chosen"
#: The arms a selection weighed, parallel to :data:`ATTR_ARM_VALUES`.
ATTR_ARM_NAMES: Final = "esper.selection.arms"
ATTR_ARM_VALUES: Final = "esper.selection.arm_values"
ATTR_COMPILE_BACKEND: Final = "esper.compile.backend"
ATTR_ATTEMPT: Final = "esper.attempt"
ATTR_WORKER_PID: Final = "esper.worker.pid"
ATTR_PROCESS_ROLE: Final = "esper.process.role"
ATTR_STORE_HIT: Final = "esper.store.hit"
ATTR_STORE_TIER: Final = "esper.store.tier"
ATTR_BYTES: Final = "esper.bytes"
ATTR_SURGERY_OP: Final = "esper.surgery.op"
ATTR_PARAMS_ADDED: Final = "esper.params.added"
ATTR_CHECKPOINT_PATH: Final = "esper.checkpoint.path"
#: ``ok``, ``rejected``, ``rolled_back``, ``error`` ... what became of the unit of work.
ATTR_OUTCOME: Final = "esper.outcome"
ATTR_DURATION_S: Final = "esper.duration_s"
ATTR_ERROR_TYPE: Final = "esper.error.type"
#: Set to true on a span whose task was cancelled (not an error).
ATTR_CANCELLED: Final = "esper.cancelled"

# -- metric names ----------------------------------------------------------------------------
METRIC_COMPILE_DURATION: Final = "esper.compile.duration"
METRIC_STORE_LOOKUPS: Final = "esper.store.lookups"
METRIC_SEEDS: Final = "esper.seeds"
METRIC_STEP_DURATION: Final = "esper.step.duration"
METRIC_LOOP_LAG: Final = "esper.loop.lag"
METRIC_PARAMS_ADDED: Final = "esper.params.added"
METRIC_TRAIN_LOSS: Final = "esper.epoch.train_loss"
METRIC_VAL_LOSS: Final = "esper.epoch.val_loss"
METRIC_VAL_ACC: Final = "esper.epoch.val_acc"
METRIC_PARAMS: Final = "esper.params"

#: The span event that carries one epoch's figures (:meth:`Telemetry.epoch_figures`).
EVENT_EPOCH_FIGURES: Final = "esper.epoch.figures"
ATTR_TRAIN_LOSS: Final = "esper.train_loss"
ATTR_VAL_LOSS: Final = "esper.val_loss"
ATTR_VAL_ACC: Final = "esper.val_acc"
ATTR_PARAMS: Final = "esper.params"

_PREFIX: Final = "esper."


def attribute_key(name: str) -> str:
    """Turn a keyword-argument name into an attribute name of the scheme.

    ``slot`` -> ``esper.slot``; a double underscore stands for a dot, so ``lifecycle__from`` ->
    ``esper.lifecycle.from``. A name that already starts with ``esper.`` is kept.

    :param name: the keyword's name.
    :returns: the dotted attribute name.
    """
    if name.startswith(_PREFIX):
        return name
    return _PREFIX + name.replace("__", ".")


def _coerce(value: Any) -> AttributeValue | None:
    """Map a Python value onto a type OpenTelemetry accepts, or ``None`` to drop it."""
    if value is None:
        return None
    if isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _coerce(value.item())  # a 0-d torch tensor or numpy scalar
    if isinstance(value, Sequence):
        items = [_coerce(v) for v in value]
        kinds = {type(v) for v in items}
        if len(kinds) == 1 and None not in items:
            return items  # type: ignore[return-value]
        return [str(v) for v in value]
    return str(value)


def normalize_attributes(
    attributes: Mapping[str, Any] | None = None, /, **short: Any
) -> dict[str, AttributeValue]:
    """Build a span's attributes from full names and keyword short names.

    ``None`` values are dropped; enums become their name, paths and other objects their ``str``,
    0-d tensors their Python number.

    :param attributes: attributes under their full names (``{"esper.slot": "l1"}``).
    :param short: attributes under short names, expanded by :func:`attribute_key`.
    :returns: a new dict of OpenTelemetry-compatible attributes.
    """
    out: dict[str, AttributeValue] = {}
    items = list((attributes or {}).items()) + [(attribute_key(k), v) for k, v in short.items()]
    for key, value in items:
        coerced = _coerce(value)
        if coerced is not None:
            out[key] = coerced
    return out


def gate_attributes(gates: Mapping[str, float]) -> dict[str, float]:
    """The figures a lifecycle gate looked at, as ``esper.gate.<figure>`` attributes.

    :param gates: figure name -> value (e.g. ``{"val_loss_delta": -0.02, "alpha": 1.0}``).
    :returns: the attributes; non-finite values are kept as floats (OTLP carries them).
    """
    return {ATTR_GATE_PREFIX + name: float(value) for name, value in gates.items()}


def selection_attributes(
    *, strategy: str, chosen: str, arms: Mapping[str, float]
) -> dict[str, AttributeValue]:
    """The attributes of a selection decision: the strategy, the chosen arm, every arm's value.

    :param strategy: the strategy's name (``ucb1``, ``thompson`` ...).
    :param chosen: the chosen arm, e.g. ``"layer2.slot0/conv3x3"``.
    :param arms: each arm's value as the strategy scored it.
    :raises ValueError: when ``chosen`` is not one of ``arms`` or a value is NaN.
    """
    if chosen not in arms:
        raise ValueError(f"selection chose arm {chosen!r}, which is not among {sorted(arms)}")
    names = sorted(arms)
    values = [float(arms[n]) for n in names]
    if any(math.isnan(v) for v in values):
        raise ValueError(
            f"selection arm values contain NaN: {dict(zip(names, values, strict=True))}"
        )
    return {
        ATTR_STRATEGY: strategy,
        ATTR_CHOSEN: chosen,
        ATTR_ARM_NAMES: names,
        ATTR_ARM_VALUES: values,
    }
