"""The trainer's side of checkpoints: what of a run goes into one, and how it comes back.

These functions read and set the trainer's attributes (it is their only caller); the format
itself is :mod:`esper_async.reliability._checkpoint`.

A checkpoint's tensors have the shapes of the model after every surgery committed before it, but a
resumed run builds its model afresh: the record lists the committed operations, and
:func:`apply_checkpoint` replays those the model lacks before it loads any tensor.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from .._exceptions import SurgeryError
from .._results import FitResult, GrowthEvent
from ..surgery._replay import replay_operations
from ._checkpoint import Restored, apply_state, capture_state, verify_state
from ._errors import CheckpointIntegrityError, CheckpointMismatchError
from ._incidents import Incident
from ._record import report_from_json, report_to_json

if TYPE_CHECKING:
    from ..trainer import Trainer

__all__ = ("apply_checkpoint", "checkpoint_payload")


def _stateful(trainer: Trainer) -> dict[str, Any]:
    """Everything with a ``state_dict()`` a checkpoint carries."""
    controller = trainer.controller if hasattr(trainer.controller, "state_dict") else None
    return {
        "controller": controller, "scheduler": trainer.scheduler, "governor": trainer.governor,
        "breakers": trainer.breakers, "surgery": trainer.surgery,
    }


def checkpoint_payload(trainer: Trainer, generator: torch.Generator | None) -> dict[str, Any]:
    """The checkpoint of ``trainer``'s run now (blocking: copies every tensor to the CPU)."""
    result = trainer.result
    record = {
        "history": [report_to_json(r) for r in result.history],
        "events": [dataclasses.asdict(e) for e in result.events],
        "incidents": [i.to_json() for i in result.incidents],
        "growth_paused_until": trainer._growth_paused_until,
        "oom_pause": trainer._oom_pause,
        "surgery": trainer.surgeries,
    }
    return capture_state(
        epoch=len(result.history), step=trainer.step, model=trainer.model,
        optimizer=trainer.optimizer, slots=trainer.slots, kernels=trainer.kernels,
        stateful=_stateful(trainer), record=record, generator=generator,
    )


def apply_checkpoint(
    trainer: Trainer, payload: dict[str, Any], generator: torch.Generator | None, path: str = ""
) -> Restored:
    """Put ``payload`` back into ``trainer`` (model, seeds, optimizer, statistics, counters and
    the run's record so far), replaying first the surgeries the model lacks.

    Everything that can be checked without touching the trainer is checked first (the payload,
    its kernels, the trainer's record in it), so a malformed checkpoint changes nothing.

    :param path: the file ``payload`` came from, for messages.
    :raises CheckpointIntegrityError: if the payload or its record is malformed.
    :raises CheckpointMismatchError: the model has surgeries the checkpoint lacks, a recorded
        surgery does not fit it, or its tensors do not.
    """
    verified = verify_state(payload, slots=trainer.slots, device=trainer.device, path=path)
    record = verified.restored.record
    try:
        history = [report_from_json(r) for r in record["history"]]
        events = [GrowthEvent(**e) for e in record["events"]]
        incidents = [Incident.from_json(i) for i in record["incidents"]]
        paused, oom_pause = int(record["growth_paused_until"]), int(record["oom_pause"])
        surgeries = list(record.get("surgery", []))
    except Exception as exc:
        raise CheckpointIntegrityError(
            f"checkpoint {path} holds a malformed run record ({type(exc).__name__}: "
            f"{str(exc)[:120]})", path=path,
        ) from exc
    _replay_surgeries(trainer, surgeries, path)
    restored = apply_state(
        verified, model=trainer.model, optimizer=trainer.optimizer, slots=trainer.slots,
        stateful=_stateful(trainer), generator=generator,
    )
    trainer.step, trainer.epoch = restored.step, restored.epoch
    trainer.kernels = dict(restored.kernels)
    trainer._growth_paused_until = paused
    trainer._oom_pause = oom_pause
    trainer._result = FitResult(
        history=history, events=events, incidents=incidents, steps=restored.step
    )
    return restored


def _replay_surgeries(trainer: Trainer, recorded: list[dict[str, Any]], path: str) -> None:
    """Bring ``trainer``'s model to the structure of a checkpoint that recorded ``recorded``."""
    done = trainer.surgeries
    if recorded[: len(done)] != done:
        raise CheckpointMismatchError(
            f"the model has had surgery ({done}) that checkpoint {path} does not start with "
            f"({recorded}); build the model afresh before restoring", path=path,
        )
    try:
        replay_operations(trainer.model, trainer.optimizer, recorded[len(done) :])
    except SurgeryError as exc:
        raise CheckpointMismatchError(
            f"the surgery of checkpoint {path} does not fit the model ({exc}); build and wrap "
            "the model as the checkpointed run did", path=path,
        ) from exc
    trainer.surgeries = list(recorded)
