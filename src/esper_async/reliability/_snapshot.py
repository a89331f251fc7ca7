"""Capturing and restoring the whole morphogenetic state of a model in memory.

A :class:`Snapshot` holds, for one moment between steps: every slot's seed (the module object
itself), lifecycle record, blueprint, kernel id and blend position; copies of the model's and the
optimizer's state; and which parameters (by name) form each optimizer group. Restoring puts the
seeds back first — so the model has the structure it had — then loads the tensors, then rebuilds
the optimizer's groups around the restored parameters. Seeds grafted since the snapshot leave the
model; seeds culled since come back. A seed that ran its blueprint's eager module then
(``graft="eager"``) comes back as that module, even if its kernel replaced it since (the grower
then compiles the kernel again); :attr:`SlotState.eager_seed` marks it, so that a checkpoint can
rebuild it from its blueprint.

Copies are taken on the CPU, so a snapshot costs host memory, not device memory. GPU tensors are
copied into pinned host buffers without waiting for each copy, then the copying streams are
synchronised once; whether the parameters are finite is judged on their device at the same time
(one flag per device), so no per-tensor device sync and no host-side scan is needed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..blueprints import Blueprint
from ..seeds import EagerSeed, Lifecycle, SeedSlot, SeedState

__all__ = (
    "SlotState",
    "Snapshot",
    "capture_slot",
    "optimizer_groups",
    "restore_optimizer",
    "restore_slot",
)


@dataclass
class SlotState:
    """One slot's morphogenetic state.

    :ivar seed: the seed module (``None`` when the slot holds none).
    :ivar state: the lifecycle state's value.
    :ivar epochs_in_state: lifecycle counter.
    :ivar steps_in_state: lifecycle counter.
    :ivar history: transitions as ``(from, to, reason)`` values.
    :ivar blueprint_json: the blueprint's canonical JSON, or ``None``.
    :ivar kernel_id: the loaded kernel's id, or ``None``.
    :ivar alpha: blend factor.
    :ivar blend_steps: length of the blend ramp.
    :ivar eager_seed: where the seed is its blueprint's eager module (``graft="eager"``, its
        kernel still compiling; ``kernel_id`` is then ``"eager:<blueprint id>"``), the init seed
        it was built with, so that a checkpoint rebuilds it from the blueprint; else ``None``.
    """

    seed: nn.Module | None
    state: str
    epochs_in_state: int
    steps_in_state: int
    history: list[tuple[str, str, str]]
    blueprint_json: str | None
    kernel_id: str | None
    alpha: float
    blend_steps: int
    eager_seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Everything but the seed module, JSON-ready."""
        return {
            "state": self.state, "epochs_in_state": self.epochs_in_state,
            "steps_in_state": self.steps_in_state, "history": [list(h) for h in self.history],
            "blueprint_json": self.blueprint_json, "kernel_id": self.kernel_id,
            "alpha": self.alpha, "blend_steps": self.blend_steps, "eager_seed": self.eager_seed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], seed: nn.Module | None) -> SlotState:
        """The inverse of :meth:`to_json`, given the seed module to put back.

        :raises KeyError, TypeError, ValueError: ``data`` is malformed.
        """
        eager = data.get("eager_seed")  # absent from checkpoints written before eager slots
        if eager is not None and (not isinstance(eager, int) or isinstance(eager, bool)):
            raise TypeError(f"an eager slot's init seed is a {type(eager).__name__}, not an int")
        return cls(
            seed=seed, state=str(data["state"]), epochs_in_state=int(data["epochs_in_state"]),
            steps_in_state=int(data["steps_in_state"]),
            history=[(str(a), str(b), str(c)) for a, b, c in data["history"]],
            blueprint_json=data["blueprint_json"], kernel_id=data["kernel_id"],
            alpha=float(data["alpha"]), blend_steps=int(data["blend_steps"]), eager_seed=eager,
        )


def capture_slot(slot: SeedSlot) -> SlotState:
    """``slot``'s state now (the seed by reference; its tensors live in the model's state)."""
    life = slot.lifecycle
    seed = slot.seed
    return SlotState(
        seed=slot.seed, state=life.state.value, epochs_in_state=life.epochs_in_state,
        steps_in_state=life.steps_in_state,
        history=[(a.value, b.value, r) for a, b, r in life.history],
        blueprint_json=None if slot.blueprint is None else slot.blueprint.to_json(),
        kernel_id=slot.kernel_id, alpha=slot.alpha, blend_steps=slot.blend_steps,
        eager_seed=seed.init_seed if isinstance(seed, EagerSeed) else None,
    )


