"""``build``: a blueprint and a slot contract become an ``nn.Module``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._exceptions import BlueprintError
from ._checks import clip_text, is_int
from ._families import get_family
from ._ir import Blueprint, SlotContract

__all__ = ("build",)

#: The seeds ``torch.manual_seed`` takes.
_SEED_RANGE = (-(2**63), 2**64 - 1)


def build(blueprint: Blueprint, contract: SlotContract, *, seed: int | None = None) -> nn.Module:
    """Build the eager module a blueprint describes, for a slot with ``contract``.

    The module maps a batch of the host's outputs, shape ``(N, *contract.shape)``, to a tensor of
    the same shape. With ``seed`` its initial weights are a pure function of the seed, and the
    caller's global RNG state is left as it was.

    :param blueprint: what to build.
    :param contract: the slot's shape contract.
    :param seed: an RNG seed for the initial weights (an int in ``[-2**63, 2**64)``), or ``None``
        for the global RNG.
    :raises BlueprintError: if an argument has the wrong type, the blueprint does not fit the
        contract, or its family's code fails.
    """
    _check_arguments(blueprint, contract, seed)
    blueprint.check_fits(contract)
    family = get_family(blueprint.family)
    name = clip_text(blueprint.name)
    try:
        if seed is None:
            module = family.builder(contract, **dict(blueprint.options))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = family.builder(contract, **dict(blueprint.options))
    except BlueprintError:
        raise
    except Exception as exc:
        raise BlueprintError(
            f"building {name} for a {contract.kind.value} slot of shape "
            f"{contract.shape} failed: {clip_text(str(exc), 200)}",
            blueprint=blueprint.name,
        ) from exc
    if not isinstance(module, nn.Module):
        raise BlueprintError(
            f"family {blueprint.family!r} built a {type(module).__name__} for {name}, not an "
            "nn.Module; fix the family's builder",
            blueprint=blueprint.name,
        )
    return module.to(dtype=getattr(torch, contract.dtype))


def _check_arguments(blueprint: Any, contract: Any, seed: Any) -> None:
    """:raises BlueprintError: if an argument of :func:`build` has the wrong type or range."""
    if not isinstance(blueprint, Blueprint):
        raise BlueprintError(f"build() needs a Blueprint, got {type(blueprint).__name__}")
    if not isinstance(contract, SlotContract):
        raise BlueprintError(
            f"build() needs a SlotContract for {clip_text(blueprint.name)}, got "
            f"{type(contract).__name__}",
            blueprint=blueprint.name,
        )
    if seed is not None and not (is_int(seed) and _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]):
        raise BlueprintError(
            f"build() needs an int seed in [-2**63, 2**64) or None, got {type(seed).__name__}",
            blueprint=blueprint.name,
        )
