"""The controller: reads an epoch's figures and decides what the seeds do next.

It makes no change itself: :meth:`HeuristicController.decide` returns decisions, and the trainer
applies them at a step boundary (the trainer is the one writer of the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .blueprints import Blueprint, SlotKind
from .seeds import HealthSignals, SeedSlot, SeedState

__all__ = (
    "Controller",
    "ControllerConfig",
    "Counterfactual",
    "Cull",
    "Decision",
    "EpochReport",
    "Fossilize",
    "Germinate",
    "HeuristicController",
    "Release",
    "StartBlending",
)


@dataclass(frozen=True)
class Counterfactual:
    """A seed's measured contribution: validation figures with it and with α = 0, same batches."""

    loss_with: float
    loss_without: float
    acc_with: float
    acc_without: float

    @property
    def loss_gain(self) -> float:
        """How much the seed lowers validation loss (positive is good)."""
        return self.loss_without - self.loss_with


@dataclass(frozen=True)
class EpochReport:
    """What the trainer measured over one epoch.

    :ivar epoch: 0-based epoch index.
    :ivar train_loss: mean training loss.
    :ivar val_loss: validation loss of the whole model.
    :ivar val_acc: validation accuracy.
    :ivar health: health signals per slot.
    :ivar counterfactual: per blended seed, its contribution.
    """

    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    health: Mapping[str, HealthSignals] = field(default_factory=dict)
    counterfactual: Mapping[str, Counterfactual] = field(default_factory=dict)


@dataclass(frozen=True)
class Germinate:
    """Start a seed of ``blueprint`` in ``slot`` (its kernel is compiled in the background)."""

    slot: str
    blueprint: Blueprint
    reason: str


@dataclass(frozen=True)
class StartBlending:
    """Start ramping the seed in ``slot`` into the host's output."""

    slot: str
    reason: str
    epochs: int = 1
    """Epochs over which α ramps from 0 to 1."""


@dataclass(frozen=True)
class Fossilize:
    """Keep the seed in ``slot`` for good."""

    slot: str
    reason: str


@dataclass(frozen=True)
class Cull:
    """Remove the seed in ``slot`` and embargo the slot."""

    slot: str
    reason: str


@dataclass(frozen=True)
class Release:
    """End the embargo of ``slot``."""

    slot: str
    reason: str


Decision = Germinate | StartBlending | Fossilize | Cull | Release


class Controller(Protocol):
    """What the trainer asks at every epoch boundary."""

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        """Return the decisions to apply now, given this epoch's report and the ones before."""
        ...


@dataclass(frozen=True)
class ControllerConfig:
    """Thresholds of the heuristic controller. Durations are in epochs.

    :ivar plateau_patience: epochs without enough improvement before growth is considered.
    :ivar plateau_tolerance: relative improvement of the best validation loss that counts.
    :ivar max_live_seeds: at most this many seeds alive at once.
    :ivar training_epochs: epochs a seed trains unblended before blending starts.
    :ivar blend_epochs: epochs over which α ramps from 0 to 1 (the trainer converts to steps).
    :ivar probation_epochs: epochs at α = 1 before the seed is judged.
    :ivar embargo_epochs: epochs a slot rests after a cull.
    :ivar fossilize_margin: validation-loss gain a seed must show to be kept.
    """

    plateau_patience: int = 2
    plateau_tolerance: float = 0.05
    max_live_seeds: int = 2
    training_epochs: int = 1
    blend_epochs: int = 1
    probation_epochs: int = 1
    embargo_epochs: int = 2
    fossilize_margin: float = 0.0


def _default_blueprint(kind: SlotKind) -> Blueprint:
    if kind is SlotKind.CONV:
        return Blueprint("residual_conv", {"kernel_size": 3, "expansion": 2})
    return Blueprint("mlp", {"hidden_mult": 4})


def plateaued(history: Sequence[EpochReport], patience: int, tolerance: float) -> bool:
    """Whether the best validation loss of the last ``patience`` epochs failed to beat the best
    before them by a relative ``tolerance``."""
    if len(history) <= patience:
        return False
    before = min(r.val_loss for r in history[:-patience])
    recent = min(r.val_loss for r in history[-patience:])
    return recent > before * (1.0 - tolerance)


class HeuristicController:
    """Grow on a loss plateau; judge seeds by their measured contribution.

    * A live seed whose slot reports non-finite activations is culled.
    * TRAINING for ``training_epochs`` → BLENDING; the ramp to PROBATION is per step.
    * After ``probation_epochs`` at α = 1 the seed is kept (FOSSILIZED) if removing it would raise
      validation loss by more than ``fossilize_margin``; otherwise it is CULLED.
    * An EMBARGOED slot is released after ``embargo_epochs``.
    * On a plateau, with fewer than ``max_live_seeds`` alive, the first dormant slot germinates
      with ``choose_blueprint(kind)``.

    :param config: thresholds.
    :param choose_blueprint: the blueprint for a slot kind (default: a residual conv block for conv
        slots, an MLP for linear slots).
    """

    def __init__(
        self,
        config: ControllerConfig | None = None,
        *,
        choose_blueprint: Callable[[SlotKind], Blueprint] = _default_blueprint,
    ) -> None:
        self.config = config or ControllerConfig()
        self.choose_blueprint = choose_blueprint

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        cfg = self.config
        decisions: list[Decision] = []
        for name, slot in slots.items():
            life = slot.lifecycle
            health = report.health.get(name)
            if life.live and health is not None and not health.finite:
                decisions.append(Cull(name, "non-finite activations"))
            elif life.state is SeedState.TRAINING and life.epochs_in_state >= cfg.training_epochs:
                decisions.append(
                    StartBlending(
                        name, f"trained {life.epochs_in_state} epochs", cfg.blend_epochs
                    )
                )
            elif life.state is SeedState.PROBATION and life.epochs_in_state >= cfg.probation_epochs:
                decisions.append(self._judge(name, report.counterfactual.get(name)))
            elif life.state is SeedState.EMBARGOED and life.epochs_in_state >= cfg.embargo_epochs:
                decisions.append(Release(name, f"embargo of {cfg.embargo_epochs} epochs over"))

        live = sum(s.lifecycle.live for s in slots.values())
        if live < cfg.max_live_seeds and plateaued(
            [*history, report], cfg.plateau_patience, cfg.plateau_tolerance
        ):
            for name, slot in slots.items():
                if slot.state is SeedState.DORMANT and slot.contract is not None:
                    decisions.append(
                        Germinate(
                            name,
                            self.choose_blueprint(slot.contract.kind),
                            f"validation loss plateaued at {report.val_loss:.4f}",
                        )
                    )
                    break
        return decisions

    def _judge(self, name: str, cf: Counterfactual | None) -> Decision:
        if cf is None or not math.isfinite(cf.loss_with):
            return Cull(name, "no finite counterfactual measurement")
        figures = f"val loss {cf.loss_with:.4f} with, {cf.loss_without:.4f} without"
        if cf.loss_gain > self.config.fossilize_margin:
            return Fossilize(name, f"helps: {figures}")
        return Cull(name, f"does not help: {figures}")
