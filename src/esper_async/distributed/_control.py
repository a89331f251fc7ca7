"""``BroadcastController``: rank 0 decides, every rank applies the same decisions.

Each rank runs its own :class:`~esper_async.Trainer`; at every epoch boundary each asks its
controller. Wrapped in a :class:`BroadcastController`, only rank 0's inner controller is asked;
its decisions (and their order) are broadcast over the control channel, so every rank germinates,
blends, fossilizes and culls the same seeds in the same slots at the same step. Only rank 0's
controller learns (its selector and tracker statistics are the job's); checkpoints carry rank 0's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from ..control import Controller, Decision, EpochReport
from ..seeds import SeedSlot
from ._context import RankContext
from ._errors import ControllerBroadcastError, RankDivergenceError

__all__ = ("BroadcastController",)

log = structlog.get_logger(__name__)


class BroadcastController:
    """A :class:`~esper_async.control.Controller` that decides on rank 0 only and broadcasts.

    ``decide`` is a collective: every rank's trainer calls it once per epoch boundary, which the
    trainer guarantees when every rank runs the same number of epochs.

    :param inner: the controller that decides (used on rank 0; the other ranks hold it only so
        that a checkpoint's state can be loaded anywhere).
    :param ctx: this rank's context.
    :ivar decided: every decision applied on this rank, as ``(time.time(), epoch, decision)``.
    """

    def __init__(self, inner: Controller, ctx: RankContext) -> None:
        self.inner = inner
        self.ctx = ctx
        self.decided: list[tuple[float, int, Decision]] = []

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        """Rank 0's decisions for this epoch boundary, on every rank.

        :raises ControllerBroadcastError: on the other ranks, if rank 0's controller raised (rank
            0 re-raises the original error).
        :raises RankDivergenceError: if a decision names a slot this rank does not have.
        """
        ctx = self.ctx
        payload: tuple[str, Any] | None = None
        failure: BaseException | None = None
        if ctx.is_leader:
            try:
                payload = ("ok", list(self.inner.decide(report, history, slots)))
            except Exception as exc:
                failure = exc
                payload = ("error", f"{type(exc).__name__}: {exc}")
        kind, body = ctx.channel.broadcast_object(payload, ctx.LEADER)
        if failure is not None:
            raise failure
        if kind == "error":
            raise ControllerBroadcastError(
                f"rank {ctx.rank}: rank 0's controller failed at epoch {report.epoch}: {body}",
                rank=ctx.rank,
            )
        decisions: list[Decision] = list(body)
        unknown = sorted({d.slot for d in decisions} - set(slots))
        if unknown:
            raise RankDivergenceError(
                f"rank {ctx.rank} has no slots {unknown} that rank 0 decided about; every rank "
                "must wrap the same model with the same slot targets",
                rank=ctx.rank,
                ranks=(ctx.rank,),
                field="decisions",
            )
        now = time.time()
        self.decided.extend((now, report.epoch, d) for d in decisions)
        if decisions:
            log.debug(
                "distributed.decisions",
                rank=ctx.rank,
                epoch=report.epoch,
                decisions=[type(d).__name__ + ":" + d.slot for d in decisions],
            )
        return decisions

    def state_dict(self) -> dict[str, Any]:
        """The inner controller's state (rank 0's is the job's), or ``{}`` if it keeps none."""
        state_dict = getattr(self.inner, "state_dict", None)
        return {} if state_dict is None else dict(state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load ``state`` into the inner controller (on every rank, so any rank can lead later)."""
        load = getattr(self.inner, "load_state_dict", None)
        if load is not None and state:
            load(state)
