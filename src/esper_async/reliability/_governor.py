"""The governor: it watches the training loss and rolls the run back when it goes bad.

Three parts, each owning its state, and :class:`Governor`, which composes them:

* :class:`LossJudge`: is a loss bad? A loss is bad when it is not finite, or when it spikes:
  more than ``spike_factor`` times the median of the last ``window`` good losses *and* more than
  ``spike_floor`` above it (a model that has driven its loss near zero would otherwise see spikes
  in noise), after ``warmup`` good losses have been seen. A *persistent level* is not a spike:
  when ``level_steps`` spikes in a row (no good step between them) are finite and within
  ``level_spread`` of each other, the loss has moved to a new level (new data, as after a change
  of data set), and the judge starts again from it (a new warm-up) instead of rolling back.
  A divergence does not look like that: its losses grow from one step to the next, or turn
  non-finite, and a rollback brings back good steps between the spikes.
* :class:`SnapshotKeeper`: the last good :class:`~esper_async.reliability.Snapshot`. Snapshots
  are taken at epoch boundaries only (never per step), copied to host memory in a worker thread;
  one whose parameters are not finite is refused, so a rollback always lands on a finite model.
* :class:`RollbackBudget`: rollbacks counted per epoch; past the budget the run stops.

A bad step never updates the model. The trainer then asks which seed caused it (see
:class:`esper_async.training.StepGuard`), restores the last good snapshot and embargoes the culprit.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ._snapshot import Snapshot

__all__ = ("Governor", "GovernorConfig", "LossJudge", "RollbackBudget", "SnapshotKeeper")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GovernorConfig:
    """When the governor intervenes.

    :ivar spike_factor: a loss above this multiple of the recent median is a spike...
    :ivar spike_floor: ...if it is also this much above the median (in loss units).
    :ivar window: good losses the median is taken over.
    :ivar warmup: good losses seen before spikes are judged (early losses move fast).
    :ivar snapshot_every_epochs: epochs between snapshots.
    :ivar max_rollbacks_per_epoch: more rollbacks than this in one epoch stop the run with
        :class:`~esper_async.reliability.GovernorError` (something rollback cannot fix).
    :ivar level_steps: spikes in a row that, finite and within ``level_spread`` of each other,
        are a new loss level rather than spikes (the judge starts again from them).
    :ivar level_spread: the largest ratio between the highest and the lowest of those spikes.
    :raises ValueError: if a figure is out of range.
    """

    spike_factor: float = 10.0
    spike_floor: float = 1.0
    window: int = 32
    warmup: int = 8
    snapshot_every_epochs: int = 1
    max_rollbacks_per_epoch: int = 8
    level_steps: int = 3
    level_spread: float = 2.0

    def __post_init__(self) -> None:
        if self.spike_factor <= 1 or self.spike_floor < 0 or self.window < 1 or self.warmup < 1:
            raise ValueError(f"governor needs spike_factor > 1, window, warmup >= 1: {self}")
        if self.snapshot_every_epochs < 1 or self.max_rollbacks_per_epoch < 1:
            raise ValueError(f"governor intervals must be >= 1: {self}")
        if self.level_steps < 2 or self.level_spread < 1:
            raise ValueError(f"governor needs level_steps >= 2 and level_spread >= 1: {self}")


class LossJudge:
    """Judges losses against the recent good ones, and tells a new level from a spike.

    :param config: thresholds.
    """

    def __init__(self, config: GovernorConfig) -> None:
        self.config = config
        self.recent: deque[float] = deque(maxlen=config.window)
        self.spikes: list[float] = []  # spikes in a row since the last good step
        self.levels = 0

    def threshold(self) -> float:
        """The loss above which a step counts as a spike now (``inf`` during warm-up)."""
        if len(self.recent) < self.config.warmup:
            return math.inf
        median = statistics.median(self.recent)
        return max(self.config.spike_factor * median, median + self.config.spike_floor)

    @property
    def warming_up(self) -> bool:
        """Whether fewer than ``warmup`` good losses have been seen (no spike is judged yet)."""
        return len(self.recent) < self.config.warmup

    def judge(self, loss: float) -> str | None:
        """``"non_finite"`` or ``"spike"`` for a bad loss, ``None`` for a good one (pure)."""
        if not math.isfinite(loss):
            return "non_finite"
        if loss > self.threshold():
            return "spike"
        return None

    def new_level(self, loss: float) -> bool:
        """Count ``loss``, judged a spike, in the run of spikes; whether the run is now a
        persistent level (then the judge starts again from it and ``loss`` is good).

        :param loss: a loss :meth:`judge` called a spike.
        """
        self.spikes.append(loss)
        run = self.spikes[-self.config.level_steps :]
        if len(run) < self.config.level_steps or not all(math.isfinite(v) for v in run):
            return False
        if max(run) > self.config.level_spread * min(run):
            return False
        log.warning(
            "governor: new loss level",
            level=statistics.median(run),
            before=statistics.median(self.recent) if self.recent else None,
        )
        self.recent = deque(run, maxlen=self.config.window)
        self.spikes = []
        self.levels += 1
        return True

    def accept(self, loss: float) -> None:
        """Record a good step's loss (it ends a run of spikes)."""
        self.recent.append(loss)
        self.spikes = []

    def state_dict(self) -> dict[str, Any]:
        """The loss window, the spikes in a row and the levels met, for checkpoints."""
        return {"recent": list(self.recent), "spikes": list(self.spikes), "levels": self.levels}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.config.window)
        self.spikes = [float(v) for v in state.get("spikes", [])]
        self.levels = int(state.get("levels", 0))


