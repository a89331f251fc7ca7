"""``Faults``: what the grower does about a seed that failed, a bad loss and a stalled run.

It owns the fault state: the out-of-memory pause of growth (doubled on each OOM, reset by a graft
that goes through), the seeds culled for faults since the last snapshot (a rollback must not
bring them back) and the count of epochs in a row whose every step was dropped. It acts on the
run through the :class:`~esper_async.training.Grower`'s public calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..control import Cull, EpochReport
from ..errors import LossAnomaly, SeedRuntimeError
from ..reliability import GovernorError, IncidentKind, ReliabilityConfig, is_out_of_memory
from ..seeds import SeedSlot

if TYPE_CHECKING:
    from ._grower import Grower

__all__ = ("Faults",)


class Faults:
    """The grower's fault handling and its state.

    :param grower: the grower it acts on.
    :param reliability: the OOM backoff and the stall limit.
    """

    def __init__(self, grower: Grower, reliability: ReliabilityConfig) -> None:
        self.grower = grower
        self.reliability = reliability
        self.growth_paused_until = 0
        self.oom_pause = reliability.oom_backoff_epochs
        self.epochs_without_steps = 0
        self._faulty: set[int] = set()

    def paused(self, epoch: int) -> str | None:
        """Why growth may not start in ``epoch`` (an OOM pause), or ``None``."""
        if epoch + 1 < self.growth_paused_until:
            return f"growth paused until epoch {self.growth_paused_until} after out-of-memory"
        return None

    def grafted(self) -> None:
        """A graft went through: the OOM pause starts from its base again."""
        self.oom_pause = self.reliability.oom_backoff_epochs

    def snapshot_taken(self) -> None:
        """A new rollback point: seeds culled before it cannot come back by a rollback."""
        self._faulty.clear()

    def seed_failed(self, exc: SeedRuntimeError, cause: BaseException | None = None) -> None:
        """See :meth:`Grower.seed_failed`."""
        g = self.grower
        slot = g.slots[exc.slot]
        if is_out_of_memory(cause or exc):
            kind = IncidentKind.OUT_OF_MEMORY
            self.growth_paused_until = g.epoch + 1 + self.oom_pause
            self.oom_pause = min(2 * self.oom_pause, self.reliability.oom_backoff_max_epochs)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif exc.__cause__ is not None:
            kind = IncidentKind.SEED_RAISED
        else:
            kind = IncidentKind.SEED_NON_FINITE
        g.incident(kind, slot, str(exc))
        if slot.blueprint is not None:
            g.breakers[slot.blueprint.id].record_failure(kind.value)
        if slot.seed is not None:
            self._faulty.add(id(slot.seed))
        g.apply(Cull(exc.slot, f"{kind.value}: {exc}"))

    def roll_back(self, anomaly: LossAnomaly, cause: BaseException | None = None) -> None:
        """See :meth:`Grower.roll_back`."""
        g = self.grower
        kind = IncidentKind.LOSS_SPIKE if anomaly.kind == "spike" else IncidentKind.NON_FINITE_LOSS
        culprit: SeedSlot | None = None if anomaly.culprit is None else g.slots[anomaly.culprit]
        snapshot = g.governor.snapshot
        to = "no snapshot to roll back to" if snapshot is None else f"back to step {snapshot.step}"
        g.incident(kind, culprit, f"{anomaly}; {to}")
        if not g.governor.note_rollback():
            raise GovernorError(
                f"{g.governor.rollbacks_this_epoch - 1} rollbacks in epoch {g.epoch} did not "
                f"make training sound ({anomaly}); lower the learning rate or check the data",
                step=g.step,
            ) from cause or anomaly
        if snapshot is not None:
            g.restore_snapshot(snapshot)
            for name, slot in g.slots.items():  # seeds culled for faults since stay culled
                if slot.seed is not None and id(slot.seed) in self._faulty and slot.lifecycle.live:
                    g.apply(Cull(name, "culled for a fault before the rollback"))
        if culprit is not None and culprit.lifecycle.live:
            if culprit.blueprint is not None:
                g.breakers[culprit.blueprint.id].record_failure(kind.value)
            g.apply(Cull(culprit.slot_name, f"caused a {kind.value} (loss {anomaly.loss:.4g})"))
        # A fresh wrapper even with nothing restored: a DDP whose forward raised mid-way on one
        # rank keeps per-step state the other ranks' wrappers do not (see StepConsensus).
        g.restored()

    def judge_epoch(self, report: EpochReport) -> bool:
        """Record an epoch that trained nothing or measured a non-finite validation loss as an
        incident. :returns: whether the controller may decide on ``report``."""
        g = self.grower
        sound = True
        if report.steps == 0:
            self.epochs_without_steps += 1
            g.incident(
                IncidentKind.EPOCH_WITHOUT_STEPS,
                None,
                f"all {report.dropped} steps of epoch {report.epoch} were dropped (bad losses, "
                f"rolled back); {self.epochs_without_steps} such epoch(s) in a row",
            )
            sound = False
        else:
            self.epochs_without_steps = 0
        if not report.val_finite:
            g.incident(
                IncidentKind.NON_FINITE_VALIDATION,
                None,
                f"validation loss {report.val_loss} in epoch {report.epoch}; the controller is "
                "not asked this epoch",
            )
            sound = False
        return sound

    def stop_if_stalled(self) -> None:
        """:raises GovernorError: every step was dropped for too many epochs in a row."""
        if self.epochs_without_steps >= self.reliability.max_epochs_without_steps:
            raise GovernorError(
                f"every step of the last {self.epochs_without_steps} epoch(s) was dropped (bad "
                f"losses, rolled back), up to epoch {self.grower.epoch}: training makes no "
                "progress; check the data for NaN/Inf and lower the learning rate",
                step=self.grower.step,
            )

    def state_dict(self) -> dict[str, Any]:
        """The OOM pause and the stall count (JSON-ready)."""
        return {
            "growth_paused_until": self.growth_paused_until,
            "oom_pause": self.oom_pause,
            "epochs_without_steps": self.epochs_without_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.growth_paused_until = int(state["growth_paused_until"])
        self.oom_pause = int(state["oom_pause"])
        self.epochs_without_steps = int(state.get("epochs_without_steps", 0))
