"""Records of the host-growth operators (JSON-ready), for replay on resume (see ``_replay``).

Replay rebuilds the structure; the checkpoint's tensors then give the values. So a record keeps
what decides shapes and positions, and drops what only decides values: an
:class:`InsertIdentityBlocks` made with a ``factory`` is replayed as a copy of the block before
it (the same structure when the factory builds blocks of that block's shape; a different one
fails the checkpoint's strict load).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import SurgeryError
from ._conv_width import WidenChannels
from ._gated_width import WidenGated
from ._residual_width import WidenResidual
from ._stack import InsertIdentityBlocks, StackBlocks

__all__ = ("HOST_KINDS", "HostOperation", "host_operation", "host_record")

HostOperation = StackBlocks | InsertIdentityBlocks | WidenResidual | WidenChannels | WidenGated

HOST_KINDS: dict[str, type] = {
    "stack_blocks": StackBlocks,
    "insert_identity_blocks": InsertIdentityBlocks,
    "widen_residual": WidenResidual,
    "widen_channels": WidenChannels,
    "widen_gated": WidenGated,
}


def host_record(operation: object) -> dict[str, Any] | None:
    """``operation`` as a record, or ``None`` when it is not a host-growth operator."""
    if isinstance(operation, StackBlocks):
        return {
            "op": "stack_blocks",
            "blocks": operation.blocks,
            "factor": operation.factor,
            "mode": operation.mode,
            "indices": None if operation.indices is None else list(operation.indices),
        }
    if isinstance(operation, InsertIdentityBlocks):
        return {
            "op": "insert_identity_blocks",
            "blocks": operation.blocks,
            "after": list(operation.after),
            "zero": None if operation.zero is None else list(operation.zero),
        }
    if isinstance(operation, WidenResidual):
        return {
            "op": "widen_residual",
            "width": operation.width,
            "seed": operation.seed,
            "embedding": operation.embedding,
            "head_dim": operation.head_dim,
            "grow_heads": operation.grow_heads,
            "plan": operation.found or operation.plan,
        }
    if isinstance(operation, WidenChannels):
        return {
            "op": "widen_channels",
            "target": operation.target,
            "width": operation.width,
            "seed": operation.seed,
            "plan": operation.found or operation.plan,
        }
    if isinstance(operation, WidenGated):
        return {
            "op": "widen_gated",
            "gate": operation.gate,
            "up": operation.up,
            "width": operation.width,
            "seed": operation.seed,
        }
    return None


def host_operation(record: Mapping[str, Any]) -> HostOperation:
    """The operator a record describes.

    :raises SurgeryError: the record is malformed.
    """
    try:
        kind = record["op"]
        if kind == "stack_blocks":
            indices = record.get("indices")
            return StackBlocks(
                str(record["blocks"]),
                int(record["factor"]),
                record["mode"],
                None if indices is None else tuple(int(i) for i in indices),
            )
        if kind == "insert_identity_blocks":
            zero = record.get("zero")
            return InsertIdentityBlocks(
                str(record["blocks"]),
                tuple(int(i) for i in record["after"]),
                zero=None if zero is None else tuple(str(z) for z in zero),
            )
        if kind == "widen_residual":
            head_dim = record.get("head_dim")
            return WidenResidual(
                int(record["width"]),
                seed=int(record["seed"]),
                embedding=record.get("embedding"),
                head_dim=None if head_dim is None else int(head_dim),
                grow_heads=bool(record.get("grow_heads", False)),
                plan=record.get("plan"),
            )
        if kind == "widen_channels":
            return WidenChannels(
                str(record["target"]),
                int(record["width"]),
                seed=int(record["seed"]),
                plan=record.get("plan"),
            )
        if kind == "widen_gated":
            return WidenGated(
                str(record["gate"]),
                str(record["up"]),
                int(record["width"]),
                seed=int(record["seed"]),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise SurgeryError(
            f"malformed host-growth record {dict(record)!r}: {exc}", operation="replay"
        ) from exc
    raise SurgeryError(f"unknown host-growth record {dict(record)!r}", operation="replay")
