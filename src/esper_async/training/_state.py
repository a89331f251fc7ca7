"""The trainer's checkpoints on disk: written and read through the grower's one state path.

:meth:`esper_async.training.Grower.state_dict` and its ``load_state_dict`` make and take the
payload; these functions write it with the reliability layer's atomic
:class:`~esper_async.reliability.CheckpointStore` and read back a directory's newest one that
restores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog
import torch

from ..reliability import CheckpointError, CheckpointStore, IncidentKind, Restored

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ("restore_run", "save_run_checkpoint")

log = structlog.get_logger(__name__)


async def save_run_checkpoint(
    trainer: Trainer, directory: str | os.PathLike[str], generator: torch.Generator | None
) -> Path | None:
    """:meth:`Trainer.save_checkpoint`: the payload is made and written in worker threads; a
    failed write is recorded as an incident and the previous checkpoint stands."""
    payload = await anyio.to_thread.run_sync(lambda: trainer.state_dict(generator=generator))
    store = CheckpointStore(directory, keep=trainer.grower.reliability.checkpoint_keep)
    try:
        return await anyio.to_thread.run_sync(store.save, payload)
    except CheckpointError as exc:
        trainer.grower.incident(IncidentKind.CHECKPOINT_FAILED, None, str(exc))
        return None


def restore_run(
    trainer: Trainer, checkpoint: str | os.PathLike[str], generator: torch.Generator | None
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
