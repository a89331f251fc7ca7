"""Depth growth of a host: stack trained blocks (G_stack), or insert blocks that start as the
identity.

* :class:`StackBlocks` copies the trained blocks of an ``nn.ModuleList`` or ``nn.Sequential``
  ``factor`` times: ``"whole"`` appends copies of the whole stack after it (G_stack's depthwise
  stacking, ``[b0 b1] -> [b0 b1 b0' b1']``), ``"interleave"`` puts each block's copies right after
  it (``[b0 b1] -> [b0 b0' b1 b1']``). Copies change the function (a copied block adds its branch
  a second time), so the operator does not promise preservation; the transaction still checks
  shapes, finiteness and gradient flow.
* :class:`InsertIdentityBlocks` inserts new blocks whose residual branches' output projections
  start at zero, so each new block is ``x + 0`` at birth: the function is preserved exactly.
  The new block is a copy of the block before it (trained weights; LEMON's depth expansion) or
  made by ``factory``. The output projections are found from the block's torch.fx graph (the
  Linear or Conv2d whose output is added to the block's input), or named in ``zero=``.

Optimizer state: a copy's parameters start with a copy of their source's state (Adam's moments
and ``step``); a zeroed projection starts with empty (zero) moments. New parameters join their
source's optimizer group.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import SurgeryError
from ._context import SurgeryContext
from ._coupling import residual_projections
from ._host_common import add_like, carried_state, container
from ._host_slots import check_dormant, rename_slots, slots_in

__all__ = ("InsertIdentityBlocks", "StackBlocks", "copy_block", "set_blocks")


def copy_block(
    ctx: SurgeryContext,
    block: nn.Module,
    *,
    operation: str,
    zero: tuple[str, ...] = (),
    fresh_state: bool = False,
) -> nn.Module:
    """A deep copy of ``block`` whose parameters join their source's optimizer group with a copy
    of its state; the modules named in ``zero`` (relative to ``block``) start with zero weights,
    zero biases and zero moments.

    :param fresh_state: give every copied parameter empty moments instead of its source's.
    :raises GrowthCouplingError: a seed slot in ``block`` holds a seed.
    """
    for _, slot in slots_in(block):
        check_dormant(slot, slot.slot_name, "depth growth would copy its seed", operation)
    new = copy.deepcopy(block)
    zeroed: set[int] = set()
    with torch.no_grad():
        for name in zero:
            module = new.get_submodule(name)
            for param in module.parameters(recurse=False):
                param.zero_()
                zeroed.add(id(param))
    for (_, old), (_, fresh) in zip(
        block.named_parameters(remove_duplicate=False),
        new.named_parameters(remove_duplicate=False),
        strict=True,
    ):
        state = None if fresh_state else carried_state(ctx.optimizer, old)
        if state is not None and id(fresh) in zeroed:
            state = {
                k: torch.zeros_like(v)
                if isinstance(v, torch.Tensor) and v.shape == old.shape
                else v
                for k, v in state.items()
            }
        add_like(ctx, old, fresh, state)
    return new


def set_blocks(ctx: SurgeryContext, path: str, blocks: list[nn.Module], operation: str) -> None:
    """Replace the children of the container at ``path`` by ``blocks`` (renumbered ``0..n-1``
    where the keys were digits), journalled; the container's parent is journalled too, so the
    transaction validates the change where the container is called."""
    holder = container(ctx, path, operation)
    parent = path.rpartition(".")[0]
    ctx.keep(parent, operation=operation)
    ctx.keep(path, operation=operation)
    keys = list(holder._modules)
    if all(key.isdigit() for key in keys):
        items = [(str(i), block) for i, block in enumerate(blocks)]
    else:
        raise SurgeryError(
            f"{operation}: {path!r} has named entries ({', '.join(keys[:4])}); depth operators "
            "renumber their blocks, so they need an nn.ModuleList or an unnamed nn.Sequential",
            operation=operation,
        )
    for block in blocks:
        block.train(holder.training)
    holder._modules.clear()
    holder._modules.update(items)
    rename_slots(ctx, path, blocks, operation)


@dataclass(frozen=True)
class StackBlocks:
    """Stack the trained blocks of a container ``factor`` times (G_stack), copies carrying their
    weights and optimizer state.

    :param blocks: dotted name of the ``nn.ModuleList`` (or unnamed ``nn.Sequential``) of blocks.
    :param factor: the depth multiple (``>= 2``): ``L`` blocks become ``factor·L`` (or, with
        ``indices``, ``L + (factor - 1)·len(indices)``).
    :param mode: ``"whole"`` (copies of the whole stack appended after it) or ``"interleave"``
        (each block followed by its copies).
    :param indices: which blocks to copy (default: all), in order.
    """

    blocks: str = "blocks"
    factor: int = 2
    mode: Literal["whole", "interleave"] = "whole"
    indices: tuple[int, ...] | None = None

    @property
    def preserves_function(self) -> bool:
        return False

    def describe(self) -> str:
        which = "" if self.indices is None else f" of blocks {list(self.indices)}"
        return f"stack {self.blocks!r} x{self.factor} ({self.mode}){which}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        if self.factor < 2 or self.mode not in ("whole", "interleave"):
            raise SurgeryError(
                f"{operation}: need factor >= 2 and mode 'whole' or 'interleave'",
                operation=operation,
            )
        old = list(container(ctx, self.blocks, operation))
        chosen = _indices(self.indices, len(old), operation)
        if self.mode == "whole":
            new = list(old)
            for _ in range(self.factor - 1):
                new.extend(copy_block(ctx, old[i], operation=operation) for i in chosen)
        else:
            new = []
            for i, block in enumerate(old):
                new.append(block)
                if i in chosen:
                    new.extend(
                        copy_block(ctx, block, operation=operation) for _ in range(self.factor - 1)
                    )
        set_blocks(ctx, self.blocks, new, operation)


@dataclass(frozen=True)
class InsertIdentityBlocks:
    """Insert blocks that are the identity at birth (their residual branches' output projections
    are zero) after the given positions of a container.

    :param blocks: dotted name of the ``nn.ModuleList`` (or unnamed ``nn.Sequential``) of blocks.
    :param after: indices (in the container as it is now) after which a new block goes; an index
        may repeat to insert several.
    :param factory: makes a new block (called with the index it follows); default: a copy of that
        block (trained weights, LEMON's depth expansion).
    :param zero: names (relative to a block) of the output projections to zero; default: found
        from the block's torch.fx graph.
    :param fresh_state: copied blocks start with empty optimizer moments instead of their
        source's.
    """

    blocks: str = "blocks"
    after: tuple[int, ...] = (-1,)
    factory: Callable[[int], nn.Module] | None = None
    zero: tuple[str, ...] | None = None
    fresh_state: bool = False

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        return f"insert identity blocks into {self.blocks!r} after {list(self.after)}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        old = list(container(ctx, self.blocks, operation))
        if not self.after:
            raise SurgeryError(f"{operation}: after= is empty", operation=operation)
        positions = sorted(_index(i, len(old), operation) for i in self.after)
        new: list[nn.Module] = []
        for i, block in enumerate(old):
            new.append(block)
            for _ in range(positions.count(i)):
                new.append(self._make(ctx, i, block, operation))
        set_blocks(ctx, self.blocks, new, operation)

    def _make(self, ctx: SurgeryContext, index: int, block: nn.Module, operation: str) -> nn.Module:
        path = f"{self.blocks}.{index}"
        if self.factory is None:
            for _, slot in slots_in(block):
                check_dormant(slot, slot.slot_name, "depth growth would copy its seed", operation)
            zero = self.zero or _projections(block, path, operation)
            return copy_block(
                ctx, block, operation=operation, zero=tuple(zero), fresh_state=self.fresh_state
            )
        made = self.factory(index)
        anchor = next(iter(block.parameters()), None)
        if anchor is not None:
            made = made.to(device=anchor.device, dtype=anchor.dtype)
        zero = self.zero or _projections(made, path, operation)
        with torch.no_grad():
            for name in zero:
                for param in made.get_submodule(name).parameters(recurse=False):
                    param.zero_()
        sources = list(block.parameters())
        for param in made.parameters():
            source = next((p for p in sources if p.shape == param.shape), None)
            add_like(ctx, source if source is not None else param, param, None)
        return made


_FOUND: dict[tuple[object, ...], tuple[str, ...]] = {}


def _projections(block: nn.Module, path: str, operation: str) -> tuple[str, ...]:
    """:func:`residual_projections`, traced once per block structure (class and submodules):
    inserting several copies of like blocks traces one."""
    key = tuple((name, type(m)) for name, m in block.named_modules())
    if key not in _FOUND:
        if len(_FOUND) > 64:
            _FOUND.clear()
        _FOUND[key] = tuple(residual_projections(block, path, operation=operation))
    return _FOUND[key]


def _index(i: int, size: int, operation: str) -> int:
    if not -size <= i < size:
        raise SurgeryError(
            f"{operation}: block index {i} is out of range for {size} blocks", operation=operation
        )
    return i % size


def _indices(indices: tuple[int, ...] | None, size: int, operation: str) -> list[int]:
    if indices is None:
        return list(range(size))
    chosen = [_index(i, size, operation) for i in indices]
    if len(set(chosen)) != len(chosen):
        raise SurgeryError(f"{operation}: indices repeat a block", operation=operation)
    return sorted(chosen)
