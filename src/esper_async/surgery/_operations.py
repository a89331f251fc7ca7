"""Structural operations: insert a layer or block, remove a layer (with a bridge), add a residual.

An operation is a small frozen dataclass with ``preserves_function``, ``describe()`` and
``apply(ctx)``. ``apply`` runs inside a transaction and changes the model only through the
:class:`~esper_async.surgery._context.SurgeryContext`, which journals every change for rollback; it
never writes into an existing tensor or module (see ``_context``). The transaction adds new
parameters to the optimizer and drops removed ones after each operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import SurgeryError
from ._context import SurgeryContext, module_list
from ._modules import SkipAround, shortcut_for

__all__ = ("AddResidual", "InsertAfter", "RemoveLayer", "SurgeryOperation", "place_like")


@runtime_checkable
class SurgeryOperation(Protocol):
    """An architecture change a transaction can stage.

    ``preserves_function`` promises that the model's output on any input is unchanged (within float
    tolerance) right after ``apply``; the transaction checks the promise on its probe batch.
    """

    @property
    def preserves_function(self) -> bool: ...

    def describe(self) -> str:
        """A short, human-readable description (used in errors and logs)."""
        ...

    def apply(self, ctx: SurgeryContext) -> None:
        """Change the model through ``ctx``.

        :raises SurgeryError: the operation does not fit the model; the transaction undoes any part
            done.
        """
        ...


def place_like(new: nn.Module, reference: nn.Module, fallback: nn.Module) -> nn.Module:
    """Move ``new`` to the device and floating dtype of ``reference``'s (else ``fallback``'s)
    parameters."""
    anchor = next(iter(reference.parameters()), None)
    if anchor is None:
        anchor = next(iter(fallback.parameters()), None)
    if anchor is None:
        return new
    return new.to(device=anchor.device, dtype=anchor.dtype)


@dataclass(frozen=True)
class InsertAfter:
    """Insert ``module`` right after the module at ``target`` (its output feeds ``module``).

    Inside an ``nn.Sequential`` the new module becomes the next entry (digit names are renumbered);
    elsewhere the target is replaced by ``nn.Sequential(target, module)``. For function preservation
    use an identity-initialised layer (:func:`identity_linear`, :func:`identity_conv2d`) or a
    :class:`GatedResidual` block.

    :param target: dotted name of the module to insert after.
    :param module: the new module; it is moved to the target's device and dtype.
    :param preserves_function: whether ``module`` starts as the identity on the target's output.
    """

    target: str
    module: nn.Module
    preserves_function: bool = True

    def describe(self) -> str:
        return f"insert {type(self.module).__name__} after {self.target!r}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        old = ctx.resolve(self.target, operation=operation)
        parent, name = ctx.parent_of(self.target, operation=operation)
        if any(m is self.module for m in module_list(ctx.model)):
            raise SurgeryError(
                f"{operation}: this module object is already part of the model; pass a new one",
                operation=operation,
            )
        new = place_like(self.module, old, ctx.model)
        ctx.prefer_group_of(old)
        if isinstance(parent, nn.Sequential):
            new.train(parent.training)
            items = list(parent._modules.items())
            at = [key for key, _ in items].index(name) + 1
            renumber = all(key.isdigit() for key, _ in items)
            items.insert(at, (f"{name}_next", new))
            if renumber:
                items = [(str(i), child) for i, (_, child) in enumerate(items)]
            else:
                taken = {key for key, _ in items[:at] + items[at + 1 :]}
                key, suffix = f"{name}_next", 1
                while key in taken:
                    key, suffix = f"{name}_next{suffix}", suffix + 1
                items[at] = (key, new)
            ctx.keep(self.target.rpartition(".")[0], operation=operation)
            parent._modules.clear()
            parent._modules.update(items)
        else:
            ctx.replace(self.target, nn.Sequential(old, new), operation=operation)


@dataclass(frozen=True)
class RemoveLayer:
    """Remove the module at ``target``, bridging its input to its output's shape.

    The bridge is an identity where the module keeps the activation's shape, else a learned
    projection (a Linear, or a strided 1x1 Conv2d) initialised by least squares to imitate the
    removed module on the probe batch. Removal does not promise function preservation.

    :param target: dotted name of the module to remove (not the root).
    :param bridge: ``"auto"`` (identity if shapes agree, else projection), ``"identity"`` or
        ``"projection"``.
    """

    target: str
    bridge: Literal["auto", "identity", "projection"] = "auto"

    @property
    def preserves_function(self) -> bool:
        return False

    def describe(self) -> str:
        return f"remove {self.target!r} ({self.bridge} bridge)"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        if self.bridge not in ("auto", "identity", "projection"):
            raise SurgeryError(
                f"{operation}: bridge must be 'auto', 'identity' or 'projection'",
                operation=operation,
            )
        old = ctx.resolve(self.target, operation=operation)
        ctx.parent_of(self.target, operation=operation)
        x, y = _tensor_call(ctx, old, operation)
        if self.bridge == "identity" and x.shape != y.shape:
            raise SurgeryError(
                f"{operation}: an identity bridge needs equal shapes, but {self.target!r} maps "
                f"{tuple(x.shape)} → {tuple(y.shape)}; use bridge='projection' or 'auto'",
                operation=operation,
            )
        bridge = shortcut_for(
            x.shape, y.shape, operation=operation, force_projection=self.bridge == "projection"
        )
        if not isinstance(bridge, nn.Identity):
            _fit_least_squares(bridge, x, y)
        ctx.prefer_group_of(old)
        ctx.replace(self.target, place_like(bridge, old, ctx.model), operation=operation)


def _tensor_call(
    ctx: SurgeryContext, module: nn.Module, operation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first tensor input and the tensor output of ``module``'s first call on the probe
    batch."""
    call = ctx.capture([module], operation=operation)[id(module)]
    if not call.args or not isinstance(call.args[0], torch.Tensor):
        raise SurgeryError(
            f"{operation}: {type(module).__name__} is not called with a tensor first argument",
            operation=operation,
        )
    if not isinstance(call.output, torch.Tensor):
        raise SurgeryError(
            f"{operation}: {type(module).__name__} does not return a single tensor",
            operation=operation,
        )
    return call.args[0], call.output


