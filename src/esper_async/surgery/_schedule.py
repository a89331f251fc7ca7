"""Growth schedules: grow the host from a start shape to a target shape during training.

::

    schedule = GrowthSchedule(
        model, optimizer, probe=x[:2],
        stages=[GrowthStage(lambda m: [...operations...], at_tokens=2_000_000, name="stack x3")],
        lr=GrowthLR(peak=1e-3, total_steps=5000, warmup_steps=100, after_growth="rewarm"),
    )
    for step in range(5000):
        schedule.maybe_grow(step=step, tokens=step * tokens_per_step, loss=last_loss)
        model = schedule.model            # a new object only after an fx rewire of the root
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()

A :class:`GrowthStage` is a list of surgery operations and a trigger (a step, a token count, a
loss plateau; whichever comes first). :meth:`GrowthSchedule.maybe_grow`, called before each
optimizer step, fires the stages that are due, in order, each in one
:meth:`ModelSurgeon.transaction <esper_async.surgery.ModelSurgeon.transaction>` (validated, and
rolled back bitwise if anything fails), then sets the learning rate of every parameter group for
the coming step from :class:`GrowthLR`. Each growth is recorded as a :class:`HostGrowthEvent`;
:meth:`GrowthSchedule.state_dict` holds them, and on resume :meth:`GrowthSchedule.load_state_dict`
followed by :meth:`GrowthSchedule.replay` rebuilds the grown structure on a freshly built start
model before its checkpointed tensors are loaded.

Learning rate after growth (:attr:`GrowthLR.after_growth`):

* ``"keep"``: the base schedule (linear warm-up, cosine to ``min_lr`` at ``total_steps``) runs on
  as if nothing had happened.
* ``"rewarm"``: LEMON (Wang et al., ICLR 2024): a linear re-warm-up from the current rate to
  ``rewarm_peak · peak`` over ``rewarm_steps``, then a cosine decay to ``min_lr`` over the steps
  that remain, a faster decay than the base schedule's from that rate.
* ``"restart"``: back to ``peak`` at once, then a cosine over the remaining steps (keep the maximum
  rate, shorten the cosine).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio
import structlog
import torch
from torch import nn

from ..errors import SurgeryError
from ._operations import SurgeryOperation
from ._transaction import ModelSurgeon

__all__ = ("GrowthLR", "GrowthSchedule", "GrowthStage", "HostGrowthEvent", "Plateau")

_log = structlog.get_logger(__name__)

#: The state_dict format; bumped when its keys change.
STATE_VERSION = 1

Operations = Sequence[SurgeryOperation] | Callable[[nn.Module], Sequence[SurgeryOperation]]


@dataclass(frozen=True)
class Plateau:
    """A loss-plateau trigger: the smoothed loss has not improved by ``min_delta`` (relative) for
    ``patience`` calls since the best value seen after the last growth.

    :param patience: calls (steps) without improvement before the stage fires.
    :param min_delta: the relative improvement that counts (0.01: 1 %).
    :param smoothing: the exponential moving average's weight on the past (0 to < 1).
    :param min_step: never fire before this step.
    """

    patience: int
    min_delta: float = 0.01
    smoothing: float = 0.9
    min_step: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1 or self.min_delta < 0 or not 0 <= self.smoothing < 1:
            raise SurgeryError(
                f"Plateau needs patience >= 1, min_delta >= 0 and 0 <= smoothing < 1; got "
                f"{self.patience}, {self.min_delta}, {self.smoothing}",
                operation="growth schedule",
            )


@dataclass(frozen=True)
class GrowthStage:
    """One growth of the host: operations, and when to apply them.

    The stage fires at the first call where any trigger given holds: ``step >= at_step``,
    ``tokens >= at_tokens``, or ``plateau``. Stages fire in order: a stage is considered only after
    the one before it fired.

    :param operations: the operations, or a function of the live model that returns them (called
        when the stage fires, and again on replay; it must give the same operations both times:
        fix any ``seed``).
    :param at_step: fire once this many optimizer steps are done.
    :param at_tokens: fire once this many training tokens (samples) were seen.
    :param plateau: fire on a loss plateau.
    :param name: a label for logs and events (default: ``stage <index>``).
    """

    operations: Operations
    at_step: int | None = None
    at_tokens: int | None = None
    plateau: Plateau | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.at_step is None and self.at_tokens is None and self.plateau is None:
            raise SurgeryError(
                f"GrowthStage {self.name!r} has no trigger; give at_step, at_tokens or plateau",
                operation="growth schedule",
            )
        if (self.at_step is not None and self.at_step < 0) or (
            self.at_tokens is not None and self.at_tokens < 0
        ):
            raise SurgeryError(
                f"GrowthStage {self.name!r}: at_step and at_tokens must be >= 0",
                operation="growth schedule",
            )

    def build(self, model: nn.Module) -> list[SurgeryOperation]:
        """The stage's operations for ``model``.

        :raises SurgeryError: the function returned no operations, or something that is not one.
        """
        ops = list(self.operations(model) if callable(self.operations) else self.operations)
        bad = [op for op in ops if not isinstance(op, SurgeryOperation)]
        if not ops or bad:
            raise SurgeryError(
                f"GrowthStage {self.name!r} must give at least one SurgeryOperation; got "
                f"{[type(op).__name__ for op in ops]}",
                operation="growth schedule",
            )
        return ops


@dataclass(frozen=True)
class GrowthLR:
    """The learning rate through growth: a linear warm-up to ``peak``, a cosine to ``min_lr`` at
    ``total_steps``, and what happens after each growth (see the module docstring).

    :param peak: the maximum learning rate.
    :param total_steps: the step where the rate reaches ``min_lr`` (the budget).
    :param warmup_steps: the initial linear warm-up.
    :param min_lr: the final rate.
    :param after_growth: ``"keep"``, ``"rewarm"`` or ``"restart"``.
    :param rewarm_steps: the re-warm-up's length (``"rewarm"`` only).
    :param rewarm_peak: the re-warm-up's target, a fraction of ``peak`` (``"rewarm"`` only).

    The schedule sets each optimizer group's ``lr`` to this rate times the group's ``lr_scale``
    (1 where absent), so groups can keep fixed ratios.
    """

    peak: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    after_growth: Literal["keep", "rewarm", "restart"] = "keep"
    rewarm_steps: int = 100
    rewarm_peak: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.peak <= 0 or not 0 <= self.min_lr <= self.peak:
            problems.append("need peak > 0 and 0 <= min_lr <= peak")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            problems.append("need total_steps >= 1 and 0 <= warmup_steps <= total_steps")
        if self.after_growth not in ("keep", "rewarm", "restart"):
            problems.append("after_growth must be 'keep', 'rewarm' or 'restart'")
        if self.rewarm_steps < 0 or self.rewarm_peak <= 0:
            problems.append("need rewarm_steps >= 0 and rewarm_peak > 0")
        if problems:
            raise SurgeryError("GrowthLR: " + "; ".join(problems), operation="growth schedule")

    def base(self, step: int) -> float:
        """The rate at ``step`` without growth."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        return _cosine(
            self.peak, self.min_lr, step - self.warmup_steps, self.total_steps - self.warmup_steps
        )

    def at(self, step: int, grown_at: int | None) -> float:
        """The rate at ``step`` when the last growth happened at step ``grown_at`` (``None``:
        never)."""
        if grown_at is None or self.after_growth == "keep" or step < grown_at:
            return self.base(step)
        left = max(1, self.total_steps - grown_at)
        since = step - grown_at
        if self.after_growth == "restart":
            return _cosine(self.peak, self.min_lr, since, left)
        top, start = self.rewarm_peak * self.peak, self.base(grown_at)
        warm = min(self.rewarm_steps, left)
        if since < warm:
            return start + (top - start) * (since + 1) / warm
        return _cosine(top, self.min_lr, since - warm, max(1, left - warm))


