"""What a training run records: its lifecycle transitions and its per-epoch results."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..control import EpochReport
from ..reliability import Incident
from ..seeds import SeedState

__all__ = ("FitResult", "GrowthEvent")


@dataclass(frozen=True)
class GrowthEvent:
    """One lifecycle transition, as it happened.

    :ivar epoch: the epoch in which it happened.
    :ivar step: the global training step.
    :ivar slot: the slot's name.
    :ivar source: the state before.
    :ivar target: the state after.
    :ivar reason: why, with the figures behind the decision.
    """

    epoch: int
    step: int
    slot: str
    source: str
    target: str
    reason: str


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    :ivar history: one report per epoch.
    :ivar events: every lifecycle transition, in order.
    :ivar wall_s: wall-clock seconds of the whole fit.
    :ivar steps: training steps taken.
    :ivar incidents: every fault met and what was done about it, in order.
    :ivar ended_eager: the slots whose seed ended the run as its blueprint's eager module
        (``graft="eager"``: the run ended before its kernel arrived; an ``ended_eager``
        incident each). ``len(result.ended_eager)`` counts them; empty when the run waited
        for its kernels (``Trainer.fit(wait_for_kernels=True)``, ``Grower.await_kernels``).
    """

    history: list[EpochReport] = field(default_factory=list)
    events: list[GrowthEvent] = field(default_factory=list)
    wall_s: float = 0.0
    steps: int = 0
    incidents: list[Incident] = field(default_factory=list)
    ended_eager: list[str] = field(default_factory=list)

    def count(self, target: SeedState) -> int:
        """How many transitions into ``target`` happened."""
        return sum(e.target == target.value for e in self.events)
