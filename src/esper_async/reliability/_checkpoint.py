"""Checkpoints: the whole morphogenetic state of a run, written atomically, read back exactly.

A checkpoint holds the structure (every slot's lifecycle record and counters, blueprint, kernel
id and blend position), the **artifact bytes of every loaded kernel** (so a resume loads them
without compiling anything), the model's parameters and buffers, the optimizer's state and its
parameter groups (by parameter name), every registered ``state_dict()`` (controller and selector
statistics, scheduler, governor, breakers), the RNG states (Python, NumPy, torch, CUDA, and the
training loader's generator), the step and epoch, and a JSON record the trainer adds (history and
events).

Writing: the payload is serialised with ``torch.save`` to a temporary file in the same directory,
flushed, ``fsync``-ed, renamed over its final name and the directory ``fsync``-ed. A crash at any
point leaves either the previous checkpoint or the new one, never a torn file. The newest ``keep``
checkpoints are kept.

Reading: the newest checkpoint that loads is used; one that does not (impossible after an atomic
rename, but a disk can still rot) is skipped with a warning and the one before it is read.
Loading uses ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain data only.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
import torch
from torch import nn

from .._exceptions import EsperError
from ..kernels import Kernel, KernelMetadata, load_kernel
from ..seeds import SeedSlot
from ._snapshot import (
    SlotState,
    capture_slot,
    optimizer_groups,
    restore_optimizer,
    restore_slot,
)

__all__ = (
    "CheckpointError",
    "CheckpointStore",
    "Restored",
    "Stateful",
    "capture_rng",
    "capture_state",
    "restore_rng",
    "restore_state",
    "write_atomic",
)

log = structlog.get_logger(__name__)

#: Version of the payload layout; a reader refuses other versions.
FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(EsperError):
    """A checkpoint could not be written or read.

    :ivar path: the file or directory concerned.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class Stateful(Protocol):
    """Anything a checkpoint can carry: it has ``state_dict()`` and ``load_state_dict()``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, flush, fsync, rename, fsync the directory.

    :raises OSError: if the write fails (the previous file, if any, is untouched).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng` returned."""
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    kind, np_keys, *np_rest = state["numpy"]
    np.random.set_state((kind, np.asarray(np_keys, dtype=np.uint32), *np_rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["loader"] is not None:
        generator.set_state(state["loader"])


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
    :param kernels: at least every kernel loaded in a slot, by id.
    :param stateful: objects with ``state_dict()`` (``None`` entries are skipped).
    :param record: JSON-ready data the trainer keeps (history, events).
    :param generator: the training loader's RNG, if it has one.
    :raises CheckpointError: if a slot holds a seed whose kernel is not in ``kernels``.
    """
    slot_states = {}
    needed: dict[str, Kernel] = {}
    for name, slot in slots.items():
        kid = slot.kernel_id
        if slot.seed is not None:
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


def restore_state(
    payload: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    slots: Mapping[str, SeedSlot],
    stateful: Mapping[str, Stateful | None],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Restored:
    """Put a checkpoint's state back into a freshly built model (wrapped with the same slots).

    Seeds are loaded from the artifact bytes in the checkpoint (checked against their ids); no
    compile happens.

    :raises CheckpointError: if the format or the slots differ from the checkpoint's.
    :raises KernelIntegrityError: if a stored artifact does not match its id.
    """
    if payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint format {payload.get('format')} is not {FORMAT}", path=""
        )
    slot_states = json.loads(payload["slots"])
    if set(slot_states) != set(slots):
        raise CheckpointError(
            f"the checkpoint has slots {sorted(slot_states)}, the model {sorted(slots)}; wrap the "
            "model with the same targets before resuming", path="",
        )
    kernels = {
        kid: Kernel(
            artifact=entry["artifact"].numpy().tobytes(),
            metadata=KernelMetadata.from_json(json.loads(entry["metadata"])),
        )
        for kid, entry in payload["kernels"].items()
    }
    for name, data in slot_states.items():
        seed = None
        if data["has_seed"]:
            seed = load_kernel(kernels[data["kernel_id"]], device=device)
        restore_slot(slots[name], SlotState.from_json(data, seed))
    model.load_state_dict(payload["model"], strict=True)
    model.to(device)
    restore_optimizer(model, optimizer, payload["groups"], payload["optimizer"])
    for key, obj in stateful.items():
        if obj is not None and key in payload["stateful"]:
            obj.load_state_dict(payload["stateful"][key])
    restore_rng(payload["rng"], generator)
    return Restored(
        epoch=int(payload["epoch"]), step=int(payload["step"]),
        record=json.loads(payload["record"]), kernels=kernels,
    )


class CheckpointStore:
    """A directory of numbered checkpoints.

    :param directory: where they live (created on first save).
    :param keep: how many of the newest to keep.
    :raises ValueError: if ``keep < 1``.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """The checkpoints present, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def save(self, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` as the checkpoint of its epoch, atomically; prune old ones.

        Blocking (serialising and fsync): run it in a worker thread.

        :raises CheckpointError: if the file cannot be written.
        """
        path = self.directory / f"ckpt-{int(payload['epoch']):08d}.pt"
        buffer = io.BytesIO()
        torch.save(dict(payload), buffer)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buffer.getvalue())
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}", path=str(path)) from exc
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        log.info("checkpoint written", path=str(path), bytes=buffer.tell())
        return path

    def load(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Read ``path``, or the newest checkpoint that loads.

        :raises CheckpointError: if there is none, or ``path`` does not load.
        """
        candidates = [Path(path)] if path is not None else list(reversed(self.paths()))
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}", path=str(self.directory))
        for candidate in candidates:
            try:
                payload = torch.load(candidate, map_location="cpu", weights_only=True)
            except Exception as exc:
                if path is not None:
                    raise CheckpointError(
                        f"checkpoint {candidate} does not load: {exc}", path=str(candidate)
                    ) from exc
                log.warning("checkpoint unreadable; trying an older one", path=str(candidate),
                            error=str(exc))
                continue
            return dict(payload)
        raise CheckpointError(
            f"no checkpoint in {self.directory} loads", path=str(self.directory)
        )
