"""What the host-growth operators share: their typed error, the container of blocks they edit, and
the optimizer bookkeeping that carries moments to new parameters.

New parameters join the optimizer group of the parameter they were made from (so weight-decay and
no-decay groups stay as the user built them), appended at the group's end in a fixed order: a
replay on resume puts them at the same positions, which ``Optimizer.load_state_dict`` needs.
"""

from __future__ import annotations

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
