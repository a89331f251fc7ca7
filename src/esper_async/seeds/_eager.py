"""Seeds that train before their kernel is ready (``graft="eager"``).

A germinated seed starts at once as its blueprint's *eager module*: :func:`~esper_async.build`
of the same blueprint, contract and seed the compile uses, in the training process. That module is
exactly the validator's reference (``compiler/_validator.py`` compares every kernel with it), and
its initial weights are the kernel's (the validator's ``initial_weights`` check). When the
validated kernel arrives, :func:`adopt_parameters` makes the kernel's program run on the eager
module's own ``Parameter`` objects, and the kernel replaces the module in the slot: the weights
trained so far and the optimizer's state (keyed by parameter) carry over with nothing copied.

Reproducibility: in the ``export`` form the kernel's program runs the same ATen ops on the same
tensors as the eager module, so the swap changes no value and a run grows the same weights
whatever the compile latency (``tests/seeds/test_eager.py`` checks both). Forms that reorder
arithmetic (``inductor``, ``bf16``) agree only within the validator's tolerances; a run that must
be bit-reproducible keeps ``OptimizerOptions(forms=("export",))`` (see ``docs/async.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..blueprints import Blueprint, SlotContract, build
from ..errors import SeedRuntimeError

__all__ = ("EAGER_PREFIX", "EagerSeed", "adopt_parameters", "eager_seed")

#: What stands in ``SeedSlot.kernel_id`` while a slot runs its eager module: no kernel id (a
#: sha256) ever starts with it, and ``Grower.kernels`` never holds it.
EAGER_PREFIX = "eager:"


class EagerSeed(nn.Module):
    """A blueprint's eager module in a slot, until its validated kernel replaces it.

    :param module: ``build(blueprint, contract, seed=seed)``, on the slot's device.
    :param blueprint: the blueprint it was built from.
    :param init_seed: the init seed it was built with (a checkpoint records it, so that a
        resumed run rebuilds the same module from the blueprint before loading the trained
        weights).
    :ivar module: the eager module (its parameters are the ones the kernel will run on).
    """

    def __init__(self, module: nn.Module, blueprint: Blueprint, init_seed: int) -> None:
        super().__init__()
        self.module = module
        self.blueprint = blueprint
        self.init_seed = init_seed

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Map host outputs ``(N, *shape)`` to a contribution of the same shape."""
        return self.module(h)  # type: ignore[no-any-return]

    @property
    def stand_in_id(self) -> str:
        """The slot's ``kernel_id`` while this module runs: ``"eager:<blueprint id>"``."""
        return EAGER_PREFIX + self.blueprint.id[:16]


def eager_seed(
    blueprint: Blueprint, contract: SlotContract, *, seed: int, device: torch.device | str
) -> EagerSeed:
    """The eager module a germinated seed trains as until its kernel is ready.

    :param blueprint: the germinated blueprint.
    :param contract: the slot's contract.
    :param seed: the init seed the compile uses (the grower's ``seed``).
    :param device: the slot's device.
    :raises BlueprintError: the blueprint does not fit ``contract``, or its family fails.
    """
    return EagerSeed(build(blueprint, contract, seed=seed).to(device), blueprint, seed)


def adopt_parameters(kernel: nn.Module, eager: EagerSeed, *, slot: str = "") -> None:
    """Make ``kernel``'s program (``kernel.program``) run on ``eager``'s parameter objects, and
    copy ``eager``'s buffers into it, in place.

    Parameters pair up in order, as the validator pairs them with the eager reference; a layout
    that differs is refused before anything changes.

    :param kernel: a freshly loaded :class:`~esper_async.kernels.KernelModule` not yet run (its
        execution form wraps ``program`` lazily, so it sees the adopted parameters).
    :param eager: the slot's eager module.
    :param slot: the slot's name, for the error.
    :raises SeedRuntimeError: the kernel's parameters or buffers do not match the eager
        module's in number, shape, dtype or device.
    """
    program: nn.Module = kernel.program  # type: ignore[assignment]
    mine = list(program.named_parameters())
    theirs = list(eager.module.parameters())
    buffers = list(program.named_buffers())
    their_buffers = list(eager.module.buffers())
    layout = [(p.shape, p.dtype, p.device) for _, p in mine + buffers]
    wanted = [(p.shape, p.dtype, p.device) for p in theirs + their_buffers]
    if layout != wanted:
        raise SeedRuntimeError(
            f"the kernel for slot {slot!r} ({eager.blueprint.name}) does not lay out its "
            f"parameters as the eager module it replaces ({len(mine)} parameters and "
            f"{len(buffers)} buffers against {len(theirs)} and {len(their_buffers)}); the seed is "
            "culled and its blueprint's breaker records a failure",
            slot=slot,
        )
    for (name, _), param in zip(mine, theirs, strict=True):
        owner, _, leaf = name.rpartition(".")
        program.get_submodule(owner)._parameters[leaf] = param
    with torch.no_grad():
        for (_, buffer), value in zip(buffers, their_buffers, strict=True):
            buffer.copy_(value)
