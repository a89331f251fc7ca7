"""Checkpoints of a data-parallel run: written by rank 0, read by every rank.

Every rank holds the same model (see :func:`check_ranks_in_sync`), so rank 0's state is the job's.
:func:`save_checkpoint` writes it with the reliability layer's atomic
:class:`~esper_async.reliability.CheckpointStore` (kernel artifact bytes included) and tells every
rank the path; :func:`load_checkpoint` has rank 0 choose the newest checkpoint, every rank read
that same file, restore its model, optimizer and controller, and then checks that all ranks agree.
Nothing is compiled on resume: the seeds are loaded from the bytes in the checkpoint. Surgeries
committed before a checkpoint (``surgeries=``, the trainer's :attr:`~esper_async.Trainer.surgeries`)
are recorded in it and replayed on the fresh model before its tensors load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from .._exceptions import SurgeryError
from ..reliability import CheckpointError, CheckpointStore, Restored, capture_state, restore_state
from ..seeds import SeedState, find_slots
from ..surgery import SurgeryPolicy
from ..surgery._replay import replay_operations
from ._context import RankContext
from ._control import BroadcastController
from ._kernels import RankCompiler
from ._sync import check_ranks_in_sync

__all__ = ("load_checkpoint", "save_checkpoint")

log = structlog.get_logger(__name__)


def _broadcast_path(ctx: RankContext, path: str | None) -> str | None:
    found: str | None = ctx.channel.broadcast_object(path, ctx.LEADER)
    return found


def save_checkpoint(
    checkpoints: CheckpointStore,
    *,
    ctx: RankContext,
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compiler: RankCompiler,
    controller: BroadcastController | None = None,
    record: Mapping[str, Any] | None = None,
    surgeries: Sequence[Mapping[str, Any]] = (),
    surgery: SurgeryPolicy | None = None,
) -> Path | None:
    """Rank 0 writes the run's state; every rank returns its path. A collective.

    Call it between steps (e.g. from ``Trainer.fit(on_epoch=...)``) on every rank. A checkpoint is
    not written while a seed is GERMINATED (its kernel is still compiling, and a resumed trainer
    would wait for a compile nobody started): every rank then returns ``None``, since every rank
    holds the same structure.

    :param checkpoints: where checkpoints go (on rank 0's file system).
    :param epoch: epochs completed (over the whole run, resumes included).
    :param step: global steps taken.
    :param compiler: this rank's compiler: it knows the bytes of every grafted kernel.
    :param controller: its rank-0 state is saved under ``"controller"``.
    :param record: JSON-ready data kept beside the state (returned by :func:`load_checkpoint`).
    :param surgeries: the surgeries committed on the model so far (``trainer.surgeries``).
    :param surgery: the trainer's surgery policy: its counts are saved.
    :raises CheckpointError: if rank 0 cannot write (rank 0 raises its error; the others raise
        this).
    """
    slots = find_slots(model)
    pending = sorted(n for n, s in slots.items() if s.state is SeedState.GERMINATED)
    if pending:
        log.info("distributed.checkpoint_skipped", epoch=epoch, compiling=pending)
        return None
    path: str | None = None
    failure: Exception | None = None
    if ctx.is_leader:
        try:
            payload = capture_state(
                epoch=epoch,
                step=step,
                model=model,
                optimizer=optimizer,
                slots=slots,
                kernels=compiler.kernels,
                stateful={"controller": controller, "surgery": surgery},
                record={**(record or {}), "surgery": [dict(r) for r in surgeries]},
            )
            path = str(checkpoints.save(payload))
        except Exception as exc:  # every rank must reach the broadcast below
            failure = exc
    shared = _broadcast_path(ctx, path)
    if failure is not None:
        raise failure
    if shared is None:
        raise CheckpointError(
            f"rank {ctx.rank}: rank 0 could not write the checkpoint of epoch {epoch}",
            path=str(checkpoints.directory),
        )
    return Path(shared)


def load_checkpoint(
    checkpoints: CheckpointStore,
    *,
    ctx: RankContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compiler: RankCompiler,
    controller: BroadcastController | None = None,
    surgery: SurgeryPolicy | None = None,
) -> Restored:
    """Every rank restores rank 0's newest checkpoint, then the ranks are checked. A collective.

    ``model`` is freshly built and wrapped with the same slots on every rank, ``optimizer`` made
    over its parameters; both are restored in place, seeds included, after the recorded surgeries
    are replayed on it. Build the trainer after this, set its ``step`` to :attr:`Restored.step`
    and its ``surgeries`` to ``restored.record["surgery"]``.

    :param checkpoints: the directory rank 0 wrote to (every rank must be able to read it).
    :param surgery: the surgery policy the trainer will use: its saved counts are restored.
    :raises CheckpointError: if there is no checkpoint, or it does not load, or does not fit.
    :raises RankDivergenceError: if the ranks disagree after restoring.
    """
    path = None
    if ctx.is_leader:
        found = checkpoints.paths()
        path = str(found[-1]) if found else None
    shared = _broadcast_path(ctx, path)
    if shared is None:
        raise CheckpointError(
            f"no checkpoint in {checkpoints.directory} to resume from",
            path=str(checkpoints.directory),
        )
    payload = checkpoints.load(shared)
    try:
        replay_operations(model, optimizer, json.loads(payload["record"]).get("surgery", []))
    except SurgeryError as exc:
        raise CheckpointError(
            f"rank {ctx.rank}: the checkpoint's surgery does not fit the model ({exc}); build "
            "and wrap the model as the checkpointed run did", path=shared,
        ) from exc
    restored = restore_state(
        payload,
        model=model,
        optimizer=optimizer,
        slots=find_slots(model),
        stateful={"controller": controller, "surgery": surgery},
        device=ctx.device,
    )
    compiler.kernels.update(restored.kernels)
    check_ranks_in_sync(model, ctx)
    log.info("distributed.resumed", rank=ctx.rank, path=shared, epoch=restored.epoch)
    return restored
