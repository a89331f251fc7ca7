"""``wrap``: inject seed slots into chosen modules of a host model.

``wrap`` changes the model only once everything has been checked: it probes every target on the
example input, builds every slot and contract, and only then swaps the slots in. On any error the
model is left exactly as it was.

A slot's kind comes from the host module and the rank of its probed output:

==========================  ====================  =========================================
host                        output                slot
==========================  ====================  =========================================
``Conv1d/2d/3d`` (and       ``(N, C, *spatial)``  CONV, contract ``(C, *spatial)``
transposed)
``Linear``                  ``(N, F)``            LINEAR, contract ``(F,)``
``Linear``                  ``(N, T, F)``         :data:`SEQUENCE_KIND`, contract ``(F,)``
``Linear``                  ``(..., F)``, 4-D+    LINEAR, contract ``(F,)``
another module (a block)    ``(N, F)``            LINEAR
another module              ``(N, T, F)``         CONV if it holds a ``Conv1d``, else
                                                  :data:`SEQUENCE_KIND`
another module              4-D or 5-D            CONV
==========================  ====================  =========================================

A module whose parent never calls it (the parent reads its parameters directly, as
``nn.MultiheadAttention`` reads ``out_proj.weight``) cannot hold a slot: a slot around it would
never run. Chosen by name it is refused, naming the parent; chosen by type it is skipped (with a
debug log), as is any module of the type that the model's forward never calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from torch import nn

from ..blueprints import SlotContract, SlotKind
from ..errors import BlueprintError
from ._slot import SeedSlot

__all__ = ("SEQUENCE_KIND", "find_slots", "wrap")

log = structlog.get_logger(__name__)

Target = str | type[nn.Module]

#: The kind of slot a ``Linear`` (or a block) with a 3-D output ``(N, T, F)`` gets: TOKEN, whose
#: seeds see the sequence. The one switch: ``SlotKind.LINEAR`` would give seeds that see each
#: position alone (the slot runs them on ``(N*T, F)``).
SEQUENCE_KIND: SlotKind = SlotKind.TOKEN

#: Module types whose forward reads a child's parameters instead of calling it.
_READS_CHILD_PARAMS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
_CONV_1D = (nn.Conv1d, nn.ConvTranspose1d)


@dataclass
class _Candidate:
    name: str
    module: nn.Module
    by_name: bool
    parent: str  # "" for the model itself
    outputs: list[tuple[tuple[int, ...], torch.dtype] | str] = field(default_factory=list)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def _check_targets(targets: Iterable[Target]) -> tuple[set[str], tuple[type[nn.Module], ...]]:
    wanted = list(targets)
    if not wanted:
        raise BlueprintError("wrap() needs at least one target (a module path or a module type)")
    for t in wanted:
        if not isinstance(t, str) and not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise BlueprintError(
                f"wrap(): a target is a module path or an nn.Module type, got {type(t).__name__}"
            )
    return {t for t in wanted if isinstance(t, str)}, tuple(
        t for t in wanted if isinstance(t, type)
    )


def _candidates(
    model: nn.Module, names: set[str], types: tuple[type[nn.Module], ...]
) -> list[_Candidate]:
    """Every module matching a target, in module order; slots and their insides excluded."""
    found: list[_Candidate] = []
    in_slots: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(s + ".") for s in in_slots):
            if name in names:
                raise BlueprintError(
                    f"wrap(): module {name!r} is inside a seed slot already; wrap it by its "
                    "slot's name or leave it"
                )
            continue
        if isinstance(module, SeedSlot):
            if name in names:
                raise BlueprintError(
                    f"wrap(): module {name!r} is a seed slot already (an earlier wrap() made "
                    "it); wrap each module once"
                )
            in_slots.append(name)
            continue
        if name in names or isinstance(module, types):
            found.append(_Candidate(name, module, name in names, _parent(name)))
    missing = sorted(names - {c.name for c in found})
    if missing:
        available = [n for n, _ in model.named_modules() if n][:20]
        raise BlueprintError(f"wrap(): no module named {missing}; modules: {available}")
    if not found:
        raise BlueprintError(f"wrap(): no module of the model matches {sorted(map(str, types))}")
    return found


def _probe(
    model: nn.Module, found: list[_Candidate], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> set[str]:
    """Run the model once (eval, no grad), recording each candidate's outputs; returns the paths
    of the candidates' parents that were called ("" is the model)."""
    parents_called: set[str] = {""}

    def record(c: _Candidate) -> Any:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                c.outputs.append((tuple(out.shape), out.dtype))
            else:
                c.outputs.append(type(out).__name__)

        return hook

    def called(path: str) -> Any:
        return lambda *_: parents_called.add(path)

    hooks = [c.module.register_forward_hook(record(c)) for c in found]
    hooks += [
        model.get_submodule(p).register_forward_hook(called(p))
        for p in {c.parent for c in found if c.parent}
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:
        raise BlueprintError(
            f"wrap(): the model raised {type(exc).__name__} on the example input: "
            f"{str(exc)[:200]}; nothing was wrapped"
        ) from exc
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return parents_called


def _not_callable(model: nn.Module, c: _Candidate, parents_called: set[str]) -> str | None:
    """Why ``c`` cannot hold a slot because its forward is never called, or ``None``."""
    parent = model.get_submodule(c.parent) if c.parent else model
    where = f"{c.parent!r} ({type(parent).__name__})" if c.parent else "the model"
    if isinstance(parent, _READS_CHILD_PARAMS) or (c.parent in parents_called and not c.outputs):
        return (
            f"wrap(): module {c.name!r} is never called by its parent {where}, which reads its "
            "parameters directly (as nn.MultiheadAttention does with out_proj), so a slot "
            "around it would never run; wrap the parent instead"
        )
    if not c.outputs:
        return f"wrap(): module {c.name!r} was not called by the model's forward"
    return None


def _kind(module: nn.Module, rank: int) -> SlotKind | None:
    """The slot kind for ``module`` with an output of ``rank`` dims (batch included)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return SlotKind.CONV if 3 <= rank <= 5 else None
    if isinstance(module, nn.Linear):
        return None if rank < 2 else SEQUENCE_KIND if rank == 3 else SlotKind.LINEAR
    if rank == 2:
        return SlotKind.LINEAR
    if rank == 3:
        holds_conv = any(isinstance(m, _CONV_1D) for m in module.modules())
        return SlotKind.CONV if holds_conv else SEQUENCE_KIND
    return SlotKind.CONV if rank in (4, 5) else None


def _contract(c: _Candidate) -> SlotContract:
    outputs = set(c.outputs)
    bad = sorted(o for o in outputs if isinstance(o, str))
    if bad:
        raise BlueprintError(
            f"wrap(): module {c.name!r} returns a {bad[0]}, not a tensor; wrap a module that "
            "returns one tensor"
        )
    contracts = set()
    for shape, dtype in (o for o in outputs if not isinstance(o, str)):
        kind = _kind(c.module, len(shape))
        if kind is None:
            raise BlueprintError(
                f"wrap(): module {c.name!r} ({type(c.module).__name__}) outputs shape {shape}; a "
                "slot needs (N, C, *spatial) with 1-3 spatial dims, or (..., F)"
            )
        per_sample = shape[1:] if kind is SlotKind.CONV else shape[-1:]
        try:
            contracts.add(SlotContract(kind, per_sample, str(dtype).removeprefix("torch.")))
        except BlueprintError as exc:
            raise BlueprintError(
                f"wrap(): module {c.name!r} outputs shape {shape}: {exc}"
            ) from exc
    if len(contracts) > 1:
        raise BlueprintError(
            f"wrap(): module {c.name!r} is called with outputs of different shapes "
            f"({sorted(set(c.outputs), key=str)[:3]}); a slot needs one per-sample shape"
        )
    return contracts.pop()


def wrap(
    model: nn.Module,
    targets: Iterable[Target],
    *,
    example_input: torch.Tensor | tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, SeedSlot]:
    """Replace the chosen modules of ``model`` (in place) with :class:`SeedSlot` s around them.

    A target is a module path (``"features.2"``, ``"fc1"``: any module, a whole block included) or
    a module type (``nn.Conv2d``, ``nn.Linear``): every module of that type is wrapped, except one
    its parent never calls (see the module's notes). A module in one already chosen, or inside a
    slot, is not wrapped again. The model is run once on the example (eval mode, no grad) to
    learn each slot's output shape, which becomes the slot's :class:`SlotContract` (see the
    module's table). Nothing changes in the model unless every target checks out.

    :param model: the host; modified in place.
    :param targets: module paths and/or module types.
    :param example_input: one batch the model accepts, or a tuple of its positional arguments.
    :param example_kwargs: keyword arguments of the model's forward for the probe.
    :returns: the new slots by name, in the model's module order.
    :raises BlueprintError: if a target is malformed or matches nothing, the model raises on the
        example, a module chosen by name is never called (its parent is named when that parent
        reads its parameters directly), or a chosen module's output is not one tensor of a shape
        above in a dtype a slot can carry. The model is then unchanged.
    """
    names, types = _check_targets(targets)
    found = _candidates(model, names, types)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    parents_called = _probe(model, found, args, example_kwargs or {})

    chosen: list[_Candidate] = []
    for c in found:
        if any(c.name.startswith(k.name + ".") for k in chosen):
            continue
        problem = _not_callable(model, c, parents_called)
        if problem is not None:
            if c.by_name:
                raise BlueprintError(problem)
            log.debug("wrap skipped a module", module=c.name, reason=problem)
            continue
        chosen.append(c)
    if not chosen:
        raise BlueprintError(
            f"wrap(): every module matching {sorted(map(str, types))} is one the model never "
            "calls; name the modules to wrap"
        )
    slots = {c.name: SeedSlot(c.module, name=c.name, contract=_contract(c)) for c in chosen}

    swapped: list[str] = []
    try:
        for name, slot in slots.items():
            _set_submodule(model, name, slot)
            swapped.append(name)
    except Exception:
        for name in reversed(swapped):
            _set_submodule(model, name, slots[name].host)
        raise
    return slots


def find_slots(model: nn.Module) -> dict[str, SeedSlot]:
    """Every :class:`SeedSlot` in ``model``, by slot name, in module order."""
    return {m.slot_name: m for m in model.modules() if isinstance(m, SeedSlot)}
