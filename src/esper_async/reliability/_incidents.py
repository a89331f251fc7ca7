"""Incidents: faults the trainer met and what it did about them, as the run records them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

__all__ = ("Incident", "IncidentKind")


class IncidentKind(StrEnum):
    """What happened."""

    GERMINATION_REFUSED = "germination_refused"
    """A germination was not started: a breaker is open, growth is backing off, or a resource
    limit is reached. The slot stays dormant."""
    COMPILE_RETRIED = "compile_retried"
    """A compile failed transiently (its workers died) and is tried again after a backoff."""
    COMPILE_FAILED = "compile_failed"
    """A compile failed for good; the seed was culled and the slot embargoed."""
    COMPILE_TIMEOUT = "compile_timeout"
    """A compile ran past its timeout and was cancelled; the slot is dormant again."""
    SEED_RAISED = "seed_raised"
    """A grafted kernel raised; it was culled and the step redone without it."""
    SEED_NON_FINITE = "seed_non_finite"
    """A grafted kernel produced NaN/Inf; it was culled and the step redone without it."""
    OUT_OF_MEMORY = "out_of_memory"
    """Grafting or running a new seed ran out of memory; it was culled and growth backs off."""
    LOSS_SPIKE = "loss_spike"
    """The loss spiked; the run was rolled back to its last good snapshot."""
    NON_FINITE_LOSS = "non_finite_loss"
    """The loss was not finite and no seed explained it; the run was rolled back."""
    CHECKPOINT_FAILED = "checkpoint_failed"
    """A checkpoint could not be written; the previous one stands and training goes on."""
    EPOCH_WITHOUT_STEPS = "epoch_without_steps"
    """Every step of an epoch was dropped (each batch's loss was bad and rolled back): the
    epoch's ``train_loss`` is ``None`` and the controller is not asked. Too many such epochs in
    a row stop the run (``ReliabilityConfig.max_epochs_without_steps``)."""
    NON_FINITE_VALIDATION = "non_finite_validation"
    """The validation loss was NaN or infinite: the report keeps it, and the controller is not
    asked that epoch (no seed is judged, no germination starts on it)."""
    ENDED_EAGER = "ended_eager"
    """The run ended (``graft="eager"``) before a seed's kernel compiled: the seed ends as its
    blueprint's eager module (the validator's reference, the kernel's numerics in the export
    form), its compile was cancelled with the pool, and the kernel was never validated."""


@dataclass(frozen=True)
class Incident:
    """One fault and the response to it.

    :ivar epoch: the epoch it happened in.
    :ivar step: the global step.
    :ivar kind: what happened.
    :ivar slot: the slot concerned, where there is one.
    :ivar blueprint: the blueprint concerned (its name), where there is one.
    :ivar detail: the error or figures behind it.
    """

    epoch: int
    step: int
    kind: IncidentKind
    slot: str | None
    blueprint: str | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Incident:
        """The inverse of :meth:`to_json`."""
        return cls(**{**data, "kind": IncidentKind(data["kind"])})
