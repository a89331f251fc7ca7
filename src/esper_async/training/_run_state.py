"""``RunState``: where a growing run is — step, epoch, the epoch's losses, the record, kernels.

It owns the counters every other part of the grower reads (:class:`~esper_async.training.Grower`
composes it), the run's record (:class:`FitResult`: reports, lifecycle events, incidents) and the
kernels loaded in slots. Lifecycle transitions are recorded here too: :meth:`RunState.transition`
runs a lifecycle action on a slot and records each transition it made as a
:class:`GrowthEvent`, a span and a log line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import structlog
import torch

from ..blueprints import Blueprint
from ..control import report_from_json, report_to_json
from ..kernels import Kernel
from ..reliability import Incident, IncidentKind
from ..seeds import SeedSlot
from ..telemetry import SPAN_EPOCH, SPAN_LIFECYCLE, Telemetry
from ._results import FitResult, GrowthEvent

__all__ = ("RunState",)

log = structlog.get_logger(__name__)


class RunState:
    """The run's counters, the current epoch's losses and span, its record and its kernels.

    :param telemetry: returns the run's telemetry now (it may be replaced between fits).
    """

    def __init__(self, telemetry: Callable[[], Telemetry]) -> None:
        self._telemetry = telemetry
        self.step = 0
        self.epoch = 0
        #: Where the run's epochs started (a resumed run starts later): for loader messages.
        self.first_epoch = 0
        self.steps_per_epoch = 1
        #: The run's record: reports, lifecycle events, incidents.
        self.result = FitResult()
        #: Every kernel loaded in a slot (and in the last snapshot), by id.
        self.kernels: dict[str, Kernel] = {}
        self.ended = False  # the epoch :attr:`epoch` names has ended: the next one is +1
        self.epoch_steps = 0
        self.dropped = 0
        self._losses: list[float] = []
        self._loss_sum: torch.Tensor | None = None  # tensor losses, summed on the device
        self._loss_count = 0
        self._span: ExitStack | None = None
        self._span_obj: Any = None

    # --- the epoch --------------------------------------------------------------------------------

    @property
    def epoch_open(self) -> bool:
        """Whether an epoch is open (its span entered, not yet closed)."""
        return self._span is not None

    def open_epoch(self) -> bool:
        """Open the next epoch (its span). :returns: whether one was opened (``False``: it was
        open already)."""
        if self._span is not None:
            return False
        if self.ended:
            self.epoch += 1
            self.ended = False
        self._span = ExitStack()
        self._span_obj = self._span.enter_context(
            self._telemetry().span(SPAN_EPOCH, epoch=self.epoch)
        )
        return True

    def count_step(self, loss: float | torch.Tensor | None, *, updated: bool) -> None:
        """Count one step of the epoch and its loss (a tensor is summed where it lives)."""
        self.epoch_steps += 1
        if updated:
            if isinstance(loss, torch.Tensor):  # summed on its device, read at the epoch's end
                # One device op a step: a float64 copy first, then an in-place add that casts as
                # it reads. The same sum as of the values read one by one, in float64.
                total = self._loss_sum
                if total is None:
                    self._loss_sum = loss.detach().to(torch.float64, copy=True)
                else:
                    total.add_(loss.detach())
                self._loss_count += 1
            elif loss is not None:
                self._losses.append(float(loss))
        else:
            self.dropped += 1
        self.step += 1

    def epoch_losses(self) -> tuple[float | None, int, int]:
        """The epoch's mean training loss, steps that updated and steps dropped."""
        count = len(self._losses) + self._loss_count
        total = sum(self._losses) + (0.0 if self._loss_sum is None else float(self._loss_sum))
        return total / count if count else None, self.epoch_steps - self.dropped, self.dropped

    def reset_epoch(self) -> None:
        """Start the epoch's counts again (:attr:`steps_per_epoch` becomes its step count)."""
        self.steps_per_epoch = self.epoch_steps
        self.epoch_steps, self._losses, self.dropped = 0, [], 0
        self._loss_sum, self._loss_count = None, 0

    def epoch_figures(self, report: Any, params: int) -> None:
        """Record the epoch's figures on its span (the dashboard's curves, the gauges)."""
        if self._span_obj is not None:
            self._telemetry().epoch_figures(report, params=params, span=self._span_obj)

    def close_epoch(self, loss: float | None = None) -> None:
        """Close the epoch's span (``loss``: its ``esper.loss``)."""
        span_stack, self._span = self._span, None
        if span_stack is not None:
            if loss is not None:
                self._span_obj.set_attribute("esper.loss", loss)
            span_stack.close()
        self._span_obj = None

    def resume_at(self, *, epoch: int, step: int) -> None:
        """Continue the run at ``epoch`` (the next to train) and global ``step``."""
        self.epoch, self.step, self.ended = epoch, step, False
        self.first_epoch = epoch

    # --- the record -------------------------------------------------------------------------------

    def incident(
        self,
        kind: IncidentKind,
        slot: SeedSlot | None,
        detail: str,
        blueprint: Blueprint | None = None,
    ) -> None:
        """Record a fault met and what was done about it (logged as a warning; an
        ``ended_eager`` seed, the normal end of a short run, at info level)."""
        bp = blueprint or (None if slot is None else slot.blueprint)
        incident = Incident(
            self.epoch,
            self.step,
            kind,
            None if slot is None else slot.slot_name,
            None if bp is None else bp.name,
            detail,
        )
        self.result.incidents.append(incident)
        level = log.info if kind is IncidentKind.ENDED_EAGER else log.warning
        level("incident", **incident.to_json())

    def transition(self, slot: SeedSlot, action: Callable[..., Any], *args: Any) -> Any:
        """Run a lifecycle action on ``slot`` and record the transitions it made.

        :returns: what ``action`` returned.
        """
        before = len(slot.lifecycle.history)
        out = action(*args)
        telemetry = self._telemetry()
        for source, target, reason in slot.lifecycle.history[before:]:
            event = GrowthEvent(
                self.epoch, self.step, slot.slot_name, source.value, target.value, reason
            )
            self.result.events.append(event)
            with telemetry.span(
                SPAN_LIFECYCLE,
                slot=event.slot,
                lifecycle__from=event.source,
                lifecycle__to=event.target,
                reason=reason,
                step=event.step,
                epoch=event.epoch,
                blueprint=None if slot.blueprint is None else slot.blueprint.name,
                kernel_id=slot.kernel_id,
            ):
                telemetry.metrics.seed_transition(source, target)
            log.info(
                "lifecycle",
                slot=event.slot,
                source=event.source,
                target=event.target,
                reason=reason,
                epoch=event.epoch,
                step=event.step,
            )
        return out

    def record_json(self) -> dict[str, Any]:
        """The record as JSON: reports, events and incidents."""
        return {
            "history": [report_to_json(r) for r in self.result.history],
            "events": [dataclasses.asdict(e) for e in self.result.events],
            "incidents": [i.to_json() for i in self.result.incidents],
        }

    def load_record(self, record: dict[str, Any], *, step: int) -> None:
        """Restore the record :meth:`record_json` returned (``step``: the run's steps so far).

        :raises KeyError, TypeError, ValueError: ``record`` is malformed.
        """
        self.result = FitResult(
            history=[report_from_json(r) for r in record["history"]],
            events=[GrowthEvent(**e) for e in record["events"]],
            incidents=[Incident.from_json(i) for i in record["incidents"]],
            steps=step,
        )
