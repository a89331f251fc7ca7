"""``GrowerSurgery``: the grower's architecture changes at epoch boundaries.

It owns the surgery policy's proposals, the surgeon that applies them in one transaction, the
record of every surgery committed (checkpoints carry it for replay) and the width trials (new
units of a widening, on trial). Under data parallelism every rank checks that all reached the
same outcome. It acts on the run through the :class:`~esper_async.training.Grower`'s public
calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from torch import nn

from ..control import GrowWidth, WidthController
from ..errors import EsperError, SurgeryError
from ..surgery import (
    CoupledWidthError,
    ModelSurgeon,
    SurgeryPolicy,
    WidenSlot,
    operation_record,
)
from ..telemetry import SPAN_ROLLBACK, SPAN_SURGERY
from ._task import task_inputs
from ._widths import WidthTrial, example_flops, grow_width_operation

if TYPE_CHECKING:
    from ._grower import Grower

__all__ = ("GrowerSurgery",)

log = structlog.get_logger(__name__)

#: Validation examples a surgery's probe batch takes.
_SURGERY_PROBE = 64


class GrowerSurgery:
    """Surgery and width growth, and their records.

    :param grower: the grower it acts on.
    :param policy: the surgery policy (``None``: only width growth the controller decides).
    """

    def __init__(self, grower: Grower, policy: SurgeryPolicy | None) -> None:
        self.grower = grower
        self.policy = policy
        self.surgeon = ModelSurgeon()
        #: Every surgery committed on the model, as records (checkpoints carry them for replay).
        self.records: list[dict[str, Any]] = []
        #: Widenings on trial (width growth), by slot: how to ablate their new units.
        self.width_trials: dict[str, WidthTrial] = {}

    def _probe_batch(self, val_loader: Iterable[Any]) -> tuple[Any, Any] | None:
        """The first validation batch on the device and its inputs' probe, or ``None``."""
        g = self.grower
        batch = next(iter(val_loader), None)
        inputs = task_inputs(g.task)
        if batch is None or inputs is None:  # nothing to validate on
            return None
        batch = g.task.to_device(batch, g.device)
        return batch, inputs(batch)[:_SURGERY_PROBE]

    async def operate(self, val_loader: Iterable[Any]) -> None:
        """Apply the surgery policy's proposal, if any, in one transaction; a refused proposal
        changes nothing."""
        g = self.grower
        assert self.policy is not None
        operation = self.policy.propose(g.model)
        if operation is None:
            return
        probed = self._probe_batch(val_loader)
        if probed is None:  # ask again next boundary
            return
        probe = probed[1]
        before = g.param_count()
        with g.telemetry.span(
            SPAN_SURGERY,
            surgery__op=operation.describe(),
            slot=operation.target,
            epoch=g.epoch,
            step=g.step,
        ) as span:
            refusal: SurgeryError | None = None
            try:
                await self.surgeon.apply(g.model, g.optimizer, operation, probe=probe)
            except SurgeryError as exc:
                refusal = exc
            self.agree(operation, committed=refusal is None)
            if refusal is not None:
                self.policy.rejected(operation)
                span.set_attribute("esper.outcome", "rejected")
                with g.telemetry.span(
                    SPAN_ROLLBACK,
                    surgery__op=operation.describe(),
                    error__type=type(refusal).__name__,
                ):
                    pass
                log.warning(
                    "surgery rejected",
                    operation=operation.describe(),
                    error=str(refusal),
                    epoch=g.epoch,
                    step=g.step,
                )
                return
            self.policy.committed(operation)
            self.records.append(operation_record(operation))
            g.rewrap()
            added = g.param_count() - before
            span.set_attribute("esper.outcome", "committed")
            span.set_attribute("esper.params.added", added)
            g.telemetry.metrics.params_added(added, slot=operation.target)
            log.info(
                "surgery",
                operation=operation.describe(),
                params_before=before,
                params_after=before + added,
                epoch=g.epoch,
                step=g.step,
            )
        await g.snapshot(replace=True)  # the last one has the old shapes

    async def grow_width(self, decision: GrowWidth, val_loader: Iterable[Any]) -> None:
        """Widen ``decision.slot``'s host in one transaction (GradMax reads the first validation
        batch), put the new units on trial and tell the controller what it added."""
        g = self.grower
        told = g.controller if isinstance(g.controller, WidthController) else None
        probed = self._probe_batch(val_loader)
        if probed is None:
            if told is not None:
                told.widened(decision.slot, committed=False)
            return
        batch, probe = probed
        path = self.module_path(g.slots[decision.slot])
        before, flops_before = g.param_count(), example_flops(g.model, probe)
        with g.telemetry.span(
            SPAN_SURGERY,
            surgery__op=f"widen slot {path!r} to {decision.width}",
            slot=path,
            epoch=g.epoch,
            step=g.step,
        ) as span:
            try:
                operation, trial = await anyio.to_thread.run_sync(
                    grow_width_operation,
                    g.model,
                    g.task,
                    batch,
                    path,
                    decision.width,
                    decision.init,
                    g.step,
                )
                await self.surgeon.apply(g.model, g.optimizer, operation, probe=probe)
            except CoupledWidthError:
                raise  # the slot can never be widened alone: say so rather than retry in silence
            except SurgeryError as exc:
                self.agree(WidenSlot(path, decision.width, init=decision.init), committed=False)
                span.set_attribute("esper.outcome", "rejected")
                log.warning("width growth rejected", slot=path, error=str(exc), epoch=g.epoch)
                if told is not None:
                    told.widened(decision.slot, committed=False)
                return
            self.agree(operation, committed=True)
            self.records.append(operation_record(operation))
            self.width_trials[decision.slot] = trial
            g.rewrap()
            added = g.param_count() - before
            flops = example_flops(g.model, probe) - flops_before
            span.set_attribute("esper.outcome", "committed")
            span.set_attribute("esper.params.added", added)
            g.telemetry.metrics.params_added(added, slot=path)
            log.info(
                "width growth",
                operation=operation.describe(),
                params_added=added,
                flops_added=flops,
                epoch=g.epoch,
                step=g.step,
            )
        if told is not None:
            told.widened(decision.slot, committed=True, params_added=added, flops_added=flops)
        await g.snapshot(replace=True)

    def module_path(self, module: nn.Module) -> str:
        """``module``'s dotted name in the grower's model.

        :raises ValueError: it is not part of the model.
        """
        for name, candidate in self.grower.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"{type(module).__name__} is not part of the grower's model")

    def agree(self, operation: Any, *, committed: bool) -> None:
        """Under data parallelism, check that every rank reached the same outcome.

        :raises EsperError: some rank committed the operation and another refused it.
        """
        consensus = self.grower.consensus
        if consensus is None:
            return
        everywhere = consensus.agree_all(committed)
        nowhere = consensus.agree_all(not committed)
        if not (everywhere or nowhere):
            raise EsperError(
                f"surgery {operation.describe()} was committed on some ranks and refused on "
                "others: the ranks' models differ; resume from the last checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        """The committed surgeries and the width trials (JSON-ready)."""
        return {
            "surgery": list(self.records),
            "width_trials": {k: t.to_json() for k, t in self.width_trials.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the width trials :meth:`state_dict` returned (the surgeries are replayed by
        :meth:`Grower.load_state_dict` before tensors load)."""
        self.records = list(state.get("surgery", []))
        self.width_trials = {
            str(k): WidthTrial.from_json(v) for k, v in state.get("width_trials", {}).items()
        }
