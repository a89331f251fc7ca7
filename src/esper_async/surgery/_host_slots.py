"""Seed slots inside a growing host: keep their bookkeeping true, or refuse.

Host growth and seeds coexist under two rules:

* a **dormant** slot (no seed, never widened by :class:`WidenSlot`) whose host grows gets its
  contract's width updated, so a seed germinated later is built for the new width; a dormant slot
  copied or moved by a depth operator gets the name of its new place (``find_slots`` keys slots
  by name, so a copy keeps its own lifecycle);
* a slot that **holds a seed** (or maps a seed onto a widened host) is refused with
  :class:`GrowthCouplingError`: its seed was built for the old width, and a copied seed would run
  in two places under one name. Grow the host before germinating there, or once the seed is
  culled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from ..seeds import SeedSlot
from ._context import SurgeryContext
from ._host_common import GrowthCouplingError

__all__ = ("check_dormant", "grown_slot_contracts", "rename_slots", "slot_of_host")


def check_dormant(slot: SeedSlot, path: str, why: str, operation: str) -> None:
    """:raises GrowthCouplingError: ``slot`` holds a seed or a unit map."""
    if slot.seed is not None or slot.unit_map is not None:
        held = (
            f"a seed ({slot.lifecycle.state.value})"
            if slot.seed is not None
            else "a unit map from an earlier WidenSlot"
        )
        raise GrowthCouplingError(
            path,
            f"this seed slot holds {held}; {why}. Grow the host while its slots are dormant",
            operation=operation,
        )


def slot_of_host(ctx: SurgeryContext, path: str, operation: str) -> str | None:
    """The dotted name of the seed slot whose host is at ``path`` (``None``: not a slot's host)."""
    parent, _, name = path.rpartition(".")
    if name != "host" or not parent:
        return None
    holder = ctx.resolve(parent, operation=operation)
    return parent if isinstance(holder, SeedSlot) else None


def grown_slot_contracts(
    ctx: SurgeryContext, slots: Iterable[str], widths: dict[str, int], operation: str
) -> None:
    """Give each dormant slot in ``slots`` its host's new output width (``widths[slot]``) in its
    contract: the last dimension of a token or linear contract, the first of a conv one."""
    for path in slots:
        slot = ctx.resolve(path, operation=operation)
        assert isinstance(slot, SeedSlot)
        contract = slot.contract
        if contract is None:
            continue
        shape = list(contract.shape)
        at = 0 if len(shape) == 3 else len(shape) - 1
        if shape[at] == widths[path]:
            continue
        shape[at] = widths[path]
        ctx.set_attribute(
            slot, "contract", dataclasses.replace(contract, shape=tuple(shape)), changed=path
        )


def slots_in(block: nn.Module) -> list[tuple[str, SeedSlot]]:
    """The seed slots inside ``block``, with their names relative to it."""
    return [(name, m) for name, m in block.named_modules() if isinstance(m, SeedSlot)]


def rename_slots(
    ctx: SurgeryContext, container: str, blocks: list[nn.Module], operation: str
) -> None:
    """Name every slot in ``blocks`` (now at ``container.{i}``) after its place; a slot that
    holds a seed and would change name is refused."""
    for index, block in enumerate(blocks):
        for relative, slot in slots_in(block):
            name = f"{container}.{index}.{relative}" if relative else f"{container}.{index}"
            if slot.slot_name == name:
                continue
            check_dormant(
                slot,
                slot.slot_name,
                "depth growth would copy or move it to another place",
                operation,
            )
            ctx.set_attribute(slot, "slot_name", name, changed=container)
            ctx.set_attribute(slot.lifecycle, "slot", name, changed=container)