def _cosine(high: float, low: float, done: int, length: int) -> float:
    progress = min(1.0, max(0.0, done / max(1, length)))
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class HostGrowthEvent:
    """A stage that fired (JSON-ready via :func:`dataclasses.asdict`).

    :ivar stage: its index in the schedule.
    :ivar name: its name.
    :ivar step: optimizer steps done when it fired.
    :ivar tokens: training tokens seen when it fired.
    :ivar loss: the loss passed to that call (``None`` if none).
    :ivar operations: the operations' descriptions.
    :ivar parameters_before: the model's parameter count before.
    :ivar parameters_after: and after.
    :ivar seconds: the transaction's wall time, validation included.
    """

    stage: int
    name: str
    step: int
    tokens: int
    loss: float | None
    operations: list[str] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    seconds: float = 0.0


class GrowthSchedule:
    """Grows ``model`` through ``stages`` from a hand-written loop (or a trainer's hook).

    :param model: the live model, at its start shape.
    :param optimizer: its optimizer: new parameters join it, and :class:`GrowthLR` sets its rates.
    :param stages: the growth stages, in order.
    :param probe: a small batch the model accepts, for each transaction's validation.
    :param lr: the learning-rate schedule (``None``: the rates are left to the caller).
    :param surgeon: the surgeon to use (default: a new :class:`ModelSurgeon`).
    :raises SurgeryError: no stages.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        stages: Sequence[GrowthStage],
        probe: Any,
        lr: GrowthLR | None = None,
        surgeon: ModelSurgeon | None = None,
    ) -> None:
        if not stages:
            raise SurgeryError("GrowthSchedule needs at least one stage", operation="growth")
        self.model = model
        self.optimizer = optimizer
        self.stages = tuple(stages)
        self.probe = probe
        self.lr = lr
        self.surgeon = surgeon or ModelSurgeon()
        self.events: list[HostGrowthEvent] = []
        self._ema: float | None = None
        self._best: float | None = None
        self._stale = 0
        self._replayed = 0  # events whose structure the live model holds

    @property
    def done(self) -> bool:
        """Whether every stage has fired."""
        return len(self.events) == len(self.stages)

    @property
    def grown_at(self) -> int | None:
        """The step of the last growth (``None``: none yet)."""
        return self.events[-1].step if self.events else None

    def learning_rate(self, step: int) -> float | None:
        """The rate :class:`GrowthLR` gives ``step`` (``None`` without one)."""
        return None if self.lr is None else self.lr.at(step, self.grown_at)

    def due(self, *, step: int, tokens: int = 0, loss: float | None = None) -> bool:
        """Whether the next stage fires at this call (updates the plateau tracker with ``loss``;
        call it once per step, or let :meth:`maybe_grow` do so)."""
        if loss is not None and math.isfinite(loss):
            self._track(loss)
        if self.done:
            return False
        stage = self.stages[len(self.events)]
        if stage.at_step is not None and step >= stage.at_step:
            return True
        if stage.at_tokens is not None and tokens >= stage.at_tokens:
            return True
        p = stage.plateau
        return p is not None and step >= p.min_step and self._stale >= p.patience

    def _track(self, loss: float) -> None:
        stage = None if self.done else self.stages[len(self.events)]
        smoothing = stage.plateau.smoothing if stage and stage.plateau else 0.9
        min_delta = stage.plateau.min_delta if stage and stage.plateau else 0.0
        self._ema = loss if self._ema is None else smoothing * self._ema + (1 - smoothing) * loss
        if self._best is None or self._ema < self._best * (1 - min_delta):
            self._best, self._stale = self._ema, 0
        else:
            self._stale += 1

    def maybe_grow(
        self, *, step: int, tokens: int = 0, loss: float | None = None
    ) -> list[HostGrowthEvent]:
        """Fire the stages due before optimizer step ``step``, then set the rates for it.

        Call it before each step, outside any event loop (from async code use
        :meth:`maybe_grow_async`). Cheap when nothing is due.

        :param step: optimizer steps done so far.
        :param tokens: training tokens (or samples) seen so far.
        :param loss: the latest training loss, for plateau triggers.
        :return: the events of the stages that fired now (usually none).
        :raises SurgeryError: a stage failed; the model and optimizer are as before it.
        """
        if not self.due(step=step, tokens=tokens, loss=loss):
            self._set_lr(step)
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return anyio.run(self._grow_due, step, tokens, loss)
        raise SurgeryError(
            "GrowthSchedule.maybe_grow was called inside a running event loop; "
            "use `await schedule.maybe_grow_async(...)` there",
            operation="growth schedule",
        )

    async def maybe_grow_async(
        self, *, step: int, tokens: int = 0, loss: float | None = None
    ) -> list[HostGrowthEvent]:
        """:meth:`maybe_grow` for async code (a trainer's step hook).

        :raises SurgeryError: a stage failed; the model and optimizer are as before it.
        """
        if not self.due(step=step, tokens=tokens, loss=loss):
            self._set_lr(step)
            return []
        return await self._grow_due(step, tokens, loss)

    async def _grow_due(self, step: int, tokens: int, loss: float | None) -> list[HostGrowthEvent]:
        fired = [await self._fire(step, tokens, loss)]
        while self.due(step=step, tokens=tokens):
            fired.append(await self._fire(step, tokens, loss))
        self._set_lr(step)
        return fired

    async def _fire(self, step: int, tokens: int, loss: float | None) -> HostGrowthEvent:
        index = len(self.events)
        stage = self.stages[index]
        started = time.perf_counter()
        before = sum(p.numel() for p in self.model.parameters())
        ops = stage.build(self.model)
        async with self.surgeon.transaction(self.model, self.optimizer, probe=self.probe) as tx:
            for op in ops:
                await tx.stage(op)
        self.model = tx.model
        event = HostGrowthEvent(
            stage=index,
            name=stage.name or f"stage {index}",
            step=step,
            tokens=tokens,
            loss=loss,
            operations=tx.operations,
            parameters_before=before,
            parameters_after=sum(p.numel() for p in self.model.parameters()),
            seconds=time.perf_counter() - started,
        )
        self.events.append(event)
        self._replayed = len(self.events)
        self._ema, self._best, self._stale = None, None, 0
        _log.info("growth.stage", **asdict(event))
        return event

    def _set_lr(self, step: int) -> None:
        rate = self.learning_rate(step)
        if rate is None or self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress, JSON-ready: the events and the plateau tracker."""
        return {
            "version": STATE_VERSION,
            "events": [asdict(e) for e in self.events],
            "plateau": {"ema": self._ema, "best": self._best, "stale": self._stale},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict`; then call :meth:`replay` before loading
        the model's and optimizer's tensors.

        :raises SurgeryError: the state is of another version, or records more or other stages
            than this schedule has.
        """
        if state.get("version") != STATE_VERSION:
            raise SurgeryError(
                f"growth schedule state version {state.get('version')!r}; this code reads "
                f"{STATE_VERSION}",
                operation="growth schedule resume",
            )
        events = [HostGrowthEvent(**e) for e in state["events"]]
        if len(events) > len(self.stages) or any(e.stage != i for i, e in enumerate(events)):
            raise SurgeryError(
                f"the saved schedule fired stages {[e.stage for e in events]}, which do not fit "
                f"this schedule's {len(self.stages)} stages; build the same schedule to resume",
                operation="growth schedule resume",
            )
        held = self.events[: self._replayed]  # growth the live model holds already
        if [e.stage for e in events[: len(held)]] != [e.stage for e in held]:
            raise SurgeryError(
                f"the model already holds stages {[e.stage for e in held]}, which the saved "
                f"schedule ({[e.stage for e in events]}) does not start with; build the model "
                "afresh before loading",
                operation="growth schedule resume",
            )
        self.events = events
        plateau = state.get("plateau", {})
        self._ema, self._best = plateau.get("ema"), plateau.get("best")
        self._stale = int(plateau.get("stale", 0))
        self._replayed = len(held)  # replay() applies only the stages after these

    def replay(self) -> nn.Module:
        """Re-apply the recorded stages to the (freshly built, start-shape) model, in order, so
        that its structure and the optimizer's parameter groups match the checkpoint's. Load the
        checkpoint's model and optimizer tensors afterwards: they overwrite the values.

        :return: the model (a new object only after an fx rewire of the root).
        :raises SurgeryError: a stage no longer fits the model.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return anyio.run(self.replay_async)
        raise SurgeryError(
            "GrowthSchedule.replay was called inside a running event loop; use "
            "`await schedule.replay_async()` there",
            operation="growth schedule resume",
        )

    async def replay_async(self) -> nn.Module:
        """:meth:`replay` for async code.

        :raises SurgeryError: a stage no longer fits the model.
        """
        for event in self.events[self._replayed :]:
            ops = self.stages[event.stage].build(self.model)
            async with self.surgeon.transaction(self.model, self.optimizer, probe=self.probe) as tx:
                for op in ops:
                    await tx.stage(op)
            self.model = tx.model
        self._replayed = len(self.events)
        return self.model