@torch.no_grad()
def _fit_least_squares(bridge: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Set a Linear or 1x1 Conv2d bridge to the least-squares map from ``x`` to ``y`` (float64,
    CPU)."""
    if isinstance(bridge, nn.Conv2d):
        stride = bridge.stride[0]
        x = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    inputs = x.reshape(x.shape[0], -1).double().cpu()
    targets = y.reshape(y.shape[0], -1).double().cpu()
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution
    weight, bias = solution[:-1].T, solution[-1]
    assert isinstance(bridge, (nn.Linear, nn.Conv2d)) and bridge.bias is not None
    bridge.weight.copy_(weight.reshape(bridge.weight.shape))
    bridge.bias.copy_(bias)


@dataclass(frozen=True)
class AddResidual:
    """Wrap the module at ``target`` as ``body(x) + gate * shortcut(x)``, the gate starting at zero.

    The shortcut is an identity where ``target`` keeps the activation's shape, else a Linear or
    strided 1x1 Conv2d projection. Function-preserving.

    :param target: dotted name of the module to wrap (not the root).
    """

    target: str

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        return f"add residual around {self.target!r}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        old = ctx.resolve(self.target, operation=operation)
        ctx.parent_of(self.target, operation=operation)
        x, y = _tensor_call(ctx, old, operation)
        shortcut = place_like(shortcut_for(x.shape, y.shape, operation=operation), old, ctx.model)
        wrapper = SkipAround(old, shortcut, like=y)
        ctx.prefer_group_of(old)
        ctx.replace(self.target, wrapper, operation=operation)
