"""``IntelligentSeedSelector``: pick the (slot, blueprint) pair to grow next, under constraints.

The selector rules arms out (a slot already live or embargoed after a cull, a blueprint whose
contract does not fit the slot, too many live seeds, a parameter or memory budget that would be
exceeded), then asks its bandit strategy to choose among the arms left. Rewards are the seed's
counterfactual contribution minus a rent per parameter, so a large seed has to earn its keep.

The strategy can be switched while the run goes on; the selector keeps a bounded history of
``(arm, reward, context)`` and replays it into the new strategy, so nothing learned is lost.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any, NamedTuple, cast

import numpy as np
import structlog
import torch

from ..blueprints import Blueprint, SlotContract, build
from ..errors import BlueprintError, NoLegalArmError, SelectionError
from ._strategies import ArmKey, Strategy, make_strategy

__all__ = ("ArmCost", "IntelligentSeedSelector", "SlotCandidate", "estimate_cost")

_log = structlog.get_logger(__name__)

#: Training keeps about four float copies of every parameter: weight, gradient and Adam's two
#: moments. Activations are not counted; pass your own ``cost_fn`` to include them.
_TRAINING_COPIES = 4

#: How many past rewards the selector keeps to replay into a newly switched-in strategy.
_HISTORY_LIMIT = 10_000

#: Strategy options the selector sets when it builds a strategy by name: its rewards are real
#: numbers (contribution minus rent), so Beta-Thompson counts a positive reward as a success.
_SELECTOR_DEFAULTS: Mapping[str, Mapping[str, Any]] = {"thompson_beta": {"threshold": 0.0}}


class SlotCandidate(NamedTuple):
    """What the selector needs to know about a slot at decision time.

    :ivar contract: the slot's shape contract.
    :ivar live: whether a seed is already growing in the slot.
    :ivar embargoed: whether the slot is in its embargo after a cull.
    :ivar health_features: the slot's health-signal vector (the context of LinUCB).
    """

    contract: SlotContract
    live: bool
    embargoed: bool
    health_features: np.ndarray


class ArmCost(NamedTuple):
    """What growing a blueprint in a slot costs: parameters and training memory in bytes."""

    params: int
    memory_bytes: int


def estimate_cost(blueprint: Blueprint, contract: SlotContract) -> ArmCost:
    """Count a blueprint's parameters for ``contract`` by building it on the meta device.

    No weights are allocated. Memory is ``params * bytes per element * 4`` (weight, gradient and
    two Adam moments).

    :raises BlueprintError: if the blueprint does not fit the contract or fails to build.
    """
    with torch.device("meta"):
        module = build(blueprint, contract)
    params = sum(p.numel() for p in module.parameters())
    width = torch.empty((), dtype=getattr(torch, contract.dtype), device="meta").element_size()
    return ArmCost(params, params * width * _TRAINING_COPIES)


class _Fit(NamedTuple):
    reason: str | None  # why the blueprint can never grow in this slot, or None
    cost: ArmCost


class _SlotArms(NamedTuple):
    """A slot's arms for one tuple of blueprints: the fitting ones and their costs, cached."""

    contract: SlotContract
    blueprints: tuple[Blueprint, ...]
    arms: tuple[ArmKey, ...]  # fitting blueprints only, in offer order
    fitting: tuple[Blueprint, ...]
    params: tuple[int, ...]
    memory: tuple[int, ...]
    max_params: int
    max_memory: int


