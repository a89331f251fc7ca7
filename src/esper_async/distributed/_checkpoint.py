"""Checkpoints of a data-parallel run: written by rank 0, read by every rank.

Every rank holds the same model (see :func:`check_ranks_in_sync`), so rank 0's state is the job's.
:func:`save_checkpoint` writes it with the reliability layer's atomic
:class:`~esper_async.reliability.CheckpointStore` (kernel artifact bytes included, sealed with
their sha256) and tells every rank the path; :func:`load_checkpoint` has rank 0 list the
checkpoints, every rank verify and restore the same file, newest first, falling back together to
an older one when any rank cannot, and then checks that all ranks agree.
Nothing is compiled on resume: the seeds are loaded from the bytes in the checkpoint.

Give ``grower=`` (a trainer's :attr:`~esper_async.Trainer.grower`) and the payload is the grower's
one state path (:meth:`esper_async.training.Grower.state_dict`): model, optimizer, seeds and their
kernels, controller, governor, breakers, scheduler, counters, committed surgeries and the record,
restored with :meth:`~esper_async.training.Grower.load_state_dict` (the trainer then continues at
the restored step and epoch; nothing is set by hand). Without it, the pieces are passed one by
one (``model=``, ``optimizer=``, ``controller=``, ``surgeries=``...), for a model restored
before its trainer is built; the surgeries recorded are replayed on the fresh model before its
tensors load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch
from torch import nn

from ..errors import SurgeryError
from ..reliability import (
    CHECKPOINT_PATTERN,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointStore,
    Restored,
    apply_state,
    capture_state,
    unrestorable,
    verify_state,
)
from ..reliability import failure_reason as reason
from ..seeds import SeedState, find_slots
from ..surgery import SurgeryPolicy, replay_operations
from ._context import RankContext
from ._control import BroadcastController
from ._kernels import RankCompiler
from ._sync import check_ranks_in_sync

__all__ = ("GrowthState", "load_checkpoint", "save_checkpoint")

log = structlog.get_logger(__name__)


class GrowthState(Protocol):
    """What ``grower=`` must be: :class:`esper_async.training.Grower` is one."""

    model: nn.Module
    slots: Mapping[str, Any]

    def state_dict(self) -> dict[str, Any]:
        """All growth state, as a checkpoint payload."""
        ...

    def load_state_dict(self, state: dict[str, Any], *, path: str = "") -> Restored:
        """Put the payload back."""
        ...


def _broadcast_path(ctx: RankContext, path: str | None) -> str | None:
    found: str | None = ctx.channel.broadcast_object(path, ctx.LEADER)
    return found


def save_checkpoint(
    checkpoints: CheckpointStore,
    *,
    ctx: RankContext,
    grower: GrowthState | None = None,
    epoch: int = 0,
    step: int = 0,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    compiler: RankCompiler | None = None,
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
    :param grower: the trainer's grower: its :meth:`~esper_async.training.Grower.state_dict` is
        the payload, and the parameters below are not used (give it, or the pieces).
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
    if grower is None and (model is None or optimizer is None or compiler is None):
        raise ValueError("save_checkpoint needs grower=, or model=, optimizer= and compiler=")
    slots = dict(grower.slots) if grower is not None else find_slots(model)  # type: ignore[arg-type]
    pending = sorted(n for n, s in slots.items() if s.state is SeedState.GERMINATED)
    if pending:
        log.info("distributed.checkpoint_skipped", epoch=epoch, compiling=pending)
        return None
    path: str | None = None
    failure: Exception | None = None
    if ctx.is_leader:
        try:
            payload = grower.state_dict() if grower is not None else capture_state(
                epoch=epoch,
                step=step,
                model=model,
                optimizer=optimizer,
                slots=slots,
                kernels=compiler.kernels,  # type: ignore[union-attr]
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
    grower: GrowthState | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    compiler: RankCompiler | None = None,
    controller: BroadcastController | None = None,
    surgery: SurgeryPolicy | None = None,
) -> Restored:
    """Every rank restores rank 0's newest good checkpoint, then the ranks are checked. A
    collective.

    ``model`` is freshly built and wrapped with the same slots on every rank, ``optimizer`` made
    over its parameters; both are restored in place, seeds included, after the recorded surgeries
    are replayed on it. With ``grower=`` (a trainer built on the fresh model), the grower's
    :meth:`~esper_async.training.Grower.load_state_dict` restores everything, step and surgeries
    included. Without it, build the trainer after this and continue it with
    ``trainer.grower.continue_from(step=restored.step, surgeries=restored.record["surgery"])``.

    Rank 0 lists the checkpoints; the ranks try them newest first, together: each verifies the
    file against its digest and restores it, then the ranks share whether they succeeded. If any
    rank failed (a damaged file, a restore that raised), every rank logs a warning naming the
    file and moves on to the one before it, so all ranks end on the same checkpoint.

    :param checkpoints: the directory rank 0 wrote to (every rank must be able to read it).
    :param ctx: this rank's context.
    :param grower: the trainer's grower (then ``model``, ``optimizer``, ``controller`` and
        ``surgery`` are its own and not used).
    :param model: the freshly built, wrapped model.
    :param optimizer: an optimizer over its parameters.
    :param compiler: this rank's compiler: it learns the restored kernels.
    :param controller: its saved state is restored.
    :param surgery: the surgery policy the trainer will use: its saved counts are restored.
    :raises CheckpointError: on every rank, if there is no checkpoint (saying where rank 0
        looked), or none restores on every rank (listing each file tried and why).
    :raises RankDivergenceError: if the ranks disagree after restoring.
    """
    newest_first = [str(p) for p in reversed(checkpoints.paths())] if ctx.is_leader else None
    candidates: list[str] = ctx.channel.broadcast_object(newest_first, ctx.LEADER)
    if not candidates:
        raise CheckpointError(
            f"rank {ctx.rank}: no checkpoint to resume from: rank 0 looked for "
            f"{CHECKPOINT_PATTERN} files in {checkpoints.directory} and found none",
            path=str(checkpoints.directory),
        )
    tried: dict[str, str] = {}
    mismatch = True
    for path in candidates:
        restored: Restored | None = None
        failure: Exception | None = None
        try:
            _, restored = checkpoints.restore(
                lambda p, payload: (
                    grower.load_state_dict(payload, path=str(p)) if grower is not None
                    else _restore(p, payload, ctx, model, optimizer, controller, surgery)
                ),
                path,
            )
        except Exception as exc:  # every rank must reach the gather below
            failure = exc
        mine = None if failure is None else reason(failure, path)
        verdicts: list[str | None] = ctx.channel.all_gather_object(mine)
        failed = {rank: why for rank, why in enumerate(verdicts) if why is not None}
        if not failed and restored is not None:
            if compiler is not None:
                compiler.kernels.update(restored.kernels)
            check_ranks_in_sync(grower.model if grower is not None else model, ctx)  # type: ignore[arg-type]
            log.info("distributed.resumed", rank=ctx.rank, path=path, epoch=restored.epoch)
            return restored
        why = "; ".join(f"rank {rank}: {text}" for rank, text in failed.items())
        log.warning("distributed.checkpoint_unusable; trying an older one", rank=ctx.rank,
                    path=path, error=why)
        tried[path] = why
        mismatch = mismatch and isinstance(failure, CheckpointMismatchError)
    raise unrestorable(checkpoints.directory, tried, mismatch=mismatch)


def _restore(
    path: Path,
    payload: dict[str, Any],
    ctx: RankContext,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    controller: BroadcastController | None,
    surgery: SurgeryPolicy | None,
) -> Restored:
    """Verify ``payload``, replay its surgeries on ``model``, then restore it."""
    if model is None or optimizer is None:
        raise ValueError("load_checkpoint needs grower=, or model= and optimizer=")
    slots = find_slots(model)
    verified = verify_state(payload, slots=slots, device=ctx.device, path=str(path))
    try:
        replay_operations(model, optimizer, verified.restored.record.get("surgery", []))
    except SurgeryError as exc:
        raise CheckpointMismatchError(
            f"rank {ctx.rank}: the surgery of checkpoint {path} does not fit the model ({exc}); "
            "build and wrap the model as the checkpointed run did", path=str(path),
        ) from exc
    return apply_state(
        verified,
        model=model,
        optimizer=optimizer,
        slots=find_slots(model),
        stateful={"controller": controller, "surgery": surgery},
    )
