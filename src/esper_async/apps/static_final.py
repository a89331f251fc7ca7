"""The ``static_final`` arm of a growth comparison: growth's final architecture, from scratch.

Growth ends with some seeds fossilized into the host. To tell whether growing paid, compare it
with a model that *starts* with that architecture: the same host, wrapped at the same slots, with
a freshly initialised module of each fossilized seed's blueprint grafted and set FOSSILIZED
before step 0 (the same function-preserving initialisation a growth seed gets), trained with the
same recipe and budget. :func:`fossils_of` reads what growth ended with; :func:`graft_fossils`
puts fresh copies into another model.

Growth may also have widened host layers (``Trainer.surgeries``: surgery, or the controller's
width growth). :func:`graft_widenings` gives another model the same widths: it replays the
recorded widenings (structure only) and then re-initialises every layer and batch norm whose
shape changed, as if the wider model had been built directly: with PyTorch's default
initialisation, or the host's own where it differs (``reinit=``; a GPT's N(0, 0.02),
:func:`~esper_async.apps.gpt.init_like_new`). Call it before :func:`graft_fossils`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..blueprints import Blueprint, build
from ..errors import DemoConfigError
from ..seeds import SeedSlot, SeedState, find_slots
from ..surgery import replay_operations

__all__ = ("FRESH_SEED_OFFSET", "fossils_of", "graft_fossils", "graft_widenings")

#: Added to a run's seed for the fresh modules (never a growth kernel's seed).
FRESH_SEED_OFFSET = 1_000_003


def fossils_of(slots: Mapping[str, SeedSlot]) -> tuple[tuple[str, str], ...]:
    """``(slot name, blueprint JSON)`` of every slot whose seed is FOSSILIZED, in slot order.

    :param slots: the grown model's slots by name (``Trainer.slots`` or ``find_slots(model)``).
    """
    return tuple(
        (name, slot.blueprint.to_json())
        for name, slot in slots.items()
        if slot.state is SeedState.FOSSILIZED and slot.blueprint is not None
    )


def graft_fossils(model: nn.Module, fossils: Sequence[tuple[str, str]], *, seed: int) -> None:
    """Give ``model``'s slots fresh, fossilized modules of the blueprints in ``fossils``.

    :param model: a host wrapped at (at least) the slots ``fossils`` names; modified in place.
    :param fossils: ``(slot name, blueprint JSON)`` pairs, as :func:`fossils_of` returns.
    :param seed: the run's seed; module ``i`` is built with ``FRESH_SEED_OFFSET + 101·seed + i``.
    :raises DemoConfigError: if a slot named in ``fossils`` is not a slot of ``model``.
    :raises BlueprintError: if a blueprint is malformed or does not fit its slot.
    """
    slots = find_slots(model)
    for i, (name, bp_json) in enumerate(fossils):
        slot = slots.get(name)
        if slot is None or slot.contract is None:
            raise DemoConfigError(
                f"static_final: growth fossilized a seed in {name!r}, which is not a slot of "
                f"this model (its slots: {', '.join(slots) or 'none'}); wrap the same slots",
                key="slots",
            )
        blueprint = Blueprint.from_json(bp_json)
        module = build(blueprint, slot.contract, seed=FRESH_SEED_OFFSET + 101 * seed + i)
        slot.germinate(blueprint, "static_final: the architecture growth ended with")
        slot.graft(module, f"static_final:{blueprint.id}", "fresh module of the blueprint")
        slot.start_blending(1, "part of the architecture from the start")
        slot.on_step()  # α reaches 1: PROBATION
        slot.fossilize("part of the architecture from the start")


def graft_widenings(
    model: nn.Module,
    records: Iterable[Mapping[str, Any]],
    *,
    seed: int,
    reinit: Callable[[str, nn.Module], None] | None = None,
) -> list[str]:
    """Give ``model`` the widths growth's widenings ended with, freshly initialised.

    :param model: the host, wrapped as in the growth run; modified in place.
    :param records: the growth run's ``Trainer.surgeries`` (widening records), in order.
    :param seed: the run's seed; the re-initialised layers draw from
        ``FRESH_SEED_OFFSET + 101·seed + 97`` (the global RNG is left as it was).
    :param reinit: called with each changed module's dotted name and the module, in place of
        its ``reset_parameters()``: the host's own initialisation where it is not PyTorch's
        default (a GPT's N(0, 0.02), :func:`~esper_async.apps.gpt.init_like_new`).
    :returns: the dotted names of the modules re-initialised.
    :raises SurgeryError: a record does not fit ``model`` (it is not the host growth started
        from).
    """
    records = list(records)
    if not records:
        return []
    before = {name: _shapes(m) for name, m in model.named_modules()}
    replay_operations(model, None, records)
    changed = [
        name for name, module in model.named_modules()
        if callable(getattr(module, "reset_parameters", None))
        and _shapes(module) and before.get(name) != _shapes(module)
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FRESH_SEED_OFFSET + 101 * seed + 97)
        for name in changed:
            module = model.get_submodule(name)
            if reinit is None:
                module.reset_parameters()  # type: ignore[operator]
            else:
                reinit(name, module)
    return changed


def _shapes(module: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(p.shape) for p in module.parameters(recurse=False))