class IntelligentSeedSelector:
    """Chooses where to grow a seed and with which blueprint.

    :param strategy: a :class:`Strategy`, or a registered name (see ``strategy_names()``).
    :param max_live: at most this many seeds may be live at once (``>= 1``).
    :param param_budget: the most parameters all live seeds may hold together, or ``None``.
    :param memory_budget_bytes: the most training memory they may take together, or ``None``.
    :param param_rent: reward subtracted per parameter of a seed (``>= 0``).
    :param rng_seed: seed of the RNG of strategies built by name.
    :param cost_fn: ``cost_fn(blueprint, contract) -> ArmCost``; defaults to
        :func:`estimate_cost`. Called once per (contract, blueprint) and cached.
    :raises SelectionError: if a limit is out of range or the strategy name is unknown.

    Resource handling: fit checks and costs are cached per (contract, blueprint), and each slot's
    arms per (contract, tuple of blueprints), for the selector's lifetime. A decision then costs
    one pass over the slots, not over every pair; the full explanation of ruled-out pairs is
    built only when no pair is legal.
    """

    def __init__(
        self,
        strategy: str | Strategy = "ucb1",
        *,
        max_live: int,
        param_budget: int | None = None,
        memory_budget_bytes: int | None = None,
        param_rent: float = 0.0,
        rng_seed: int = 0,
        cost_fn: Callable[[Blueprint, SlotContract], ArmCost] | None = None,
    ) -> None:
        if int(max_live) < 1:
            raise SelectionError(f"max_live must be at least 1, got {max_live}")
        for name, value in (
            ("param_budget", param_budget),
            ("memory_budget_bytes", memory_budget_bytes),
        ):
            if value is not None and value < 0:
                raise SelectionError(f"{name} must be >= 0 or None, got {value}")
        if not (math.isfinite(param_rent) and param_rent >= 0):
            raise SelectionError(f"param_rent must be finite and >= 0, got {param_rent}")
        self.max_live = int(max_live)
        self.param_budget = param_budget
        self.memory_budget_bytes = memory_budget_bytes
        self.param_rent = float(param_rent)
        self.rng_seed = int(rng_seed)
        self._cost_fn = cost_fn or estimate_cost
        self._fits: dict[tuple[SlotContract, Blueprint], _Fit] = {}
        self._slots: dict[str, _SlotArms] = {}
        self._arm_blueprint: dict[ArmKey, Blueprint] = {}
        self._last_blueprints: tuple[Blueprint, ...] = ()
        #: The reasons last logged for "no legal seed arm": logged at INFO once per change.
        self._no_legal_logged: dict[str, str] | None = None
        #: The legal arms of the last :meth:`choose` (what :meth:`arm_values` scores by default).
        self.last_arms: tuple[ArmKey, ...] = ()
        #: The actions (non-seed arms) offered in the last :meth:`choose_arm`.
        self.last_actions: tuple[ArmKey, ...] = ()
        self._history: deque[tuple[ArmKey, float, list[float] | None]] = deque(
            maxlen=_HISTORY_LIMIT
        )
        self.strategy: Strategy = self._make(strategy)

    # -- strategy ----------------------------------------------------------------------------

    def _make(self, strategy: str | Strategy, **kwargs: Any) -> Strategy:
        if isinstance(strategy, str):
            options = {**_SELECTOR_DEFAULTS.get(strategy, {}), "seed": self.rng_seed, **kwargs}
            return make_strategy(strategy, **options)
        if kwargs:
            raise SelectionError("strategy options apply only when the strategy is given by name")
        if not isinstance(strategy, Strategy):
            raise SelectionError(
                f"{strategy!r} is not a strategy: it needs name, select, update, state_dict and "
                "load_state_dict"
            )
        return strategy

    def set_strategy(
        self, strategy: str | Strategy, *, replay: bool = True, **kwargs: Any
    ) -> Strategy:
        """Switch to another strategy, at any point in the run.

        :param strategy: a registered name or a strategy instance.
        :param replay: feed the new strategy the rewards observed so far (the latest 10,000).
        :param kwargs: options of a strategy given by name, e.g. ``gamma=0.95``.
        :returns: the new strategy.
        :raises SelectionError: if the name or an option is unknown.
        """
        new = self._make(strategy, **kwargs)
        if replay:
            for arm, reward, context in self._history:
                new.update(arm, reward, None if context is None else np.asarray(context))
        _log.info(
            "selection strategy switched",
            old=getattr(self.strategy, "name", type(self.strategy).__name__),
            new=getattr(new, "name", type(new).__name__),
            replayed=len(self._history) if replay else 0,
        )
        self.strategy = new
        return new

    # -- decisions ---------------------------------------------------------------------------

    def _fit(self, contract: SlotContract, blueprint: Blueprint) -> _Fit:
        key = (contract, blueprint)
        fit = self._fits.get(key)
        if fit is None:
            try:
                blueprint.check_fits(contract)
                fit = _Fit(None, self._cost_fn(blueprint, contract))
            except BlueprintError as exc:
                fit = _Fit(f"blueprint does not fit the slot: {exc}", ArmCost(0, 0))
            self._fits[key] = fit
        return fit

    def _slot_arms(
        self, slot: str, contract: SlotContract, blueprints: tuple[Blueprint, ...]
    ) -> _SlotArms:
        entry = self._slots.get(slot)
        if (
            entry is not None
            and (entry.contract is contract or entry.contract == contract)
            and (entry.blueprints is blueprints or entry.blueprints == blueprints)
        ):
            return entry
        arms, fitting, params, memory = [], [], [], []
        for bp in blueprints:
            fit = self._fit(contract, bp)
            if fit.reason is None:
                arm = (slot, bp.id)
                arms.append(arm)
                fitting.append(bp)
                params.append(fit.cost.params)
                memory.append(fit.cost.memory_bytes)
                self._arm_blueprint[arm] = bp
        entry = _SlotArms(
            contract,
            blueprints,
            tuple(arms),
            tuple(fitting),
            tuple(params),
            tuple(memory),
            max(params, default=0),
            max(memory, default=0),
        )
        self._slots[slot] = entry
        return entry

    def _rooms(self, params_used: int, memory_used_bytes: int) -> tuple[int | None, int | None]:
        param_room = None if self.param_budget is None else self.param_budget - params_used
        mem_room = (
            None
            if self.memory_budget_bytes is None
            else self.memory_budget_bytes - memory_used_bytes
        )
        return param_room, mem_room

    def legal_arms(
        self,
        candidates: Mapping[str, SlotCandidate | tuple[Any, ...]],
        blueprints: Sequence[Blueprint],
        *,
        live_count: int,
        params_used: int = 0,
        memory_used_bytes: int = 0,
    ) -> tuple[tuple[ArmKey, ...], list[str], list[int]]:
        """The legal arms, in a stable order (slots as given, then blueprints as given).

        :returns: the arms, the slots that have legal arms, and how many arms each of them has.
        """
        if live_count >= self.max_live:
            return (), [], []
        # Reuse the last tuple of blueprints when the same ones are offered, so that the
        # per-slot cache check below is an identity test.
        bps = self._last_blueprints
        if not (
            blueprints is bps
            or (
                len(blueprints) == len(bps)
                and all(a is b for a, b in zip(blueprints, bps, strict=True))
            )
        ):
            bps = self._last_blueprints = tuple(blueprints)
        param_room, mem_room = self._rooms(params_used, memory_used_bytes)
        parts: list[tuple[ArmKey, ...]] = []
        slots: list[str] = []
        for slot, cand in candidates.items():
            if cand[1] or cand[2]:  # live or embargoed
                continue
            entry = self._slot_arms(slot, cand[0], bps)
            if (param_room is None or entry.max_params <= param_room) and (
                mem_room is None or entry.max_memory <= mem_room
            ):
                part = entry.arms
            else:
                part = tuple(
                    arm
                    for arm, p, m in zip(entry.arms, entry.params, entry.memory, strict=True)
                    if (param_room is None or p <= param_room)
                    and (mem_room is None or m <= mem_room)
                )
            if part:
                parts.append(part)
                slots.append(slot)
        arms = parts[0] if len(parts) == 1 else tuple(chain.from_iterable(parts))
        return arms, slots, [len(p) for p in parts]

    def explain(
        self,
        candidates: Mapping[str, SlotCandidate | tuple[Any, ...]],
        blueprints: Sequence[Blueprint],
        *,
        live_count: int,
        params_used: int = 0,
        memory_used_bytes: int = 0,
    ) -> dict[str, str]:
        """Why each ruled-out (slot, blueprint) pair is ruled out, keyed ``"slot/blueprint_id"``.

        The first rule that applies is given, in this order: the blueprint does not fit the
        slot's contract, ``max_live`` is reached, the slot is live, the slot is embargoed, the
        parameter budget, the memory budget.
        """
        param_room, mem_room = self._rooms(params_used, memory_used_bytes)
        reasons: dict[str, str] = {}
        for slot, (contract, live, embargoed, _features) in candidates.items():
            for bp in blueprints:
                fit = self._fit(contract, bp)
                if fit.reason is not None:
                    reason = fit.reason
                elif live_count >= self.max_live:
                    reason = f"{live_count} seeds live, max_live is {self.max_live}"
                elif live:
                    reason = "the slot already has a live seed"
                elif embargoed:
                    reason = "the slot is embargoed after a cull"
                elif param_room is not None and fit.cost.params > param_room:
                    reason = f"needs {fit.cost.params} parameters, {param_room} left in budget"
                elif mem_room is not None and fit.cost.memory_bytes > mem_room:
                    reason = (
                        f"needs {fit.cost.memory_bytes} bytes, {mem_room} left in memory budget"
                    )
                else:
                    continue
                reasons[f"{slot}/{bp.id}"] = reason
        return reasons

    def choose(
        self,
        candidates: Mapping[str, SlotCandidate | tuple[Any, ...]],
        blueprints: Sequence[Blueprint],
        *,
        live_count: int,
        params_used: int = 0,
        memory_used_bytes: int = 0,
    ) -> tuple[str, Blueprint]:
        """Choose the slot to grow in and the blueprint to grow.

        :param candidates: for each slot name, a :class:`SlotCandidate` (or the same 4-tuple).
        :param blueprints: the blueprints on offer; each is tried against each slot's contract.
        :param live_count: how many seeds are live now.
        :param params_used: parameters the live seeds hold now.
        :param memory_used_bytes: training memory the live seeds take now.
        :returns: ``(slot_name, blueprint)``.
        :raises NoLegalArmError: with ``reasons`` for every pair, if no pair is legal.
        """
        arm = self.choose_arm(
            candidates,
            blueprints,
            live_count=live_count,
            params_used=params_used,
            memory_used_bytes=memory_used_bytes,
        )
        return arm[0], self._arm_blueprint[arm]

    def choose_arm(
        self,
        candidates: Mapping[str, SlotCandidate | tuple[Any, ...]],
        blueprints: Sequence[Blueprint],
        *,
        live_count: int,
        params_used: int = 0,
        memory_used_bytes: int = 0,
        actions: Sequence[ArmKey] = (),
    ) -> ArmKey:
        """Choose among the legal seed arms and other growth ``actions`` (e.g. widening a slot's
        host: ``(slot, "widen")``), in one bandit, with the same rewards.

        Actions count against ``max_live`` as seeds do; the caller decides which are legal. Seed
        arms map back to their blueprint with :meth:`blueprint_of`.

        :param actions: the other legal arms, keyed ``(slot, action name)``; the action's slot
            gives its context features (zeros when it is not among ``candidates``).
        :returns: the chosen arm, ``(slot, blueprint id)`` or one of ``actions``.
        :raises NoLegalArmError: with ``reasons`` for every seed pair, if no arm is legal.
        """
        arms, slots, counts = self.legal_arms(
            candidates,
            blueprints,
            live_count=live_count,
            params_used=params_used,
            memory_used_bytes=memory_used_bytes,
        )
        extra = tuple(a for a in actions if a not in self._arm_blueprint)
        if live_count >= self.max_live:
            extra = ()
        if not arms and not extra:
            reasons = self.explain(
                candidates,
                blueprints,
                live_count=live_count,
                params_used=params_used,
                memory_used_bytes=memory_used_bytes,
            )
            shown = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
            more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
            if reasons != self._no_legal_logged:  # once per change, not every epoch
                _log.info("no legal seed arm", ruled_out=len(reasons))
                self._no_legal_logged = dict(reasons)
            raise NoLegalArmError(
                f"no (slot, blueprint) pair is legal among {len(candidates)} slots and "
                f"{len(blueprints)} blueprints: {shown or 'nothing was offered'}{more}. "
                "See .reasons for every pair.",
                reasons=reasons,
            )
        self._no_legal_logged = None
        self.last_arms = arms
        self.last_actions = extra
        context = None
        if getattr(self.strategy, "contextual", False):
            rows = [np.asarray(candidates[s][3], dtype=np.float64) for s in slots]
            width = len(rows[0]) if rows else len(next(iter(candidates.values()))[3])
            context = np.zeros((len(arms) + len(extra), width))
            if rows:
                context[: len(arms)] = np.repeat(np.stack(rows), counts, axis=0)
            for i, (slot, _action) in enumerate(extra, start=len(arms)):
                if slot in candidates:
                    context[i] = np.asarray(candidates[slot][3], dtype=np.float64)
        return cast(ArmKey, self.strategy.select(arms + extra if extra else arms, context))

    def blueprint_of(self, arm: ArmKey) -> Blueprint | None:
        """The blueprint of a seed arm the selector offered; ``None`` for an action.

        :param arm: an arm :meth:`choose_arm` returned.
        """
        return self._arm_blueprint.get(arm)

    def mean_reward(self, arm: ArmKey) -> float:
        """The mean of ``arm``'s rewards so far (``0.0``, every strategy's prior mean, if none).

        :param arm: any arm, seed or action.
        """
        values = [value for key, value, _context in self._history if key == arm]
        return sum(values) / len(values) if values else 0.0

    def arm_values(
        self, arms: Sequence[ArmKey] | None = None
    ) -> dict[tuple[str, Blueprint], float]:
        """Each arm's mean reward so far, from the selector's reward history (``0.0``, every
        strategy's prior mean, for an arm never rewarded). Strategy-independent, so a dashboard
        can compare arms whatever the strategy; what a sampling strategy drew is not kept.

        :param arms: ``(slot, blueprint_id)`` keys the selector has offered (default: the legal
            arms of the last :meth:`choose`).
        :returns: ``{(slot, blueprint): mean reward}``.
        :raises SelectionError: for an arm the selector never offered.
        """
        keys = self.last_arms if arms is None else tuple(arms)
        unknown = [a for a in keys if a not in self._arm_blueprint]
        if unknown:
            raise SelectionError(
                f"arm_values: the selector never offered {unknown[:3]}; pass arms from "
                "legal_arms() or choose()"
            )
        sums: dict[ArmKey, float] = {}
        counts: dict[ArmKey, int] = {}
        wanted = set(keys)
        for arm, value, _context in self._history:
            if arm in wanted:
                sums[arm] = sums.get(arm, 0.0) + value
                counts[arm] = counts.get(arm, 0) + 1
        return {
            (arm[0], self._arm_blueprint[arm]): sums[arm] / counts[arm] if arm in counts else 0.0
            for arm in keys
        }

    # -- rewards -----------------------------------------------------------------------------

    def reward(
        self, slot: str, blueprint: Blueprint | str, contribution: float, param_count: int
    ) -> float:
        """The reward of a seed: its contribution minus ``param_rent * param_count``.

        :raises SelectionError: if a figure is negative (parameters) or not finite.
        """
        if not math.isfinite(contribution):
            raise SelectionError(
                f"contribution of slot {slot!r}, blueprint {blueprint!r} must be finite, got "
                f"{contribution!r}"
            )
        if param_count < 0:
            raise SelectionError(f"param_count must be >= 0, got {param_count}")
        return float(contribution) - self.param_rent * int(param_count)

    def update(
        self,
        slot: str,
        blueprint: Blueprint | str,
        *,
        contribution: float,
        param_count: int,
        health_features: np.ndarray | None = None,
    ) -> float:
        """Feed the strategy the reward of a seed grown in ``slot`` with ``blueprint``.

        :param contribution: the seed's counterfactual contribution (loss without minus loss with;
            see :meth:`PerformanceTracker.record_contribution`).
        :param param_count: the seed's parameter count (charged at ``param_rent``).
        :param health_features: the slot's health features when the seed was chosen (LinUCB).
        :returns: the reward given to the strategy.
        :raises SelectionError: if a figure is out of range, or the strategy rejects the update.
        """
        bp_id = blueprint if isinstance(blueprint, str) else blueprint.id
        value = self.reward(slot, bp_id, contribution, param_count)
        arm = (slot, bp_id)
        context = None if health_features is None else np.asarray(health_features, float)
        self.strategy.update(arm, value, context)
        self._history.append((arm, value, None if context is None else context.tolist()))
        return value

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state and the reward history, JSON-ready."""
        return {
            "strategy": self.strategy.state_dict(),
            "history": [[list(arm), reward, ctx] for arm, reward, ctx in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; a registered strategy is rebuilt by name.

        :raises SelectionError: if the state is malformed or names an unknown strategy.
        """
        try:
            strategy_state = state["strategy"]
            history = [((str(a[0]), str(a[1])), float(r), c) for a, r, c in state["history"]]
            name = strategy_state["name"]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SelectionError(f"malformed selector state: {exc!r}") from exc
        strategy = self.strategy if self.strategy.name == name else self._make(name)
        strategy.load_state_dict(strategy_state)
        self.strategy = strategy
        self._history = deque(history, maxlen=_HISTORY_LIMIT)
