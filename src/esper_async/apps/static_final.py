"""The ``static_final`` arm of a growth comparison: growth's final architecture, from scratch.

Growth ends with some seeds fossilized into the host. To tell whether growing paid, compare it
with a model that *starts* with that architecture: the same host, wrapped at the same slots, with
a freshly initialised module of each fossilized seed's blueprint grafted and set FOSSILIZED
before step 0 (the same function-preserving initialisation a growth seed gets), trained with the
same recipe and budget. :func:`fossils_of` reads what growth ended with; :func:`graft_fossils`
puts fresh copies into another model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..blueprints import Blueprint, build
from ..errors import DemoConfigError
from ..seeds import SeedSlot, SeedState, find_slots

__all__ = ("FRESH_SEED_OFFSET", "fossils_of", "graft_fossils")

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
