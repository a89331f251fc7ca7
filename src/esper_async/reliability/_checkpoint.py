"""Checkpoints' content: the whole morphogenetic state of a run, captured and put back exactly.

A checkpoint holds the structure (every slot's lifecycle record and counters, blueprint, kernel
id and blend position), the **artifact bytes of every loaded kernel** (so a resume loads them
without compiling anything), the model's parameters and buffers, the optimizer's state and its
parameter groups (by parameter name), every registered ``state_dict()`` (controller and selector
statistics, scheduler, governor, breakers), the RNG states (Python, NumPy, torch, CUDA, and the
training loader's generator), the step and epoch, and a JSON record the trainer adds (history and
events).

A slot whose seed still runs as its blueprint's eager module (``graft="eager"``, its kernel not
compiled yet) has no kernel to store: it is recorded by its blueprint (JSON) and the init seed it
was built with (``eager_seed``; its ``kernel_id`` is ``"eager:<blueprint id>"``), and a restore
rebuilds the module with :func:`~esper_async.seeds.eager_seed` before loading its trained weights
and optimizer state. Nothing of it is unpickled; the grower then compiles its kernel again.

Restoring is two steps. :func:`verify_state` checks and decodes everything that can be checked
without touching the run — the fields and their types, the JSON parts, every kernel's bytes
against its id (and loads the seeds), the RNG states on scratch generators — so a malformed
payload is refused before anything changes. :func:`apply_state` then puts the state into the
model, optimizer and statistics; what can still fail there is the fit of the checkpoint to the
model (:class:`CheckpointMismatchError`). The files themselves (sealed with a digest, written
atomically) are :mod:`esper_async.reliability._checkpoint_store`'s.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..blueprints import Blueprint, SlotContract
from ..kernels import Kernel, KernelMetadata, load_kernel
from ..seeds import EAGER_PREFIX, EagerSeed, SeedSlot, SeedState, eager_seed
from ._errors import CheckpointError, CheckpointIntegrityError, CheckpointMismatchError
from ._snapshot import (
    SlotState,
    capture_slot,
    optimizer_groups,
    restore_optimizer,
    restore_slot,
)

__all__ = (
    "CheckpointError",
    "Restored",
    "Stateful",
    "VerifiedState",
    "apply_state",
    "capture_rng",
    "capture_state",
    "restore_rng",
    "restore_state",
    "verify_state",
)

#: Version of the payload layout; a reader refuses other versions.
FORMAT = 1
#: The payload's fields and their types (checked before anything is restored).
_FIELDS: dict[str, type] = {
    "format": int, "epoch": int, "step": int, "model": dict, "optimizer": dict, "groups": list,
    "slots": str, "kernels": dict, "stateful": dict, "record": str, "rng": dict,
}


class Stateful(Protocol):
    """Anything a checkpoint can carry: it has ``state_dict()`` and ``load_state_dict()``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU and CUDA) and ``generator``."""
    np_state: Any = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": None if generator is None else generator.get_state(),
    }


def _python_rng(state: Mapping[str, Any]) -> Any:
    version, keys, *rest = state["python"]
    return (version, tuple(keys), *rest)


def _numpy_rng(state: Mapping[str, Any]) -> Any:
    kind, keys, *rest = state["numpy"]
    return (kind, np.asarray(keys, dtype=np.uint32), *rest)


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng` returned."""
    random.setstate(_python_rng(state))
    np.random.set_state(_numpy_rng(state))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])


def _check_rng(state: Mapping[str, Any]) -> None:
    """Raise unless ``state`` restores: tried on scratch generators, the global ones untouched."""
    random.Random().setstate(_python_rng(state))
    np.random.RandomState().set_state(_numpy_rng(state))
    torch.Generator().set_state(state["torch"])
    if state["loader"] is not None:
        torch.Generator().set_state(state["loader"])
    if not isinstance(state["cuda"], list) or not all(
        isinstance(t, torch.Tensor) for t in state["cuda"]
    ):
        raise TypeError("the CUDA RNG states are not a list of tensors")


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value