class SnapshotKeeper:
    """The last good snapshot (a rollback's target).

    :param every_epochs: epochs between snapshots.
    """

    def __init__(self, every_epochs: int = 1) -> None:
        self.every_epochs = every_epochs
        self.snapshot: Snapshot | None = None
        self.refused = 0

    def offer(self, snapshot: Snapshot) -> bool:
        """Keep ``snapshot`` as the rollback point if its parameters are finite.

        :returns: whether it was kept.
        """
        if not snapshot.params_finite():
            self.refused += 1
            log.warning("snapshot refused: non-finite parameters", step=snapshot.step)
            return False
        self.snapshot = snapshot
        return True

    def due(self, epoch: int) -> bool:
        """Whether a snapshot is due at the end of ``epoch``."""
        return (epoch + 1) % self.every_epochs == 0


class RollbackBudget:
    """Rollbacks, counted over the run and per epoch.

    :param per_epoch: rollbacks allowed in one epoch.
    """

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch = per_epoch
        self.total = 0
        self.this_epoch = 0

    def new_epoch(self) -> None:
        """Reset the per-epoch count."""
        self.this_epoch = 0

    def spend(self) -> bool:
        """Count a rollback; ``False`` when the epoch's budget is spent."""
        self.total += 1
        self.this_epoch += 1
        return self.this_epoch <= self.per_epoch


class Governor:
    """Loss judgement, the last good snapshot, and the count of rollbacks: a
    :class:`LossJudge`, a :class:`SnapshotKeeper` and a :class:`RollbackBudget`.

    :param config: thresholds.
    """

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config = config or GovernorConfig()
        self.judge_part = LossJudge(config)
        self.keeper = SnapshotKeeper(config.snapshot_every_epochs)
        self.budget = RollbackBudget(config.max_rollbacks_per_epoch)

    # --- the loss judge ---------------------------------------------------------------------------

    def threshold(self) -> float:
        """The loss above which a step counts as a spike now (``inf`` during warm-up)."""
        return self.judge_part.threshold()

    @property
    def warming_up(self) -> bool:
        """Whether fewer than ``warmup`` good losses have been seen (no spike is judged yet)."""
        return self.judge_part.warming_up

    def judge(self, loss: float) -> str | None:
        """``"non_finite"`` or ``"spike"`` for a bad loss, ``None`` for a good one."""
        return self.judge_part.judge(loss)

    def new_level(self, loss: float) -> bool:
        """See :meth:`LossJudge.new_level`."""
        return self.judge_part.new_level(loss)

    def accept(self, loss: float) -> None:
        """Record a good step's loss."""
        self.judge_part.accept(loss)

    # --- the snapshot -----------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The last good snapshot (``None``: none yet, or dropped)."""
        return self.keeper.snapshot

    @snapshot.setter
    def snapshot(self, value: Snapshot | None) -> None:
        self.keeper.snapshot = value

    @property
    def snapshots_refused(self) -> int:
        """Snapshots refused for non-finite parameters."""
        return self.keeper.refused

    def offer(self, snapshot: Snapshot) -> bool:
        """See :meth:`SnapshotKeeper.offer`."""
        return self.keeper.offer(snapshot)

    def due(self, epoch: int) -> bool:
        """Whether a snapshot is due at the end of ``epoch``."""
        return self.keeper.due(epoch)

    # --- the rollback budget ----------------------------------------------------------------------

    @property
    def rollbacks(self) -> int:
        """Rollbacks over the run."""
        return self.budget.total

    @property
    def rollbacks_this_epoch(self) -> int:
        """Rollbacks in the current epoch."""
        return self.budget.this_epoch

    def new_epoch(self) -> None:
        """Reset the per-epoch rollback count."""
        self.budget.new_epoch()

    def note_rollback(self) -> bool:
        """Count a rollback; ``False`` when the epoch's budget of rollbacks is spent."""
        return self.budget.spend()

    def state_dict(self) -> dict[str, Any]:
        """Loss window and counters, for checkpoints (the snapshot itself is not saved: a
        checkpoint is a better one)."""
        return {
            **self.judge_part.state_dict(),
            "rollbacks": self.budget.total,
            "snapshots_refused": self.keeper.refused,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.judge_part.load_state_dict(state)
        self.budget.total = int(state["rollbacks"])
        self.keeper.refused = int(state["snapshots_refused"])
