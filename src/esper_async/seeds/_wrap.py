"""``wrap``: inject seed slots into chosen modules of a host model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..blueprints import SlotContract, SlotKind
from ..errors import BlueprintError
from ._slot import SeedSlot

__all__ = ("find_slots", "wrap")

Target = str | type[nn.Module]


def _matches(name: str, module: nn.Module, targets: list[Target]) -> bool:
    return any(
        (isinstance(t, str) and t == name) or (isinstance(t, type) and isinstance(module, t))
        for t in targets
    )


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def wrap(
    model: nn.Module,
    targets: Iterable[Target],
    *,
    example_input: torch.Tensor,
) -> dict[str, SeedSlot]:
    """Replace the chosen modules of ``model`` (in place) with :class:`SeedSlot` s around them.

    A target is a module path (``"features.2"``, ``"fc1"``: any module, a whole block included) or
    a module type (``nn.Conv2d``, ``nn.Linear``): every module of that type is wrapped. A module in
    one already chosen is not wrapped again. The model is run once on ``example_input`` (no grad)
    to learn each slot's output shape, which becomes the slot's :class:`SlotContract`.

    :param model: the host; modified in place.
    :param targets: module paths and/or module types.
    :param example_input: one batch the model accepts.
    :returns: the new slots by name, in the model's module order.
    :raises BlueprintError: if a target matches nothing, or a chosen module's output is neither
        ``(N, C, H, W)`` nor ``(N, F)``.
    """
    wanted = list(targets)
    if not wanted:
        raise BlueprintError("wrap() needs at least one target (a module path or a module type)")
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, SeedSlot):
            continue
        if any(name.startswith(c + ".") for c in chosen):
            continue
        if _matches(name, module, wanted):
            chosen.append(name)
    names = {t for t in wanted if isinstance(t, str)}
    missing = sorted(names - set(chosen))
    if missing:
        available = [n for n, _ in model.named_modules() if n]
        raise BlueprintError(f"wrap(): no module named {missing}; modules: {available}")
    if not chosen:
        raise BlueprintError(f"wrap(): no module of the model matches {wanted}")

    slots: dict[str, SeedSlot] = {}
    for name in chosen:
        slot = SeedSlot(model.get_submodule(name), name=name)
        _set_submodule(model, name, slot)
        slots[name] = slot

    shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
    hooks = [
        slot.register_forward_hook(
            lambda mod, _inp, out, n=n: shapes.__setitem__(n, (out.shape, out.dtype))
        )
        for n, slot in slots.items()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name, slot in slots.items():
        if name not in shapes:
            raise BlueprintError(f"wrap(): module {name!r} was not called by the model's forward")
        shape, dtype = shapes[name]
        kinds = {4: SlotKind.CONV, 2: SlotKind.LINEAR}
        if len(shape) not in kinds:
            raise BlueprintError(
                f"wrap(): module {name!r} outputs shape {tuple(shape)}; a slot needs (N, C, H, W) "
                "or (N, F)"
            )
        slot.contract = SlotContract(
            kinds[len(shape)], tuple(shape[1:]), str(dtype).removeprefix("torch.")
        )
    return slots


def find_slots(model: nn.Module) -> dict[str, SeedSlot]:
    """Every :class:`SeedSlot` in ``model``, by slot name, in module order."""
    return {m.slot_name: m for m in model.modules() if isinstance(m, SeedSlot)}
