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
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..blueprints import Blueprint, library
from ..errors import ControllerConfigError, NoLegalArmError
from ..seeds import HealthSignals, SeedSlot, SeedState
from ..selection import (
    IntelligentSeedSelector,
    PerformanceTracker,
    SlotCandidate,
    make_strategy,
)
from ..telemetry import SPAN_SELECT, Telemetry, selection_attributes

__all__ = (
    "WIDEN_ARM",
    "Controller",
    "ControllerConfig",
    "Counterfactual",
    "Cull",
    "Decision",
    "EndWidthTrial",
    "EpochReport",
    "Fossilize",
    "Germinate",
    "GrowWidth",
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
    :ivar width_counterfactual: per slot whose host was widened by width growth and is still on
        trial, the figures with the new units and with them ablated (their fan-out folded back
        or zeroed), same batches.
    :ivar eval_cost: what the epoch's measurements cost: ``validation_s``,
        ``counterfactual_s`` and ``width_trials_s`` (wall seconds), ``batches`` and
        ``counterfactual_batches`` (validation batches read by the whole model and by the
        ablated passes), ``counterfactual_share`` and ``fraction`` (see
        :attr:`ControllerConfig.counterfactual_fraction`); empty when not measured.
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
    width_counterfactual: Mapping[str, Counterfactual] = field(default_factory=dict)
    eval_cost: Mapping[str, float] = field(default_factory=dict)

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


@dataclass(frozen=True)
class GrowWidth:
    """Widen the host of ``slot`` to ``width`` units (``WidenSlot`` with ``init``), and put the
    new units on trial: their contribution is measured until a :class:`EndWidthTrial`."""

    slot: str
    width: int
    init: str
    reason: str


@dataclass(frozen=True)
class EndWidthTrial:
    """Stop measuring the widening of ``slot``'s host (it was rewarded; the units stay)."""

    slot: str
    reason: str


Decision = Germinate | StartBlending | Fossilize | Cull | Release | GrowWidth | EndWidthTrial

#: The selector's arm for widening a slot's host: ``(slot, WIDEN_ARM)``.
WIDEN_ARM = "widen"
#: ``esper_async.surgery.WIDTH_INITS`` (the surgery layer is above this one; a test keeps them
#: equal).
WIDTH_INITS = ("net2wider", "zero_fanout", "gradmax", "split_noise")
#: Host layers width growth can widen.
_WIDENABLE = (nn.Linear, nn.Conv2d)


@dataclass
class _WidthTrial:
    """A widening on trial: decided at ``epoch``; what it added once committed."""

    epoch: int
    features: list[float]
    committed: bool = False
    params_added: int = 0
    flops_added: int = 0


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
    :ivar fossilize_margin: validation-loss gain (loss without the seed minus with it) a seed
        must exceed to be kept. The default, 0.005, is twice the noise of that gain: for seeds
        whose gain was within two standard errors of zero (seeds that do nothing measurable),
        the median standard error of the gain over the validation examples was 0.0025 on the
        digits host (16 such seeds of 26 judged, 6 runs) and 0.0021 on an MLP on a synthetic
        4-class problem (12 of 21, 6 runs): ``benchmarks/bench_fossilize_margin.py``,
        ``docs/growth.md``. At 0 (the old default) a gain of 0.0001 kept a seed. The margin is
        in loss units: a task whose loss is on another scale should set its own.
    :ivar param_rent: reward charged per seed parameter (bigger seeds must help more).
    :ivar horizon_epochs: the run's length in epochs, when known (``0``: unknown). A seed is
        germinated only if it can be judged before the run ends (``training_epochs +
        blend_epochs + probation_epochs + 1`` epochs left, the 1 for its kernel): one germinated
        later would cost training FLOPs and never become part of the model.
    :ivar flop_rent: reward charged per forward FLOP per example that a grown seed or widening
        adds (``0``: none). Seeds' FLOPs are counted on their module at the slot's shape,
        widenings' on the model before and after.
    :ivar width_growth: offer the selector a ``(slot, "widen")`` arm per slot beside the seeds:
        widen the slot's host by ``width_factor`` (see ``docs/growth.md``).
    :ivar width_init: how the new units start (``"gradmax"``, ``"zero_fanout"``,
        ``"split_noise"``, ``"net2wider"``; see ``esper_async.surgery.WIDTH_INITS``).
    :ivar width_factor: each widening multiplies the host's width by this (at least +1 unit).
    :ivar width_max_growth: a host never grows past this multiple of its first-seen width.
    :ivar width_trial_epochs: epochs after a widening before its contribution is measured and
        rewarded.
    :ivar width_slots: the slots width growth may widen (``None``: every slot whose host is a
        Linear or Conv2d). Slots named here are for widening only: they are offered no seed
        (e.g. a transformer MLP's hidden layer, while its residual-stream slots take the seeds).
    :ivar counterfactual_fraction: the share of validation batches, in ``(0, 1]``, that the
        counterfactual and width-trial passes read (spread evenly; each compares with the whole
        model on the same batches): bounds their cost, one forward pass per live seed or trial
        (see ``esper_async.training._bounded_eval``). ``1``: all of them.
    """

    plateau_patience: int = 2
    plateau_tolerance: float = 0.05
    max_live_seeds: int = 2
    training_epochs: int = 1
    blend_epochs: int = 1
    probation_epochs: int = 1
    embargo_epochs: int = 2
    fossilize_margin: float = 0.005
    param_rent: float = 1e-6
    horizon_epochs: int = 0
    flop_rent: float = 0.0
    width_growth: bool = False
    width_init: str = "gradmax"
    width_factor: float = 2.0
    width_max_growth: float = 2.0
    width_trial_epochs: int = 2
    width_slots: tuple[str, ...] | None = None
    counterfactual_fraction: float = 1.0

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
                value
            )

        factor, most, trial, rent = (
            self.width_factor, self.width_max_growth, self.width_trial_epochs, self.flop_rent
        )
        if not (number(factor) and number(most) and factor > 1.0 and most >= 1.0):
            raise ControllerConfigError(
                f"ControllerConfig needs width_factor > 1 and width_max_growth >= 1, got "
                f"{factor!r} and {most!r}"
            )
        if not (isinstance(trial, int) and number(trial) and trial >= 1
                and number(rent) and rent >= 0):
            raise ControllerConfigError(
                f"ControllerConfig needs an integer width_trial_epochs >= 1 and a finite "
                f"flop_rent >= 0, got {trial!r} and {rent!r}"
            )
        if self.width_init not in WIDTH_INITS or not isinstance(self.width_growth, bool):
            raise ControllerConfigError(
                f"ControllerConfig needs width_growth true or false and width_init one of "
                f"{', '.join(WIDTH_INITS)}; got {self.width_growth!r}, {self.width_init!r}"
            )
        share = self.counterfactual_fraction
        if not (number(share) and 0.0 < share <= 1.0):
            raise ControllerConfigError(
                f"ControllerConfig needs counterfactual_fraction in (0, 1], got {share!r}: "
                "the share of validation batches the counterfactual passes read"
            )
        named = self.width_slots
        if named is not None and not (
            isinstance(named, tuple) and named and all(isinstance(n, str) and n for n in named)
        ):
            raise ControllerConfigError(
                f"ControllerConfig needs width_slots None or a non-empty tuple of slot names, "
                f"got {named!r}"
            )

    @property
    def lifespan_epochs(self) -> int:
        """Epochs from germination to judgement: the kernel's epoch, training, blend,
        probation."""
        return 1 + self.training_epochs + self.blend_epochs + self.probation_epochs

    @classmethod
    def eager(cls, *, max_live_seeds: int = 3, fossilize_margin: float = 0.0) -> ControllerConfig:
        """Grow at once and move fast: germinate at the first plateau check (any epoch counts as
        a plateau), one epoch per stage, and keep any seed whose gain is positive (a seed
        trained for one epoch rarely clears the default margin, and these runs exist to show
        the whole lifecycle). For quick runs, examples and tests, not for results."""
        return cls(
            plateau_patience=1, plateau_tolerance=1.0, max_live_seeds=max_live_seeds,
            training_epochs=1, blend_epochs=1, probation_epochs=1, embargo_epochs=1,
            fossilize_margin=fossilize_margin,
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
    :param blueprints: the designs on offer (default: the standard library; ``()``: none, e.g.
        for width growth alone).
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
        self.blueprints = tuple(library() if blueprints is None else blueprints)
        self.tracker = tracker or PerformanceTracker()
        # slot -> (training loss, health features) when its seed germinated: the outcome is
        # measured against the first, and LinUCB learns from the context the choice was made in.
        self._born: dict[str, tuple[float, list[float]]] = {}
        # width growth: slot -> its widening on trial; slot -> its host's first-seen width
        self._widenings: dict[str, _WidthTrial] = {}
        self._base_width: dict[str, int] = {}

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

        decisions.extend(self._end_width_trials(report))
        late = cfg.horizon_epochs > 0 and report.epoch + cfg.lifespan_epochs >= cfg.horizon_epochs
        if not late and plateaued([*history, report], cfg.plateau_patience, cfg.plateau_tolerance):
            grow = self._choose(report, slots, decisions)
            if grow is not None:
                decisions.append(grow)
        return decisions

    # --- width growth ---------------------------------------------------------------------------

    def _end_width_trials(self, report: EpochReport) -> list[Decision]:
        """Reward every widening whose trial is over with its measured contribution."""
        ended: list[Decision] = []
        for name, trial in list(self._widenings.items()):
            if not trial.committed or report.epoch - trial.epoch < self.config.width_trial_epochs:
                continue
            del self._widenings[name]
            cf = report.width_counterfactual.get(name)
            if cf is None or not math.isfinite(cf.loss_gain):
                ended.append(EndWidthTrial(name, "no finite measurement of the new units"))
                continue
            rent = self.config.flop_rent * trial.flops_added
            reward = self.selector.update(
                name, WIDEN_ARM, contribution=cf.loss_gain - rent,
                param_count=trial.params_added,
                health_features=np.asarray(trial.features, dtype=float),
            )
            ended.append(EndWidthTrial(
                name, f"val loss {cf.loss_with:.4f} with the new units, {cf.loss_without:.4f} "
                f"without; reward {reward:.4f}",
            ))
        return ended

    def _target_width(self, slot: SeedSlot) -> int | None:
        """The width a widening of ``slot``'s host would reach, or ``None`` if it may not grow."""
        host = slot.host
        if not isinstance(host, _WIDENABLE) or (isinstance(host, nn.Conv2d) and host.groups != 1):
            return None
        width = host.out_features if isinstance(host, nn.Linear) else host.out_channels
        base = self._base_width.setdefault(slot.slot_name, width)
        cap = math.floor(base * self.config.width_max_growth)
        target = min(cap, max(width + 1, math.ceil(width * self.config.width_factor)))
        return target if target > width else None

    def _width_actions(
        self, slots: Mapping[str, SeedSlot], leaving: set[str]
    ) -> list[tuple[str, str]]:
        """The ``(slot, "widen")`` arms legal now: a host that may grow, no widening of it on
        trial, and no live seed in the slot (a widening is judged on its own)."""
        resting = (SeedState.DORMANT, SeedState.FOSSILIZED, SeedState.EMBARGOED)
        named = self.config.width_slots
        return [
            (name, WIDEN_ARM) for name, slot in slots.items()
            if slot.contract is not None and name not in self._widenings
            and (named is None or name in named)
            and (slot.state in resting or name in leaving)
            and self._target_width(slot) is not None
        ]

    @property
    def fossilize_margin(self) -> float:
        """The validation-loss gain a seed must show to be kept (``config.fossilize_margin``)."""
        return self.config.fossilize_margin

    def widened(
        self, slot: str, *, committed: bool, params_added: int = 0, flops_added: int = 0
    ) -> None:
        """The grower's report on a :class:`GrowWidth`: committed (with what it added: trainable
        parameters and forward FLOPs per example) or refused (then nothing is rewarded).

        :param slot: the slot whose host was to be widened.
        :param committed: whether the widening went through.
        :param params_added: trainable parameters it added.
        :param flops_added: forward FLOPs per example it added (charged at ``flop_rent``).
        """
        trial = self._widenings.get(slot)
        if trial is None:
            return
        if not committed:
            del self._widenings[slot]
            return
        trial.committed, trial.params_added, trial.flops_added = True, params_added, flops_added

    def _seed_flops(self, slot: SeedSlot) -> int:
        """Forward FLOPs per example of ``slot``'s seed at the slot's shape (0 if unknown)."""
        seed, contract = slot.seed, slot.contract
        if seed is None or contract is None:
            return 0
        param = next(seed.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            x = torch.zeros(contract.batch_shape(1), dtype=getattr(torch, contract.dtype),
                            device=device)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                seed(x)
            return int(counter.get_total_flops())
        except Exception as exc:  # a kernel that cannot be counted is charged nothing
            log.warning("seed FLOPs not counted", slot=slot.slot_name, error=repr(exc))
            return 0

    def _choose(
        self, report: EpochReport, slots: Mapping[str, SeedSlot], decisions: list[Decision]
    ) -> Germinate | GrowWidth | None:
        leaving = {d.slot for d in decisions if isinstance(d, Cull)}
        widen_only = set(self.config.width_slots or ())  # offered the widen arm, never a seed
        candidates = {}
        for name, slot in slots.items():
            if slot.contract is None:
                continue
            occupied = slot.state is not SeedState.DORMANT or name in leaving or name in widen_only
            health = report.health.get(name)
            features = np.asarray(health.as_features() if health else [0.0] * 4, dtype=float)
            candidates[name] = SlotCandidate(
                slot.contract, occupied, slot.state is SeedState.EMBARGOED, features
            )
        live = [s for n, s in slots.items() if s.lifecycle.live and n not in leaving]
        actions = self._width_actions(slots, leaving) if self.config.width_growth else []
        try:
            arm = self.selector.choose_arm(
                candidates,
                self.blueprints,
                live_count=len(live) + len(self._widenings),
                params_used=sum(_params(s) for s in live),
                actions=actions,
            )
        except NoLegalArmError as exc:
            log.debug("nothing to grow", reason=str(exc))
            return None
        name = arm[0]
        features = candidates[name].health_features.tolist()
        blueprint = self.selector.blueprint_of(arm)
        strategy = self.selector.strategy.name
        if blueprint is None:  # the widen arm
            width = self._target_width(slots[name])
            assert width is not None  # _width_actions checked it
            self._widenings[name] = _WidthTrial(report.epoch, features)
            if self.telemetry is not None:
                self._emit_select(name, WIDEN_ARM, report)
            return GrowWidth(
                name, width, self.config.width_init,
                f"validation loss plateaued at {report.val_loss:.4f}; {strategy} chose to "
                f"widen {name} to {width} ({self.config.width_init})",
            )
        self._born[name] = (_loss(report), features)
        if self.telemetry is not None:
            self._emit_select(name, blueprint.name, report)
        return Germinate(
            name,
            blueprint,
            f"validation loss plateaued at {report.val_loss:.4f}; "
            f"{strategy} chose {blueprint.name}",
        )

    def _emit_select(self, name: str, what: str, report: EpochReport) -> None:
        """One ``esper.select`` span: the chosen arm (``what``: a blueprint's name or
        ``"widen"``) and each legal arm's mean reward."""
        assert self.telemetry is not None
        values = self.selector.arm_values()
        arms = {f"{slot}/{bp.name}": value for (slot, bp), value in values.items()}
        for arm in self.selector.last_actions:
            arms[f"{arm[0]}/{arm[1]}"] = self.selector.mean_reward(arm)
        chosen = f"{name}/{what}"
        arms.setdefault(chosen, 0.0)
        attributes = selection_attributes(
            strategy=self.selector.strategy.name, chosen=chosen, arms=arms
        )
        with self.telemetry.span(
            SPAN_SELECT, attributes, slot=name, blueprint=what, epoch=report.epoch
        ):
            pass

    def _judge(self, slot: SeedSlot, report: EpochReport) -> Decision:
        name = slot.slot_name
        cf = report.counterfactual.get(name)
        if cf is None or not math.isfinite(cf.loss_with):
            self._reward(slot, FAILURE_CONTRIBUTION, "culled", report)
            return Cull(name, "no finite counterfactual measurement")
        figures = f"val loss {cf.loss_with:.4f} with, {cf.loss_without:.4f} without"
        margin = self.config.fossilize_margin
        if cf.loss_gain > margin:
            self._reward(slot, cf.loss_gain, "fossilized", report)
            return Fossilize(name, f"helps: {figures}")
        self._reward(slot, cf.loss_gain, "culled", report)
        return Cull(
            name, f"does not help: {figures} (gain {cf.loss_gain:.4f}, not above the margin "
            f"{margin})"
        )

    def _reward(
        self, slot: SeedSlot, contribution: float, outcome: str, report: EpochReport
    ) -> None:
        """Tell the selector and the tracker how a seed's life ended."""
        if slot.blueprint is None:
            return
        name, params = slot.slot_name, _params(slot)
        after = _loss(report)
        before, features = self._born.pop(name, (after, [0.0] * 4))
        if self.config.flop_rent > 0:
            contribution -= self.config.flop_rent * self._seed_flops(slot)
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
            "widenings": {k: vars(t).copy() for k, t in self._widenings.items()},
            "base_width": dict(self._base_width),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.selector.load_state_dict(state["selector"])
        self.tracker.load_state_dict(state["tracker"])
        self._born = {
            str(k): (float(loss), [float(f) for f in features])
            for k, (loss, features) in state.get("born", {}).items()
        }
        self._widenings = {
            str(k): _WidthTrial(
                int(t["epoch"]), [float(f) for f in t["features"]], bool(t["committed"]),
                int(t["params_added"]), int(t["flops_added"]),
            )
            for k, t in state.get("widenings", {}).items()
        }
        self._base_width = {str(k): int(v) for k, v in state.get("base_width", {}).items()}


def _params(slot: SeedSlot) -> int:
    return 0 if slot.seed is None else sum(p.numel() for p in slot.seed.parameters())


def _loss(report: EpochReport) -> float:
    """The epoch's training loss, NaN when no step went through (NaN is never recorded)."""
    return math.nan if report.train_loss is None else report.train_loss