def restore_slot(slot: SeedSlot, state: SlotState) -> None:
    """Put ``state`` back into ``slot`` as it was (no lifecycle transition is recorded)."""
    slot.seed = state.seed
    slot.lifecycle = Lifecycle(
        slot.slot_name, SeedState(state.state), state.epochs_in_state, state.steps_in_state,
        [(SeedState(a), SeedState(b), r) for a, b, r in state.history],
    )
    slot.blueprint = None if state.blueprint_json is None else Blueprint.from_json(
        state.blueprint_json
    )
    slot.kernel_id = state.kernel_id
    slot.alpha = state.alpha
    slot.blend_steps = state.blend_steps


def optimizer_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """For each optimizer group, the model's names of its parameters, in order.

    :raises ValueError: if the optimizer holds a parameter the model does not have.
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        try:
            groups.append([names[id(p)] for p in group["params"]])
        except KeyError as exc:
            raise ValueError(
                f"optimizer group {i} holds a parameter that is not in the model; only the "
                "model's parameters can be snapshotted"
            ) from exc
    return groups


def restore_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[list[str]],
    state: Mapping[str, Any],
) -> None:
    """Rebuild ``optimizer``'s groups from parameter names, then load ``state`` into it.

    :param groups: what :func:`optimizer_groups` returned when ``state`` was taken.
    :param state: an ``optimizer.state_dict()`` taken then; it is copied, not aliased.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = state["param_groups"]
    optimizer.param_groups[:] = [
        {
            **{k: v for k, v in saved[i].items() if k != "params"},
            "params": [params[n] for n in names],
        }
        for i, names in enumerate(groups)
    ]
    optimizer.state.clear()
    optimizer.load_state_dict(_clone(state))


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return copy.copy(value)


class _HostCopier:
    """Copies nested state to the CPU. GPU tensors go into pinned buffers with non-blocking
    copies; :meth:`wait` synchronises the streams that carry them (call it before reading)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            src = value.detach()
            if not src.is_cuda:
                return src.to("cpu", copy=True)
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            dst.copy_(src, non_blocking=True)
            self._streams.setdefault(src.device, torch.cuda.current_stream(src.device))
            return dst
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return copy.copy(value)

    def wait(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor in a nested ``state_dict`` (dicts, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, Mapping):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def _all_finite(tensors: Any) -> bool:
    """Whether every floating tensor is finite: one reduction and one read per device."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for flag in flags:
        by_device.setdefault(flag.device, []).append(flag)
    return all(bool(torch.stack(group).all()) for group in by_device.values())


@dataclass
class Snapshot:
    """The model's morphogenetic state at one step boundary, held in host memory.

    :ivar step: the global step it was taken at.
    :ivar slots: per slot, its state.
    :ivar model_state: a CPU copy of ``model.state_dict()``.
    :ivar optimizer_state: a CPU copy of ``optimizer.state_dict()``.
    :ivar groups: parameter names per optimizer group.
    :ivar extra: further ``state_dict()`` s (a scheduler), copied.
    """

    step: int
    slots: dict[str, SlotState]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    groups: list[list[str]]
    extra: dict[str, Any] = field(default_factory=dict)
    #: Whether the parameters and the optimizer's state are finite (``None``: judged from the
    #: copies when asked). Buffers are not judged: a causal mask of ``-inf`` is sound.
    finite: bool | None = None

    @classmethod
    def take(
        cls, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        slots: Mapping[str, SeedSlot], extra: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Copy the state now. Call between steps (the training task is the only writer).

        Blocks until the copies are complete (run it in a worker thread)."""
        state = dict(model.state_dict())
        copier = _HostCopier()
        snapshot = cls(
            step=step,
            slots={name: capture_slot(slot) for name, slot in slots.items()},
            model_state=copier(state),
            optimizer_state=copier(optimizer.state_dict()),
            groups=optimizer_groups(model, optimizer),
            extra={k: copier(v.state_dict()) for k, v in (extra or {}).items()},
            finite=_all_finite(
                [*(p for _, p in model.named_parameters()), *_tensors(optimizer.state_dict())]
            ),
        )
        copier.wait()
        return snapshot

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, slots: Mapping[str, SeedSlot],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Put the model, its seeds, the optimizer (and ``extra``) back as they were.

        The snapshot stays valid: it can be restored again.
        """
        for name, slot in slots.items():
            restore_slot(slot, self.slots[name])
        device_of = {k: v.device for k, v in model.state_dict().items()}
        model.load_state_dict(
            {k: v.to(device_of.get(k, v.device)) for k, v in self.model_state.items()}, strict=True
        )
        restore_optimizer(model, optimizer, self.groups, self.optimizer_state)
        for key, obj in (extra or {}).items():
            if key in self.extra:
                obj.load_state_dict(_clone(self.extra[key]))

    def params_finite(self) -> bool:
        """Whether every floating parameter and optimizer-state tensor copied is finite (buffers
        are not judged: a causal mask of ``-inf`` is sound)."""
        if self.finite is None:
            names = {n for group in self.groups for n in group}
            params = [t for k, t in self.model_state.items() if k in names]
            self.finite = _all_finite([*params, *_tensors(self.optimizer_state)])
        return self.finite
