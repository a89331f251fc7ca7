"""Transactions: stage operations on a live model, validate, then commit or roll back exactly.

::

    surgeon = ModelSurgeon()
    async with surgeon.transaction(model, optimizer, probe=batch) as tx:
        await tx.stage(Widen("fc1", 64))
        await tx.stage(InsertAfter("fc1", identity_linear(64)))
    # committed; tx.report says what validation found. A failed check raised SurgeryError and
    # rolled back.

Resource handling: a transaction holds the surgeon's lock for its whole life (one writer of the
model), takes a shallow snapshot of the optimizer and journals every structural change
(``_context``). Rollback — on an exception in the block, on a failed validation, or on cancellation
— is synchronous, so no checkpoint can interrupt it, and restores parameters, buffers, structure and
optimizer state bitwise.

Run transactions from the training task between steps (after ``optimizer.step()``, before the next
forward), never while a step is in flight. Heavy work (probe forwards, least-squares fits) runs in a
worker thread so the event loop stays responsive.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import anyio
import structlog
import torch
from torch import nn

from ..errors import SurgeryError
from ._context import OptimizerSnapshot, SurgeryContext, parameter_list
from ._host_common import refuse_sharded
from ._operations import SurgeryOperation
from ._validation import (
    RegionCheck,
    SurgeryReport,
    SurgeryValidationConfig,
    check_commit,
    check_region,
    footprint,
)

__all__ = ("ModelSurgeon", "SurgeryTransaction")

_log = structlog.get_logger(__name__)


class ModelSurgeon:
    """Changes a live model's architecture in validated, all-or-nothing transactions.

    :param validation: tolerances, gradient check and budget used at commit.
    """

    def __init__(self, *, validation: SurgeryValidationConfig | None = None) -> None:
        self.validation = validation or SurgeryValidationConfig()
        self._lock = anyio.Lock()

    def transaction(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        probe: Any,
        validation: SurgeryValidationConfig | None = None,
    ) -> SurgeryTransaction:
        """Open a transaction (use with ``async with``).

        :param model: the live model.
        :param optimizer: its optimizer; new parameters join it, removed ones leave it.
        :param probe: a small batch the model accepts (a tensor, a tuple of arguments or a mapping).
        :param validation: overrides the surgeon's validation settings for this transaction.
        """
        return SurgeryTransaction(
            self, model, optimizer, probe=probe, validation=validation or self.validation
        )

    async def apply(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        operation: SurgeryOperation,
        *,
        probe: Any,
    ) -> nn.Module:
        """Run one operation in its own transaction.

        :return: the model (a new object only when an fx operation rewired the root).
        :raises SurgeryError: the operation or its validation failed; nothing was changed.
        """
        async with self.transaction(model, optimizer, probe=probe) as tx:
            await tx.stage(operation)
        return tx.model


class SurgeryTransaction:
    """A set of staged operations that is committed or rolled back as one. Made by
    :meth:`ModelSurgeon.transaction`.

    Each :meth:`stage` applies an operation and validates it at once (shapes, a probe forward of the
    changed region, function preservation where promised, gradient reachability); leaving the block
    checks optimizer coverage and the budget, then commits.

    :ivar report: the commit validation's report (``None`` until the block is left without error).
    :ivar checks: the per-operation checks made so far.
    """

    def __init__(
        self,
        surgeon: ModelSurgeon,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        probe: Any,
        validation: SurgeryValidationConfig,
    ) -> None:
        self._surgeon = surgeon
        self._ctx = SurgeryContext(model, optimizer, probe)
        self._validation = validation
        self._snapshot: OptimizerSnapshot | None = None
        self._parameters_before = 0
        self._open = False
        self._started = 0.0
        self.report: SurgeryReport | None = None
        self.checks: list[RegionCheck] = []

    @property
    def model(self) -> nn.Module:
        """The model as it stands (a new object only after an fx operation on the root)."""
        return self._ctx.model

    @property
    def operations(self) -> list[str]:
        """Descriptions of the operations staged so far."""
        return [check.operation for check in self.checks]

    async def __aenter__(self) -> SurgeryTransaction:
        await self._surgeon._lock.acquire()
        try:
            self._started = time.perf_counter()
            if self._ctx.optimizer is not None:
                self._snapshot = OptimizerSnapshot(self._ctx.optimizer)
            self._parameters_before = footprint(self._ctx.model, None)[0]
        except BaseException:
            self._surgeon._lock.release()
            raise
        self._open = True
        return self

    async def stage(self, operation: SurgeryOperation) -> RegionCheck:
        """Apply ``operation`` to the live model and validate it; later operations see its result.

        :param operation: the operation.
        :return: what validation found (no problems: a failed check raises).
        :raises GrowthCouplingError: the model is sharded (FSDP, DTensor parameters); nothing
            was changed.
        :raises SurgeryError: the operation does not fit the model or failed validation; its changes
            are undone and the transaction stays usable (an uncaught error rolls it all back).
        """
        if not self._open:
            raise SurgeryError("the transaction is not open", operation=operation.describe())
        refuse_sharded(self._ctx.model, operation.describe())
        mark = self._ctx.mark()
        savepoint = (
            OptimizerSnapshot(self._ctx.optimizer) if self._ctx.optimizer is not None else None
        )
        try:
            check = await anyio.to_thread.run_sync(self._stage, operation)
            if check.problems:
                raise SurgeryError(
                    f"{operation.describe()} failed validation: " + "; ".join(check.problems),
                    operation=operation.describe(),
                )
        except BaseException as exc:
            self._ctx.undo_to(mark)
            if savepoint is not None:
                savepoint.restore()
            if isinstance(exc, SurgeryError):
                raise
            if isinstance(exc, Exception):
                raise SurgeryError(
                    f"{operation.describe()} failed: {type(exc).__name__}: {exc}",
                    operation=operation.describe(),
                ) from exc
            raise
        self.checks.append(check)
        return check

    def _stage(self, operation: SurgeryOperation) -> RegionCheck:
        ctx, description = self._ctx, operation.describe()
        mark = ctx.mark()
        before = parameter_list(ctx.model)
        operation.apply(ctx)
        ctx.sync_optimizer(before)
        region = ctx.region_since(mark)
        if region is None:
            return RegionCheck(description, "", (), None)
        with ctx.reverted(mark):
            old = ctx.resolve(region, operation=description)
            call = ctx.capture([old], operation=description)[id(old)]
        return check_region(
            ctx.model,
            region,
            call,
            operation=description,
            preserves_function=operation.preserves_function,
            config=self._validation,
        )

    async def rollback(self) -> None:
        """Undo every staged operation now; leaving the block then changes nothing."""
        if self._open:
            self._rollback("explicit rollback")

    def _rollback(self, reason: str) -> None:
        self._ctx.undo_to(0)
        if self._snapshot is not None:
            self._snapshot.restore()
        self._open = False
        self._surgeon._lock.release()
        _log.info(
            "surgery.rollback",
            operations=self.operations,
            reason=reason,
            ms=round((time.perf_counter() - self._started) * 1e3, 3),
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._open:
            return
        if exc is not None:
            self._rollback(f"{type(exc).__name__} in the transaction block")
            return
        report = check_commit(
            self._ctx.model,
            self._ctx.optimizer,
            checks=tuple(self.checks),
            parameters_before=self._parameters_before,
            config=self._validation,
        )
        self.report = report
        if not report.ok:
            self._rollback("validation failed")
            raise SurgeryError(
                "surgery rolled back, validation failed: " + "; ".join(report.problems),
                operation="; ".join(self.operations),
            )
        self._open = False
        self._surgeon._lock.release()
        _log.info(
            "surgery.commit",
            operations=self.operations,
            parameters_before=report.parameters_before,
            parameters_after=report.parameters_after,
            max_abs_diff=report.max_abs_diff,
            ms=round((time.perf_counter() - self._started) * 1e3, 3),
        )
