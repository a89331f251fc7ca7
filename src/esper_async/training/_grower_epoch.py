"""The epoch's end of a :class:`~esper_async.training.Grower` (a mixin): measure, graft what is
due, decide and apply, close the epoch. :meth:`GrowerEpoch.end_epoch` runs them in order; a loop
may call them one by one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..control import Decision, EpochReport, GrowWidth
from ..errors import LoaderError
from ._measure import measure_epoch

if TYPE_CHECKING:
    from ._grower import Grower

__all__ = ("GrowerEpoch",)


class GrowerEpoch:
    """The epoch's end of :class:`~esper_async.training.Grower` (a mixin; its methods take the
    grower as ``self``, hence the ``misc`` ignores: mypy cannot see a mixin's host class)."""

    async def end_epoch(self: Grower, val_loader: Iterable[Any]) -> EpochReport:  # type: ignore[misc]
        """Close the epoch: :meth:`measure` on ``val_loader`` (with counterfactuals for blended
        seeds), :meth:`graft_due`, :meth:`decide` and apply (and surgery), step the scheduler,
        :meth:`snapshot` when due. The model is left in the mode (train or eval) it was in.

        :param val_loader: validation batches, as the task reads them (at least one).
        :returns: the epoch's report (also appended to :attr:`result`'s history).
        :raises LoaderError: ``val_loader`` yielded no batches, or no step was reported with
            :meth:`after_step` this epoch.
        :raises GovernorError: every step was dropped for too many epochs in a row.
        """
        if self.run.epoch_steps == 0:
            raise LoaderError(
                f"epoch {self.epoch} ended with no step reported: call grower.after_step() after "
                "every optimizer step",
                loader="training",
            )
        self.begin_epoch()
        training = self.model.training
        report = await self.measure(val_loader)
        try:
            await self.graft_due()
            await self.decide(report, val_loader)
        finally:
            self._close_span(report)
        self.close_epoch(report)
        if self.governor.due(self.epoch):
            await self.snapshot()
        self.model.train(training)  # as the loop left it (measure switched to eval)
        return report

    def close_epoch(self: Grower, report: EpochReport) -> None:  # type: ignore[misc]
        """End the epoch with ``report`` (:meth:`measure`'s): record it in the history and on
        the epoch's span, step the scheduler; the next :meth:`begin_epoch` opens the next
        epoch. :meth:`end_epoch` calls it; a loop calling the steps one by one calls it after
        :meth:`decide` (and :meth:`snapshot` after it, when due).

        :raises GovernorError: every step was dropped for too many epochs in a row.
        """
        self._close_span(report)
        self.result.history.append(report)
        self.run.ended = True
        self.faults.stop_if_stalled()
        if self.scheduler is not None:
            self.scheduler.step()

    def _close_span(self: Grower, report: EpochReport) -> None:  # type: ignore[misc]
        if self.run.epoch_open:
            self.run.epoch_figures(report, self.param_count())
            self.run.close_epoch(loss=report.val_loss)

    async def measure(self: Grower, val_loader: Iterable[Any]) -> EpochReport:  # type: ignore[misc]
        """Measure the epoch on ``val_loader`` (with counterfactuals for blended seeds and width
        trials) and close its training figures: the epoch's report (not yet in the history). A
        seed that fails in the measurements is culled and they are redone. The model is left in
        eval mode (:meth:`end_epoch` restores the mode it found).

        :raises LoaderError: ``val_loader`` yielded no batches.
        """
        return await measure_epoch(self, val_loader)

    async def decide(  # type: ignore[misc]
        self: Grower, report: EpochReport, val_loader: Iterable[Any]
    ) -> list[Decision]:
        """Ask the controller on ``report`` (if growing and the epoch was sound on every rank)
        and apply its decisions; then the surgery policy's proposal, if any.

        :param report: the epoch's report (:meth:`measure`).
        :param val_loader: validation batches (surgery and width growth probe the first one).
        :returns: the decisions applied.
        """
        sound = self.faults.judge_epoch(report)
        decisions: list[Decision] = []
        if self.grow and self._agreed(sound):
            decisions = list(self.controller.decide(report, self.result.history, self.slots))
            for decision in decisions:
                if isinstance(decision, GrowWidth):
                    await self.surgeon.grow_width(decision, val_loader)
                else:
                    self.apply(decision)
        if self.surgeon.policy is not None:
            await self.surgeon.operate(val_loader)
        return decisions

    def _agreed(self: Grower, sound: bool) -> bool:  # type: ignore[misc]
        """``sound`` on every rank under data parallelism, so every rank asks its controller or
        none does (``decide`` may be a collective)."""
        return self.consensus.agree_all(sound) if self.consensus is not None else sound