def capture_state(
    *,
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: Mapping[str, SeedSlot],
    kernels: Mapping[str, Kernel],
    stateful: Mapping[str, Stateful | None],
    record: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """A checkpoint payload of the run now (tensors copied to the CPU). Call between steps.

    :param epoch: epochs completed.
    :param step: global steps taken.
    :param model: the model (not a DDP wrapper).
    :param optimizer: its optimizer.
    :param slots: the model's seed slots, by name.
    :param kernels: at least every kernel loaded in a slot, by id.
    :param stateful: objects with ``state_dict()`` (``None`` entries are skipped).
    :param record: JSON-ready data the trainer keeps (history, events).
    :param generator: the training loader's RNG, if it has one.
    :raises CheckpointError: if a slot holds a seed whose kernel is not in ``kernels`` (a slot
        running its blueprint's eager module needs none: it is recorded by its blueprint and init
        seed, see :func:`verify_state`).
    """
    slot_states = {}
    needed: dict[str, Kernel] = {}
    for name, slot in slots.items():
        kid = slot.kernel_id
        if isinstance(slot.seed, EagerSeed):
            pass  # rebuilt from its blueprint and init seed on restore (no kernel yet)
        elif slot.seed is not None:
            if kid is None or kid not in kernels:
                raise CheckpointError(
                    f"slot {name!r} holds a seed whose kernel {kid} is unknown; the trainer "
                    "must register every grafted kernel", path="",
                )
            needed[kid] = kernels[kid]
        slot_states[name] = {**capture_slot(slot).to_json(), "has_seed": slot.seed is not None}
    return {
        "format": FORMAT,
        "epoch": epoch,
        "step": step,
        "model": _cpu(dict(model.state_dict())),
        "optimizer": _cpu(optimizer.state_dict()),
        "groups": optimizer_groups(model, optimizer),
        "slots": json.dumps(slot_states),
        "kernels": {
            kid: {
                "artifact": torch.frombuffer(bytearray(k.artifact), dtype=torch.uint8),
                "metadata": json.dumps(k.metadata.to_json()),
            }
            for kid, k in needed.items()
        },
        "stateful": {k: _cpu(v.state_dict()) for k, v in stateful.items() if v is not None},
        "record": json.dumps(record),
        "rng": capture_rng(generator),
    }


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_state` read besides what it put back into the objects.

    :ivar epoch: epochs completed when the checkpoint was written.
    :ivar step: global steps taken then.
    :ivar record: the trainer's JSON record.
    :ivar kernels: the kernels of the restored seeds, by id.
    """

    epoch: int
    step: int
    record: dict[str, Any]
    kernels: dict[str, Kernel]


@dataclass(frozen=True)
class VerifiedState:
    """A payload that :func:`verify_state` checked and decoded; nothing of the run is touched yet.

    :ivar payload: the payload itself.
    :ivar slots: every slot's state, its seed loaded (on the device asked for) where it has one.
    :ivar restored: epoch, step, record and kernels.
    :ivar device: where the seeds were loaded and the model will be moved.
    :ivar path: the file it came from (for messages; ``""`` if none).
    """

    payload: Mapping[str, Any]
    slots: dict[str, SlotState]
    restored: Restored
    device: torch.device | str
    path: str


def _where(path: str) -> str:
    return f"checkpoint {path}" if path else "the checkpoint"


def _malformed(path: str, what: str, exc: BaseException | None = None) -> CheckpointIntegrityError:
    detail = "" if exc is None else f" ({type(exc).__name__}: {str(exc)[:120]})"
    return CheckpointIntegrityError(f"{_where(path)} is malformed: {what}{detail}", path=path)


def _check_fields(payload: Mapping[str, Any], path: str) -> None:
    for key, kind in _FIELDS.items():
        if key not in payload:
            raise _malformed(path, f"field {key!r} is missing")
        value = payload[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _malformed(path, f"field {key!r} is a {type(value).__name__}, not a "
                                   f"{kind.__name__}")
    if payload["format"] != FORMAT:
        raise CheckpointError(
            f"{_where(path)} has format {payload['format']}; this esper_async reads format "
            f"{FORMAT}", path=path,
        )
    odd = [k for k, v in payload["model"].items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise _malformed(path, f"model entries {odd[:3]} are not tensors")


def _decode_kernels(payload: Mapping[str, Any], path: str) -> dict[str, Kernel]:
    kernels = {}
    for kid, entry in payload["kernels"].items():
        try:
            artifact = entry["artifact"]
            if not isinstance(artifact, torch.Tensor) or artifact.dtype != torch.uint8:
                raise TypeError("the artifact is not a uint8 tensor")
            kernel = Kernel(
                artifact=artifact.numpy().tobytes(),
                metadata=KernelMetadata.from_json(json.loads(entry["metadata"])),
            )
        except Exception as exc:
            raise _malformed(path, f"kernel {str(kid)[:12]} does not decode", exc) from exc
        if kernel.kernel_id != kid:
            raise _malformed(path, f"kernel {str(kid)[:12]} is stored under another id")
        kernels[kid] = kernel
    return kernels


#: Lifecycle states in which a slot holds no seed (a payload that says otherwise is malformed).
_SEEDLESS = frozenset({SeedState.DORMANT, SeedState.CULLED, SeedState.EMBARGOED})


def _decode_slot(data: Any) -> SlotState:
    """One slot's state without its seed, every value checked (the lifecycle states, the
    blueprint) so that :func:`restore_slot` cannot fail on it."""
    if not isinstance(data, dict) or not isinstance(data.get("has_seed"), bool):
        raise TypeError("a slot's state is not an object with 'has_seed'")
    state = SlotState.from_json(data, None)
    SeedState(state.state)
    for source, target, _ in state.history:
        SeedState(source)
        SeedState(target)
    if state.blueprint_json is not None:
        Blueprint.from_json(state.blueprint_json)
    if data["has_seed"] and not isinstance(state.kernel_id, str):
        raise TypeError("a slot with a seed names no kernel")
    kid = state.kernel_id
    eager_id = data["has_seed"] and isinstance(kid, str) and kid.startswith(EAGER_PREFIX)
    if eager_id != (state.eager_seed is not None):
        raise TypeError(
            "an eager slot's kernel id and init seed do not go together (an 'eager:' id needs "
            "'eager_seed', and only it)"
        )
    if state.eager_seed is not None and state.blueprint_json is None:
        raise TypeError("an eager slot names no blueprint")
    if data["has_seed"] and SeedState(state.state) in _SEEDLESS:
        raise TypeError(f"a slot in state {state.state!r} cannot hold a seed")
    if not data["has_seed"] and state.kernel_id is not None:
        raise TypeError("a slot without a seed names a kernel")
    if not (isinstance(state.alpha, int | float) and 0.0 <= state.alpha <= 1.0):
        raise TypeError(f"a slot's blend alpha {state.alpha!r} is not a number in [0, 1]")
    return state


def _rebuild_eager(
    state: SlotState, contract: SlotContract | None, device: torch.device | str
) -> EagerSeed:
    """The eager module of a slot that ran it when the checkpoint was written, rebuilt from its
    blueprint (JSON, checked by :func:`_decode_slot`) and init seed, never unpickled; its trained
    weights come from the model's state.

    :raises ValueError: the rebuilt module is not the one recorded.
    :raises BlueprintError: the blueprint does not fit the slot's contract.
    """
    assert state.blueprint_json is not None and state.eager_seed is not None  # _decode_slot
    if contract is None:
        raise ValueError("the model's slot has no shape contract")
    module = eager_seed(
        Blueprint.from_json(state.blueprint_json), contract, seed=state.eager_seed, device=device
    )
    if module.stand_in_id != state.kernel_id:
        raise ValueError(f"its id {state.kernel_id} is not its blueprint's")
    return module


def verify_state(
    payload: Mapping[str, Any],
    *,
    slots: Mapping[str, SeedSlot],
    device: torch.device | str = "cpu",
    path: str = "",
) -> VerifiedState:
    """Check and decode a checkpoint payload without touching the run; load its seeds.

    :param payload: what the checkpoint file held.
    :param slots: the slots of the model it is for (only their names are read).
    :param device: where the seeds are loaded.
    :param path: the file it came from, for messages.
    :raises CheckpointIntegrityError: if a field is missing or of the wrong type, a JSON part or
        an RNG state is malformed, a kernel's bytes do not match its id or do not load, or a
        slot that ran its blueprint's eager module lacks its init seed or does not rebuild.
    :raises CheckpointMismatchError: if the model has other slots than the checkpoint.
    :raises CheckpointError: if the payload has another format version.
    """
    _check_fields(payload, path)
    try:
        slot_data = json.loads(payload["slots"])
        record = json.loads(payload["record"])
        if not isinstance(slot_data, dict) or not isinstance(record, dict):
            raise TypeError("the slots or the record are not JSON objects")
        states = {name: _decode_slot(data) for name, data in slot_data.items()}
        _check_rng(payload["rng"])
    except Exception as exc:
        raise _malformed(path, "its structure does not decode", exc) from exc
    if set(states) != set(slots):
        raise CheckpointMismatchError(
            f"{_where(path)} has slots {sorted(states)}, the model {sorted(slots)}; wrap the "
            "model with the same targets before resuming", path=path,
        )
    kernels = _decode_kernels(payload, path)
    for name, state in states.items():
        if not slot_data[name]["has_seed"]:
            continue
        if state.eager_seed is not None:
            try:
                state.seed = _rebuild_eager(state, slots[name].contract, device)
            except Exception as exc:
                raise CheckpointIntegrityError(
                    f"{_where(path)}: the eager module of slot {name!r} does not rebuild from its "
                    f"blueprint ({type(exc).__name__}: {str(exc)[:160]})",
                    path=path,
                ) from exc
            continue
        kid = state.kernel_id
        if kid not in kernels:
            raise _malformed(path, f"slot {name!r} holds kernel {str(kid)[:12]}, which it lacks")
        try:
            state.seed = load_kernel(kernels[kid], device=device)
        except Exception as exc:
            raise CheckpointIntegrityError(
                f"{_where(path)}: the kernel of slot {name!r} does not load ({str(exc)[:160]})",
                path=path,
            ) from exc
    restored = Restored(
        epoch=payload["epoch"], step=payload["step"], record=record, kernels=kernels
    )
    return VerifiedState(payload=payload, slots=states, restored=restored, device=device,
                         path=path)


def apply_state(
    verified: VerifiedState,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: Mapping[str, SeedSlot],
    stateful: Mapping[str, Stateful | None],
    generator: torch.Generator | None = None,
) -> Restored:
    """Put a verified checkpoint into a freshly built model (wrapped with the same slots), its
    optimizer, the ``stateful`` objects and the RNGs.

    :param verified: what :func:`verify_state` returned for this model's slots.
    :param model: the model, built and wrapped as the checkpointed one was.
    :param optimizer: an optimizer over its parameters.
    :param slots: the model's slots.
    :param stateful: objects whose state the checkpoint holds, by key.
    :param generator: the training loader's RNG.
    :raises CheckpointMismatchError: if the parameters, the optimizer's groups or a stateful
        object's state do not fit. The objects may then be partly restored: build them afresh.
    """
    payload, path = verified.payload, verified.path
    for name, state in verified.slots.items():
        restore_slot(slots[name], state)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointMismatchError(
            f"the model's parameters do not fit {_where(path)} ({str(exc)[:200]}); build and "
            "wrap the model as the checkpointed run did", path=path,
        ) from exc
    model.to(verified.device)
    try:
        restore_optimizer(model, optimizer, payload["groups"], payload["optimizer"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointMismatchError(
            f"the optimizer does not fit {_where(path)} ({type(exc).__name__}: "
            f"{str(exc)[:160]}); make it as the checkpointed run did", path=path,
        ) from exc
    for key, obj in stateful.items():
        if obj is not None and key in payload["stateful"]:
            try:
                obj.load_state_dict(payload["stateful"][key])
            except Exception as exc:
                raise CheckpointMismatchError(
                    f"the {key} state in {_where(path)} does not load into the "
                    f"{type(obj).__name__} given ({type(exc).__name__}: {str(exc)[:120]})",
                    path=path,
                ) from exc
    restore_rng(payload["rng"], generator)
    return verified.restored


def restore_state(
    payload: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: Mapping[str, SeedSlot],
    stateful: Mapping[str, Stateful | None],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    path: str = "",
) -> Restored:
    """Put a checkpoint's state back into a freshly built model (wrapped with the same slots):
    :func:`verify_state`, then :func:`apply_state`.

    Seeds are loaded from the artifact bytes in the checkpoint (checked against their ids); no
    compile happens.

    :param payload: what the checkpoint file held.
    :param model: the model, built and wrapped as the checkpointed one was.
    :param optimizer: an optimizer over its parameters.
    :param slots: the model's slots.
    :param stateful: objects whose state the checkpoint holds, by key.
    :param device: where the model trains.
    :param generator: the training loader's RNG.
    :param path: the file ``payload`` came from, for messages.
    :raises CheckpointIntegrityError: if the payload is malformed or a kernel's bytes do not
        match its id (nothing is restored then).
    :raises CheckpointMismatchError: if the model or optimizer do not fit the checkpoint.
    :raises CheckpointError: if the format differs.
    """
    verified = verify_state(payload, slots=slots, device=device, path=path)
    return apply_state(verified, model=model, optimizer=optimizer, slots=slots,
                       stateful=stateful, generator=generator)
