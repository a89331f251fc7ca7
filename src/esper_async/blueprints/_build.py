"""``build``: a blueprint and a slot contract become an ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from .._exceptions import BlueprintError
from ._families import get_family
from ._ir import Blueprint, SlotContract

__all__ = ("build",)


def build(blueprint: Blueprint, contract: SlotContract, *, seed: int | None = None) -> nn.Module:
    """Build the eager module a blueprint describes, for a slot with ``contract``.

    The module maps a batch of the host's outputs, shape ``(N, *contract.shape)``, to a tensor of
    the same shape. With ``seed`` its initial weights are a pure function of the seed, and the
    caller's global RNG state is left as it was.

    :param blueprint: what to build.
    :param contract: the slot's shape contract.
    :param seed: an RNG seed for the initial weights, or ``None`` for the global RNG.
    :raises BlueprintError: if the blueprint does not fit the contract, or its family's code fails.
    """
    blueprint.check_fits(contract)
    family = get_family(blueprint.family)
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
            f"building {blueprint.name} for a {contract.kind.value} slot of shape "
            f"{contract.shape} failed: {exc}",
            blueprint=blueprint.name,
        ) from exc
    return module.to(dtype=getattr(torch, contract.dtype))
