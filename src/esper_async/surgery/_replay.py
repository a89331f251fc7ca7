"""Committed widenings and host growths as plain records, and their replay on a freshly built
model.

A checkpoint holds tensors shaped by every surgery committed before it. Resuming builds the model
afresh, so the trainer records each committed operation (:func:`operation_record`, JSON-ready)
and, before loading a checkpoint's tensors, replays the records on the new model
(:func:`replay_operations`). Replay makes the same structure (the operations are deterministic
given their ``seed``); the checkpoint's tensors then overwrite the values, so replay skips the
probe and its validation, which the operation passed when it was first committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ._context import SurgeryContext
from ._host_records import HOST_KINDS, HostOperation, host_operation, host_record
from ._widen import Widen
from ._widen_slot import WidenSlot

__all__ = ("operation_from_record", "operation_record", "replay_init", "replay_operations")

_KINDS = {"widen": Widen, "widen_slot": WidenSlot, **HOST_KINDS}


def operation_record(operation: Widen | WidenSlot | HostOperation) -> dict[str, Any]:
    """``operation`` as JSON-ready data (the inverse of :func:`operation_from_record`).

    :raises SurgeryError: for an operation that cannot be recorded (only widenings and the
        host-growth operators can).
    """
    host = host_record(operation)
    if host is not None:
        return host
    if isinstance(operation, WidenSlot):
        record: dict[str, Any] = {
            "op": "widen_slot",
            "target": operation.target,
            "width": operation.width,
            "seed": operation.seed,
        }
        if operation.init != "net2wider":
            record["init"] = operation.init
        return record
    if isinstance(operation, Widen):
        record = {
            "op": "widen",
            "target": operation.target,
            "width": operation.width,
            "seed": operation.seed,
        }
        if operation.init != "net2wider":
            record["init"] = operation.init
        if operation.consumers is not None:
            record["consumers"] = list(operation.consumers)
            record["norms"] = list(operation.norms)
        return record
    raise SurgeryError(
        f"{type(operation).__name__} cannot be recorded for replay; only Widen, WidenSlot and the "
        "host-growth operators can",
        operation=str(operation),
    )


def replay_init(init: str) -> str:
    """The init a recorded widening is replayed with: its own, except ``"gradmax"``, whose batch
    is gone; it is replayed as ``"zero_fanout"`` (the same shapes, and the same zero fan-out).
    Replay makes structure: the values come from the checkpoint loaded after it."""
    return "zero_fanout" if init == "gradmax" else init


def operation_from_record(record: Mapping[str, Any]) -> Widen | WidenSlot | HostOperation:
    """The operation a record describes (a ``"gradmax"`` widening comes back as
    ``"zero_fanout"``: see :func:`replay_init`).

    :raises SurgeryError: the record names no known operation.
    """
    kind = record.get("op")
    if kind in HOST_KINDS:
        return host_operation(record)
    init = replay_init(str(record.get("init", "net2wider")))
    if kind == "widen_slot":
        return WidenSlot(
            str(record["target"]), int(record["width"]), seed=int(record["seed"]), init=init
        )
    if kind == "widen":
        consumers = record.get("consumers")
        return Widen(
            str(record["target"]),
            int(record["width"]),
            consumers=None if consumers is None else tuple(consumers),
            norms=tuple(record.get("norms", ())),
            seed=int(record["seed"]),
            init=init,
        )
    raise SurgeryError(
        f"unknown surgery record {dict(record)!r}; known operations: {', '.join(sorted(_KINDS))}",
        operation="replay",
    )


def replay_operations(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    records: Iterable[Mapping[str, Any]],
) -> None:
    """Apply recorded operations to ``model`` (and swap their parameters in ``optimizer``), in
    order, without a probe or validation. Call it on a freshly built model before loading a
    state saved after the operations.

    :raises SurgeryError: a record does not fit the model (it was not built as the recorded one);
        operations before it stay applied.
    """
    ctx = SurgeryContext(model, optimizer, probe=None)
    for record in records:
        operation = operation_from_record(record)
        before = list(ctx.model.parameters())
        operation.apply(ctx)
        ctx.sync_optimizer(before)
