"""A run's state in a checkpoint: what of a grower's run goes into one, and how it comes back.

:meth:`esper_async.Trainer.state_dict` and :meth:`~esper_async.Trainer.load_state_dict` are the
one path; these functions do the work on a :class:`~esper_async.training.Grower` (no trainer
internals). The format itself is :mod:`esper_async.reliability._checkpoint`.

A checkpoint's tensors have the shapes of the model after every surgery committed before it, but a
resumed run builds its model afresh: the record lists the committed operations, and
:func:`load_run_state` replays those the model lacks before it loads any tensor.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch

from ..control._record import report_from_json, report_to_json
from ..errors import SurgeryError
from ..reliability import CheckpointError, CheckpointStore
from ..reliability._checkpoint import Restored, apply_state, capture_state, verify_state
from ..reliability._errors import CheckpointIntegrityError, CheckpointMismatchError
from ..reliability._incidents import Incident, IncidentKind
from ..surgery._replay import replay_operations
from ._grower import Grower
from ._results import FitResult, GrowthEvent

__all__ = ("load_run_state", "restore_run", "run_state", "save_run_checkpoint")

log = structlog.get_logger(__name__)


def run_state(grower: Grower, generator: torch.Generator | None) -> dict[str, Any]:
    """The checkpoint payload of ``grower``'s run now (blocking: copies tensors to the CPU).

    :param grower: the run's grower (model, optimizer, slots, kernels, record, counters).
    :param generator: the training loader's RNG, saved to resume its order.
    """
    result = grower.result
    record = {
        "history": [report_to_json(r) for r in result.history],
        "events": [dataclasses.asdict(e) for e in result.events],
        "incidents": [i.to_json() for i in result.incidents],
        **grower.state_dict(),
    }
    return capture_state(
        epoch=len(result.history), step=grower.step, model=grower.model,
        optimizer=grower.optimizer, slots=grower.slots, kernels=grower.kernels,
        stateful=grower.stateful(), record=record, generator=generator,
    )


def load_run_state(
    grower: Grower, payload: dict[str, Any], generator: torch.Generator | None, path: str = ""
) -> Restored:
    """Put ``payload`` back into ``grower`` (model, seeds, optimizer, statistics, counters and
    the run's record so far), replaying first the surgeries the model lacks.

    Everything that can be checked without touching the run is checked first, so a malformed
    checkpoint changes nothing.

    :param grower: the run's grower.
    :param payload: what :func:`run_state` returned (read back from a file).
    :param generator: the training loader's RNG, to resume its order.
    :param path: the file ``payload`` came from, for messages.
    :raises CheckpointIntegrityError: if the payload or its record is malformed.
    :raises CheckpointMismatchError: the model has surgeries the checkpoint lacks, a recorded
        surgery does not fit it, or its tensors do not.
    """
    verified = verify_state(payload, slots=grower.slots, device=grower.device, path=path)
    record = verified.restored.record
    try:
        history = [report_from_json(r) for r in record["history"]]
        events = [GrowthEvent(**e) for e in record["events"]]
        incidents = [Incident.from_json(i) for i in record["incidents"]]
        counters = {
            "growth_paused_until": int(record["growth_paused_until"]),
            "oom_pause": int(record["oom_pause"]),
        }
        surgeries = list(record.get("surgery", []))
    except Exception as exc:
        raise CheckpointIntegrityError(
            f"checkpoint {path} holds a malformed run record ({type(exc).__name__}: "
            f"{str(exc)[:120]})", path=path,
        ) from exc
    _replay_surgeries(grower, surgeries, path)
    restored = apply_state(
        verified, model=grower.model, optimizer=grower.optimizer, slots=grower.slots,
        stateful=grower.stateful(), generator=generator,
    )
    grower.load_state_dict({**counters, "surgery": surgeries})
    grower.resume_at(epoch=restored.epoch, step=restored.step)
    grower.kernels = dict(restored.kernels)
    grower.result = FitResult(
        history=history, events=events, incidents=incidents, steps=restored.step
    )
    grower.restored()
    return restored


def _replay_surgeries(grower: Grower, recorded: list[dict[str, Any]], path: str) -> None:
    """Bring ``grower``'s model to the structure of a checkpoint that recorded ``recorded``."""
    done = grower.surgeries
    if recorded[: len(done)] != done:
        raise CheckpointMismatchError(
            f"the model has had surgery ({done}) that checkpoint {path} does not start with "
            f"({recorded}); build the model afresh before restoring", path=path,
        )
    try:
        replay_operations(grower.model, grower.optimizer, recorded[len(done) :])
    except SurgeryError as exc:
        raise CheckpointMismatchError(
            f"the surgery of checkpoint {path} does not fit the model ({exc}); build and wrap "
            "the model as the checkpointed run did", path=path,
        ) from exc
    grower.surgeries = list(recorded)


async def save_run_checkpoint(
    trainer: Any, directory: str | os.PathLike[str], generator: torch.Generator | None
) -> Path | None:
    """:meth:`Trainer.save_checkpoint`: the payload is made and written in worker threads; a
    failed write is recorded as an incident and the previous checkpoint stands."""
    payload = await anyio.to_thread.run_sync(lambda: trainer.state_dict(generator=generator))
    store = CheckpointStore(directory, keep=trainer.reliability.checkpoint_keep)
    try:
        return await anyio.to_thread.run_sync(store.save, payload)
    except CheckpointError as exc:
        trainer.grower.incident(IncidentKind.CHECKPOINT_FAILED, None, str(exc))
        return None


def restore_run(
    trainer: Any, checkpoint: str | os.PathLike[str], generator: torch.Generator | None
) -> Restored:
    """:meth:`Trainer.restore`: a file, or a directory's newest checkpoint that restores."""
    path = Path(checkpoint)
    is_file = path.is_file()  # a path that does not exist names a directory with none
    store = CheckpointStore(path.parent if is_file else path)
    used, restored = store.restore(
        lambda p, payload: trainer.load_state_dict(payload, generator=generator, path=str(p)),
        path if is_file else None,
    )
    log.info("resumed", checkpoint=str(used), epoch=restored.epoch, step=restored.step)
    return restored
