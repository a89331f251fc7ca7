"""The grower's side of ``graft="eager"``: a germinated seed trains at once as its blueprint's
eager module, and its validated kernel replaces that module at the first step boundary after
the compile (see :mod:`esper_async.seeds._eager` for why this keeps runs reproducible).

The grower calls :func:`start_eager` right after a germination and :func:`eager_for` /
:func:`swap_in_kernel` when a compile finishes; nothing else changes: a failed or refused
compile culls the seed as it would have culled a germinated one, so nothing that was not
validated stays in a slot past its compile. A run that ends before a kernel arrives does not
wait for it: the seed ends as its eager module (the validator's reference), its compile is
cancelled with the pool, and the record says so (an ``ended_eager`` incident,
``FitResult.ended_eager``). A compile that would have failed after the run ended never reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..blueprints import Blueprint
from ..seeds import EagerSeed, SeedSlot, adopt_parameters, eager_seed
from ._optim import add_module_params

__all__ = ("awaits_kernel", "eager_for", "start_eager", "swap_in_kernel")

#: The lifecycle reason of an eager start.
EAGER_REASON = "started as its blueprint's eager module; kernel compiling"


def start_eager(
    slot: SeedSlot,
    *,
    seed: int,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    tracked: Callable[..., Any],
) -> None:
    """Graft ``slot``'s germinated blueprint as its eager module (GERMINATED → TRAINING) and
    add its parameters to ``optimizer``.

    :param slot: a slot just germinated.
    :param seed: the compile's init seed (the grower's).
    :param device: the model's device.
    :param optimizer: the loop's optimizer.
    :param tracked: records the lifecycle event: ``tracked(slot, action, *args)`` runs
        ``action(*args)`` (the grower's :meth:`~esper_async.training.RunState.transition`).
    """
    assert slot.blueprint is not None and slot.contract is not None  # germinate() set them
    module = eager_seed(slot.blueprint, slot.contract, seed=seed, device=device)
    tracked(slot, slot.graft, module, module.stand_in_id, EAGER_REASON)
    add_module_params(optimizer, module)


def eager_for(slot: SeedSlot, blueprint: Blueprint) -> EagerSeed | None:
    """``slot``'s eager module if it runs ``blueprint``'s (live or fossilized), else ``None``."""
    seed = slot.seed
    if isinstance(seed, EagerSeed) and seed.blueprint == blueprint:
        return seed
    return None


def awaits_kernel(slot: SeedSlot, compiling: Mapping[str, Blueprint]) -> bool:
    """Whether ``slot`` still runs its eager module while its kernel compiles: what
    :meth:`Grower.await_kernels <esper_async.training.Grower.await_kernels>` waits for, when
    asked (the run's end does not wait). Waiting only there, never at an epoch boundary, keeps
    the run's decisions the same whatever the compile latency."""
    return isinstance(slot.seed, EagerSeed) and slot.slot_name in compiling


def swap_in_kernel(slot: SeedSlot, eager: EagerSeed, kernel: nn.Module, kernel_id: str) -> None:
    """Replace ``slot``'s eager module by its validated ``kernel``, which from now on runs on
    the eager module's parameters (weights and optimizer state carried over; nothing is added
    to or removed from the optimizer).

    :raises SeedRuntimeError: the kernel's parameter layout differs from the eager module's.
    """
    adopt_parameters(kernel, eager, slot=slot.slot_name)
    slot.replace_seed(kernel, kernel_id)
