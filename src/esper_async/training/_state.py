"""The trainer's checkpoints on disk: written and read through the grower's one state path.

:meth:`esper_async.training.Grower.state_dict` and its ``load_state_dict`` make and take the
payload; these functions write it with the reliability layer's atomic
:class:`~esper_async.reliability.CheckpointStore` and read back a directory's newest one that
restores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
import torch
from torch import nn

from ..compiler import BlueprintCompiler
from ..control import Controller
from ..kernels import Kernel
from ..reliability import (
    BreakerBoard,
    CheckpointError,
    CheckpointStore,
    Governor,
    IncidentKind,
    ReliabilityConfig,
    Restored,
)
from ..surgery import SurgeryPolicy
from ..telemetry import Telemetry
from ._grower import Grower
from ._results import FitResult

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ("TrainerState", "restore_run", "save_run_checkpoint")

log = structlog.get_logger(__name__)


def _view(name: str, doc: str) -> Any:
    """A read-only view of the grower's ``name`` (the trainer keeps no copy)."""
    return property(lambda self: getattr(self.grower, name), doc=doc)


class TrainerState:
    """:class:`~esper_async.Trainer`'s checkpoints, which wrap the grower's one state path, and
    read-only views of the grower's state (a mixin)."""

    grower: Grower
    _generator: torch.Generator | None

    model: nn.Module = _view("model", "The model being trained.")
    slots: dict[str, Any] = _view("slots", "The model's seed slots, by name.")
    step: int = _view("step", "The global training step.")
    epoch: int = _view("epoch", "The current (or last) epoch.")
    surgeries: list[dict[str, Any]] = _view("surgeries", "Committed surgeries, as records.")
    controller: Controller = _view("controller", "Asked at every epoch boundary.")
    kernels: dict[str, Kernel] = _view("kernels", "Every kernel loaded, by id.")
    result: FitResult = _view("result", "The current (or last) fit's record so far.")
    governor: Governor = _view("governor", "Judges losses; keeps the rollback snapshot.")
    breakers: BreakerBoard = _view("breakers", "The per-blueprint breakers.")
    compiler: BlueprintCompiler = _view("compiler", "Turns blueprints into kernels.")
    telemetry: Telemetry = _view("telemetry", "The run's telemetry.")
    reliability: ReliabilityConfig = _view("reliability", "Breakers, limits, the governor.")
    surgery: SurgeryPolicy | None = _view("surgery", "The surgery policy, if any.")
    scheduler: Any = _view("scheduler", "The learning-rate scheduler, if any.")
    grow: bool = _view("grow", "Whether the run grows at all.")
    seed: int = _view("seed", "The seed of kernels' weights and the default controller.")
    graft: str = _view("graft", "When kernels are grafted: 'eager', 'epoch' or 'step'.")

    # --- state and checkpoints -------------------------------------------------------------------

    def state_dict(self, *, generator: torch.Generator | None = None) -> dict[str, Any]:
        """The whole run's state: model, optimizer, seeds and their kernels, growth state (the
        controller's, governor's, breakers' statistics, counters, the record so far) and RNGs.
        Blocking: copies every tensor to the CPU; call between steps.

        :param generator: the training loader's RNG (default: the last fit's loader's).
        :returns: a checkpoint payload (what :class:`CheckpointStore` writes).
        """
        return self.grower.state_dict(generator=generator or self._generator)

    def load_state_dict(
        self, state: dict[str, Any], *, generator: torch.Generator | None = None, path: str = ""
    ) -> Restored:
        """Put :meth:`state_dict`'s payload back (replaying its surgeries on the model first);
        a payload that does not verify changes nothing (host growth aside: see
        :meth:`Grower.load_state_dict`).

        :param state: the payload.
        :param generator: the training loader's RNG, to resume its order.
        :param path: where ``state`` came from, for messages.
        :raises CheckpointIntegrityError: the payload is malformed.
        :raises CheckpointMismatchError: the payload does not fit the model.
        """
        return self.grower.load_state_dict(state, generator=generator, path=path)

    async def save_checkpoint(
        self, directory: str | os.PathLike[str], *, generator: torch.Generator | None = None
    ) -> Path | None:
        """Write a checkpoint now (between epochs); a failed write is an incident only.

        :param directory: the checkpoint directory.
        :param generator: the training loader's RNG, to resume its order.
        :returns: the file written, or ``None`` if the write failed.
        """
        return await save_run_checkpoint(self, directory, generator)

    def restore(
        self, checkpoint: str | os.PathLike[str], *, generator: torch.Generator | None = None
    ) -> Restored:
        """Restore the run from ``checkpoint`` (a file, or a directory: its newest checkpoint that
        restores; damaged ones are skipped with a warning). Build and wrap the model as the
        checkpointed one was; nothing is compiled. Then :meth:`fit` trains the epochs left.

        :param checkpoint: a checkpoint file, or a checkpoint directory.
        :param generator: the training loader's RNG, to resume its order.
        :raises CheckpointError: there is no checkpoint, or none restores.
        """
        return restore_run(self, checkpoint, generator)


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
