"""The controller: reads an epoch's figures and decides what the seeds do next.

It makes no change itself: :meth:`HeuristicController.decide` returns decisions, and the trainer
applies them at a step boundary (the trainer is the one writer of the model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from ..blueprints import Blueprint, library
from ..errors import NoLegalArmError
from ..seeds import HealthSignals, SeedSlot, SeedState
from ..selection import (
    IntelligentSeedSelector,
    PerformanceTracker,
    SlotCandidate,
    make_strategy,
)
from ..telemetry import SPAN_SELECT, Telemetry, selection_attributes

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
    "plateaued",
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Counterfactual:
    """A seed's measured contribution: validation figures with it and with α = 0, same batches
    (the accuracies are NaN when the task measures no accuracy)."""

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
    :ivar train_loss: mean training loss of the steps that updated the model; ``None`` when
        every step of the epoch was dropped (never a made-up 0.0).
    :ivar val_loss: validation loss of the whole model (NaN or infinite when it was not finite:
        see :attr:`val_finite`).
    :ivar val_acc: validation accuracy; NaN when the task measures none (regression, language
        models): read :attr:`metrics` for what it does measure.
    :ivar health: health signals per slot.
    :ivar counterfactual: per blended seed, its contribution.
    :ivar steps: training steps that updated the model.
    :ivar dropped: batches whose step was dropped (a bad loss, rolled back).
    :ivar metrics: the task's validation figures by name (``accuracy``, ``bits_per_token``, a
        user's own), averaged over the validation batches.
    """

    epoch: int
    train_loss: float | None
    val_loss: float
    val_acc: float = math.nan
    health: Mapping[str, HealthSignals] = field(default_factory=dict)
    counterfactual: Mapping[str, Counterfactual] = field(default_factory=dict)
    steps: int = 0
    dropped: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def val_finite(self) -> bool:
        """Whether the validation loss is finite (the trainer asks the controller only then)."""
        return math.isfinite(self.val_loss)


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
    :ivar param_rent: reward charged per seed parameter (bigger seeds must help more).
    :ivar horizon_epochs: the run's length in epochs, when known (``0``: unknown). A seed is
        germinated only if it can be judged before the run ends (``training_epochs +
        blend_epochs + probation_epochs + 1`` epochs left, the 1 for its kernel): one germinated
        later would cost training FLOPs and never become part of the model.
    """

    plateau_patience: int = 2
    plateau_tolerance: float = 0.05
    max_live_seeds: int = 2
    training_epochs: int = 1
    blend_epochs: int = 1
    probation_epochs: int = 1
    embargo_epochs: int = 2
    fossilize_margin: float = 0.0
    param_rent: float = 1e-6
    horizon_epochs: int = 0

    @property
    def lifespan_epochs(self) -> int:
        """Epochs from germination to judgement: the kernel's epoch, training, blend,
        probation."""
        return 1 + self.training_epochs + self.blend_epochs + self.probation_epochs

    @classmethod
    def eager(cls, *, max_live_seeds: int = 3) -> ControllerConfig:
        """Grow at once and move fast: germinate at the first plateau check (any epoch counts as
        a plateau), one epoch per stage. For quick runs, examples and tests, not for results."""
        return cls(
            plateau_patience=1, plateau_tolerance=1.0, max_live_seeds=max_live_seeds,
            training_epochs=1, blend_epochs=1, probation_epochs=1, embargo_epochs=1,
        )


def plateaued(history: Sequence[EpochReport], patience: int, tolerance: float) -> bool:
    """Whether the best validation loss of the last ``patience`` epochs failed to beat the best
    before them by a relative ``tolerance``. Epochs whose validation loss was not finite are left
    out, as if they had not happened."""
    history = [r for r in history if r.val_finite]
    if len(history) <= patience:
        return False
    before = min(r.val_loss for r in history[:-patience])
    recent = min(r.val_loss for r in history[-patience:])
    return recent > before * (1.0 - tolerance)


#: Scale of a seed's reward: validation-loss contributions on the digits are 0.001–0.1. Gaussian
#: Thompson sampling with unit prior and noise variances (its defaults) would need hundreds of
#: seeds to tell such arms apart; these variances match the scale, so a few lives suffice.
REWARD_PRIOR_VAR = 1e-2
REWARD_NOISE_VAR = 1e-3

#: Reward contribution charged to a seed culled for non-finite values: worse than any seed that
#: merely failed to help, so the selector learns to avoid what breaks.
FAILURE_CONTRIBUTION = -1.0


class HeuristicController:
    """Grow on a loss plateau, where and what the selector chooses; judge seeds by their measured
    contribution.

    * A live seed whose slot reports non-finite activations is culled.
    * TRAINING for ``training_epochs`` → BLENDING; the ramp to PROBATION is per step.
    * After ``probation_epochs`` at α = 1 the seed is kept (FOSSILIZED) if removing it would raise
      validation loss by more than ``fossilize_margin``; otherwise it is CULLED. Either way the
      selector is rewarded with the seed's contribution minus its parameter rent.
    * An EMBARGOED slot is released after ``embargo_epochs``.
    * On a plateau, with fewer than ``max_live_seeds`` alive, the selector picks the
      (slot, blueprint) pair to germinate among the blueprints on offer.

    :param config: thresholds.
    :param selector: chooses where and what to grow (default: Gaussian Thompson sampling seeded
        with ``seed``, its variances scaled to validation-loss rewards, at most
        ``config.max_live_seeds`` live seeds).
    :param blueprints: the designs on offer (default: the standard library).
    :param tracker: per (slot, blueprint) statistics from real training (default: a new one).
    :param seed: RNG seed of the default selector.
    :param telemetry: where each selection is recorded as an ``esper.select`` span (the chosen
        arm and every legal arm's mean reward so far); ``None``: not recorded.
    """

    def __init__(
        self,
        config: ControllerConfig | None = None,
        *,
        selector: IntelligentSeedSelector | None = None,
        blueprints: Sequence[Blueprint] | None = None,
        tracker: PerformanceTracker | None = None,
        seed: int = 0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config or ControllerConfig()
        self.telemetry = telemetry
        self.selector = selector or IntelligentSeedSelector(
            make_strategy(
                "thompson_gaussian",
                prior_var=REWARD_PRIOR_VAR,
                noise_var=REWARD_NOISE_VAR,
                seed=seed,
            ),
            max_live=self.config.max_live_seeds,
            param_rent=self.config.param_rent,
        )
        self.blueprints = tuple(blueprints or library())
        self.tracker = tracker or PerformanceTracker()
        # slot -> (training loss, health features) when its seed germinated: the outcome is
        # measured against the first, and LinUCB learns from the context the choice was made in.
        self._born: dict[str, tuple[float, list[float]]] = {}

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        cfg = self.config
        decisions: list[Decision] = []
        for name, cf in report.counterfactual.items():
            slot = slots[name]
            if slot.blueprint is not None and math.isfinite(cf.loss_with):
                accuracy = math.isfinite(cf.acc_with) and math.isfinite(cf.acc_without)
                self.tracker.record_contribution(
                    name,
                    slot.blueprint.id,
                    loss_with=cf.loss_with,
                    loss_without=cf.loss_without,
                    acc_with=cf.acc_with if accuracy else None,
                    acc_without=cf.acc_without if accuracy else None,
                )
        for name, slot in slots.items():
            life = slot.lifecycle
            health = report.health.get(name)
            if life.live and health is not None and not health.finite:
                decisions.append(Cull(name, "non-finite activations"))
                self._reward(slot, FAILURE_CONTRIBUTION, "culled", report)
            elif life.state is SeedState.TRAINING and life.epochs_in_state >= cfg.training_epochs:
                decisions.append(
                    StartBlending(name, f"trained {life.epochs_in_state} epochs", cfg.blend_epochs)
                )
            elif life.state is SeedState.PROBATION and life.epochs_in_state >= cfg.probation_epochs:
                decisions.append(self._judge(slot, report))
            elif life.state is SeedState.EMBARGOED and life.epochs_in_state >= cfg.embargo_epochs:
                decisions.append(Release(name, f"embargo of {cfg.embargo_epochs} epochs over"))

        late = cfg.horizon_epochs > 0 and report.epoch + cfg.lifespan_epochs >= cfg.horizon_epochs
        if not late and plateaued([*history, report], cfg.plateau_patience, cfg.plateau_tolerance):
            germinate = self._choose(report, slots, decisions)
            if germinate is not None:
                decisions.append(germinate)
        return decisions

    def _choose(
        self, report: EpochReport, slots: Mapping[str, SeedSlot], decisions: list[Decision]
    ) -> Germinate | None:
        leaving = {d.slot for d in decisions if isinstance(d, Cull)}
        candidates = {}
        for name, slot in slots.items():
            if slot.contract is None:
                continue
            occupied = slot.state is not SeedState.DORMANT or name in leaving
            health = report.health.get(name)
            features = np.asarray(health.as_features() if health else [0.0] * 4, dtype=float)
            candidates[name] = SlotCandidate(
                slot.contract, occupied, slot.state is SeedState.EMBARGOED, features
            )
        live = [s for n, s in slots.items() if s.lifecycle.live and n not in leaving]
        try:
            name, blueprint = self.selector.choose(
                candidates,
                self.blueprints,
                live_count=len(live),
                params_used=sum(_params(s) for s in live),
            )
        except NoLegalArmError as exc:
            log.debug("no seed to germinate", reason=str(exc))
            return None
        self._born[name] = (_loss(report), candidates[name].health_features.tolist())
        if self.telemetry is not None:
            self._emit_select(name, blueprint, report)
        return Germinate(
            name,
            blueprint,
            f"validation loss plateaued at {report.val_loss:.4f}; "
            f"{self.selector.strategy.name} chose {blueprint.name}",
        )

    def _emit_select(self, name: str, blueprint: Blueprint, report: EpochReport) -> None:
        """One ``esper.select`` span: the chosen arm and each legal arm's mean reward."""
        assert self.telemetry is not None
        values = self.selector.arm_values()
        arms = {f"{slot}/{bp.name}": value for (slot, bp), value in values.items()}
        chosen = f"{name}/{blueprint.name}"
        arms.setdefault(chosen, 0.0)
        attributes = selection_attributes(
            strategy=self.selector.strategy.name, chosen=chosen, arms=arms
        )
        with self.telemetry.span(
            SPAN_SELECT, attributes, slot=name, blueprint=blueprint.name, epoch=report.epoch
        ):
            pass

    def _judge(self, slot: SeedSlot, report: EpochReport) -> Decision:
        name = slot.slot_name
        cf = report.counterfactual.get(name)
        if cf is None or not math.isfinite(cf.loss_with):
            self._reward(slot, FAILURE_CONTRIBUTION, "culled", report)
            return Cull(name, "no finite counterfactual measurement")
        figures = f"val loss {cf.loss_with:.4f} with, {cf.loss_without:.4f} without"
        if cf.loss_gain > self.config.fossilize_margin:
            self._reward(slot, cf.loss_gain, "fossilized", report)
            return Fossilize(name, f"helps: {figures}")
        self._reward(slot, cf.loss_gain, "culled", report)
        return Cull(name, f"does not help: {figures}")

    def _reward(
        self, slot: SeedSlot, contribution: float, outcome: str, report: EpochReport
    ) -> None:
        """Tell the selector and the tracker how a seed's life ended."""
        if slot.blueprint is None:
            return
        name, params = slot.slot_name, _params(slot)
        after = _loss(report)
        before, features = self._born.pop(name, (after, [0.0] * 4))
        self.selector.update(
            name,
            slot.blueprint,
            contribution=contribution,
            param_count=params,
            health_features=np.asarray(features, dtype=float),
        )
        self.tracker.record_cost(name, slot.blueprint.id, param_count=params)
        if math.isfinite(before) and math.isfinite(after):
            self.tracker.record_outcome(
                name, slot.blueprint.id, outcome, loss_before=before, loss_after=after
            )

    def state_dict(self) -> dict[str, Any]:
        """Selector and tracker statistics (JSON-ready), for checkpoints."""
        return {
            "selector": self.selector.state_dict(),
            "tracker": self.tracker.state_dict(),
            "born": {k: [loss, features] for k, (loss, features) in self._born.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.selector.load_state_dict(state["selector"])
        self.tracker.load_state_dict(state["tracker"])
        self._born = {
            str(k): (float(loss), [float(f) for f in features])
            for k, (loss, features) in state.get("born", {}).items()
        }


def _params(slot: SeedSlot) -> int:
    return 0 if slot.seed is None else sum(p.numel() for p in slot.seed.parameters())


def _loss(report: EpochReport) -> float:
    """The epoch's training loss, NaN when no step went through (NaN is never recorded)."""
    return math.nan if report.train_loss is None else report.train_loss
