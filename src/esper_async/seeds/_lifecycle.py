"""The seed lifecycle: states, the legal transitions between them, and a per-slot record.

::

    DORMANT ─► GERMINATED ─► TRAINING ─► BLENDING ─► PROBATION ─► FOSSILIZED
                   │             │           │            │
                   └─────────────┴───────────┴────────────┴──► CULLED ─► EMBARGOED ─► DORMANT

FOSSILIZED is terminal: the seed has become part of the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import LifecycleError

__all__ = ("LIVE_STATES", "TRANSITIONS", "Lifecycle", "SeedState")


class SeedState(StrEnum):
    """Where a slot's seed is in its life."""

    DORMANT = "dormant"
    """No seed; the slot is a pass-through."""
    GERMINATED = "germinated"
    """A kernel has been requested for the slot and is being compiled."""
    TRAINING = "training"
    """The kernel learns from the host's gradients; the host's output is unchanged."""
    BLENDING = "blending"
    """The seed's contribution is ramped in: output ``h + α·seed(h)``, α from 0 to 1."""
    PROBATION = "probation"
    """Fully blended (α = 1); its contribution is being judged."""
    FOSSILIZED = "fossilized"
    """Kept for good: merged into the host. Terminal."""
    CULLED = "culled"
    """Removed; its parameters and memory are freed."""
    EMBARGOED = "embargoed"
    """Cooling down after a cull before the slot may germinate again."""


LIVE_STATES = frozenset(
    {SeedState.GERMINATED, SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATION}
)
"""States in which a seed exists and may still be culled."""

TRANSITIONS: dict[SeedState, frozenset[SeedState]] = {
    SeedState.DORMANT: frozenset({SeedState.GERMINATED}),
    SeedState.GERMINATED: frozenset({SeedState.TRAINING, SeedState.CULLED}),
    SeedState.TRAINING: frozenset({SeedState.BLENDING, SeedState.CULLED}),
    SeedState.BLENDING: frozenset({SeedState.PROBATION, SeedState.CULLED}),
    SeedState.PROBATION: frozenset({SeedState.FOSSILIZED, SeedState.CULLED}),
    SeedState.FOSSILIZED: frozenset(),
    SeedState.CULLED: frozenset({SeedState.EMBARGOED}),
    SeedState.EMBARGOED: frozenset({SeedState.DORMANT}),
}
"""For each state, the states it may move to."""


@dataclass
class Lifecycle:
    """One slot's lifecycle: its state, how long it has been there, and its history.

    :ivar slot: the slot's name (for error messages).
    :ivar state: the current state.
    :ivar epochs_in_state: epoch boundaries seen since the last transition.
    :ivar steps_in_state: training steps since the last transition.
    :ivar history: every transition made, as ``(from, to, reason)``.
    """

    slot: str
    state: SeedState = SeedState.DORMANT
    epochs_in_state: int = 0
    steps_in_state: int = 0
    history: list[tuple[SeedState, SeedState, str]] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """Whether a seed exists and can still be culled."""
        return self.state in LIVE_STATES

    def can(self, target: SeedState) -> bool:
        """Whether moving to ``target`` is legal now."""
        return target in TRANSITIONS[self.state]

    def to(self, target: SeedState, reason: str = "") -> None:
        """Move to ``target``, resetting the counters.

        :raises LifecycleError: if the lifecycle does not allow the move.
        """
        target = SeedState(target)
        if not self.can(target):
            allowed = ", ".join(s.value for s in sorted(TRANSITIONS[self.state])) or "none"
            raise LifecycleError(
                f"slot {self.slot!r}: cannot go from {self.state.value} to {target.value} "
                f"(allowed from {self.state.value}: {allowed})",
                slot=self.slot,
                source=self.state,
                target=target,
            )
        self.history.append((self.state, target, reason))
        self.state = target
        self.epochs_in_state = 0
        self.steps_in_state = 0
