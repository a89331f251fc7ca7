"""What the host-growth operators share: their typed error, the container of blocks they edit, and
the optimizer bookkeeping that carries moments to new parameters.

New parameters join the optimizer group of the parameter they were made from (so weight-decay and
no-decay groups stay as the user built them), appended at the group's end in a fixed order: a
replay on resume puts them at the same positions, which ``Optimizer.load_state_dict`` needs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ._context import SurgeryContext

__all__ = (
    "GrowthCouplingError",
    "add_like",
    "carried_state",
    "container",
    "refuse_sharded",
    "swap_parameter",
)


class GrowthCouplingError(SurgeryError):
    """A host-growth operator met something it cannot grow safely (an unrecognised coupling, a
    custom op on a grown dimension, a gated projection named alone); nothing was changed.

    :ivar module: dotted name of the module (or graph node) concerned.
    :ivar reason: why it cannot be grown.
    """

    def __init__(self, module: str, reason: str, *, operation: str) -> None:
        super().__init__(f"{operation}: cannot grow {module!r}: {reason}", operation=operation)
        self.module = module
        self.reason = reason


def _sharded(model: nn.Module) -> tuple[str, str] | None:
    """``(module name, what shards it)`` for the first FSDP-wrapped module or DTensor parameter
    in ``model``, or ``None`` when nothing in it is sharded."""
    # Nothing can be sharded unless its package was imported: looking the classes up in
    # sys.modules keeps the check free (importing FSDP takes about a second).
    fsdp = sys.modules.get("torch.distributed.fsdp")
    tensor = sys.modules.get("torch.distributed.tensor")
    if fsdp is not None:
        for name, module in model.named_modules():
            if isinstance(module, fsdp.FullyShardedDataParallel):
                return name, "FullyShardedDataParallel"
            if isinstance(module, fsdp.FSDPModule):
                return name, "fully_shard (FSDPModule)"
    if tensor is not None:
        for name, param in model.named_parameters():
            if isinstance(param, tensor.DTensor):
                return name.rpartition(".")[0], f"a DTensor parameter ({name!r})"
    return None


def refuse_sharded(model: nn.Module, operation: str) -> None:
    """Refuse surgery on a model sharded by FSDP (``FullyShardedDataParallel``, ``fully_shard``)
    or holding DTensor parameters: each rank holds only a shard (or a flat buffer) of every
    parameter, so no operator can read or rebuild a whole weight.

    :raises GrowthCouplingError: something in ``model`` is sharded; the message names it and says
        to grow the unwrapped module, then shard it again.
    """
    found = _sharded(model)
    if found is None:
        return
    name, how = found
    raise GrowthCouplingError(
        name or "<root>",
        f"it is sharded by {how}, so no rank holds whole parameters; surgery is refused on "
        "sharded models. Grow the unwrapped module (before fully_shard / "
        "FullyShardedDataParallel, or on a full state dict loaded into an unsharded copy), "
        "rebuild the optimizer, then shard it again",
        operation=operation,
    )


def container(ctx: SurgeryContext, path: str, operation: str) -> nn.ModuleList | nn.Sequential:
    """The ``ModuleList`` or ``Sequential`` of blocks at ``path``.

    :raises SurgeryError: no module there, or it is neither.
    """
    found = ctx.resolve(path, operation=operation)
    if not isinstance(found, (nn.ModuleList, nn.Sequential)):
        raise SurgeryError(
            f"{operation}: {path!r} is a {type(found).__name__}; depth operators edit an "
            "nn.ModuleList or nn.Sequential of blocks",
            operation=operation,
        )
    if len(found) == 0:
        raise SurgeryError(f"{operation}: {path!r} holds no blocks", operation=operation)
    return found


def _group_of(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, Any] | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def carried_state(
    optimizer: torch.optim.Optimizer | None, old: nn.Parameter
) -> dict[str, Any] | None:
    """A copy of ``old``'s optimizer state (tensors cloned), or ``None`` when it has none."""
    if optimizer is None or old not in optimizer.state:
        return None
    return {
        key: value.clone() if isinstance(value, torch.Tensor) else value
        for key, value in optimizer.state[old].items()
    }


def add_like(
    ctx: SurgeryContext, source: nn.Parameter, new: nn.Parameter, state: dict[str, Any] | None
) -> None:
    """Append ``new`` to the optimizer group holding ``source`` (the first group when none
    does), with ``state``. The transaction's optimizer snapshot undoes it on rollback."""
    optimizer = ctx.optimizer
    if optimizer is None or not new.requires_grad:
        return
    group = _group_of(optimizer, source) or optimizer.param_groups[0]
    if any(p is new for p in group["params"]):
        return
    group["params"].append(new)
    if state:
        optimizer.state[new] = state


def swap_parameter(
    ctx: SurgeryContext, old: nn.Parameter, new: nn.Parameter, state: dict[str, Any] | None
) -> None:
    """Put ``new`` where ``old`` stood in its optimizer group, with ``state`` (see
    :meth:`SurgeryContext.replace_parameter`)."""
    ctx.replace_parameter(old, new, state)
