"""The governor: it watches the training loss and rolls the run back when it goes bad.

Every step's loss is judged before the backward pass. A loss is *bad* when it is not finite, or
when it spikes: more than ``spike_factor`` times the median of the last ``window`` good losses
*and* more than ``spike_floor`` above it (a model that has driven its loss near zero would
otherwise see spikes in noise), after ``warmup`` good losses have been seen. A bad step never
updates the model. The trainer then asks which seed caused it (see
:class:`~esper_async.training._guard.StepGuard`), restores the last good
:class:`~esper_async.reliability.Snapshot` and embargoes the culprit.

Snapshots are taken at epoch boundaries only (never per step), copied to host memory in a
worker thread; one whose parameters are not finite is refused, so a rollback always lands on a
finite model.
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

__all__ = ("Governor", "GovernorConfig")

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
    :raises ValueError: if a figure is out of range.
    """

    spike_factor: float = 10.0
    spike_floor: float = 1.0
    window: int = 32
    warmup: int = 8
    snapshot_every_epochs: int = 1
    max_rollbacks_per_epoch: int = 8

    def __post_init__(self) -> None:
        if self.spike_factor <= 1 or self.spike_floor < 0 or self.window < 1 or self.warmup < 1:
            raise ValueError(f"governor needs spike_factor > 1, window, warmup >= 1: {self}")
        if self.snapshot_every_epochs < 1 or self.max_rollbacks_per_epoch < 1:
            raise ValueError(f"governor intervals must be >= 1: {self}")


class Governor:
    """Loss judgement, the last good snapshot, and the count of rollbacks.

    :param config: thresholds.
    """

    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self._recent: deque[float] = deque(maxlen=self.config.window)
        self.snapshot: Snapshot | None = None
        self.rollbacks = 0
        self.rollbacks_this_epoch = 0
        self.snapshots_refused = 0

    def threshold(self) -> float:
        """The loss above which a step counts as a spike now (``inf`` during warm-up)."""
        if len(self._recent) < self.config.warmup:
            return math.inf
        median = statistics.median(self._recent)
        return max(self.config.spike_factor * median, median + self.config.spike_floor)

    @property
    def warming_up(self) -> bool:
        """Whether fewer than ``warmup`` good losses have been seen (no spike is judged yet)."""
        return len(self._recent) < self.config.warmup

    def judge(self, loss: float) -> str | None:
        """``"non_finite"`` or ``"spike"`` for a bad loss, ``None`` for a good one."""
        if not math.isfinite(loss):
            return "non_finite"
        if loss > self.threshold():
            return "spike"
        return None

    def accept(self, loss: float) -> None:
        """Record a good step's loss."""
        self._recent.append(loss)

    def offer(self, snapshot: Snapshot) -> bool:
        """Keep ``snapshot`` as the rollback point if its parameters are finite.

        :returns: whether it was kept.
        """
        if not snapshot.params_finite():
            self.snapshots_refused += 1
            log.warning("snapshot refused: non-finite parameters", step=snapshot.step)
            return False
        self.snapshot = snapshot
        return True

    def due(self, epoch: int) -> bool:
        """Whether a snapshot is due at the end of ``epoch``."""
        return (epoch + 1) % self.config.snapshot_every_epochs == 0

    def new_epoch(self) -> None:
        """Reset the per-epoch rollback count."""
        self.rollbacks_this_epoch = 0

    def note_rollback(self) -> bool:
        """Count a rollback; ``False`` when the epoch's budget of rollbacks is spent."""
        self.rollbacks += 1
        self.rollbacks_this_epoch += 1
        return self.rollbacks_this_epoch <= self.config.max_rollbacks_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Loss window and counters, for checkpoints (the snapshot itself is not saved: a
        checkpoint is a better one)."""
        return {
            "recent": list(self._recent), "rollbacks": self.rollbacks,
            "snapshots_refused": self.snapshots_refused,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._recent = deque((float(v) for v in state["recent"]), maxlen=self.config.window)
        self.rollbacks = int(state["rollbacks"])
        self.snapshots_refused = int(state["snapshots_refused"])
