"""The epoch's measurements: validation with counterfactuals (:func:`bounded_evaluate`: the
counterfactual passes read ``ControllerConfig.counterfactual_fraction`` of the batches), the width
trials' counterfactuals (on the same batches), what they cost, and the training figures the epoch
counted, as one :class:`~esper_async.control.EpochReport` (what
:meth:`esper_async.training.Grower.measure` returns)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio

from ..control import Counterfactual, EpochReport
from ..errors import SeedRuntimeError
from ._bounded_eval import bounded_evaluate, strided
from ._loaders import no_batches
from ._widths import measure_widths

if TYPE_CHECKING:
    from ._grower import Grower

__all__ = ("measure_epoch",)


async def measure_epoch(g: Grower, val_loader: Iterable[Any]) -> EpochReport:
    """See :meth:`Grower.measure`; a seed that fails in the measurements is culled (through
    :meth:`Grower.seed_failed`) and they are redone.

    :raises LoaderError: ``val_loader`` yielded no batches.
    """
    train_loss, steps, dropped = g.run.epoch_losses()
    config = getattr(g.controller, "config", None)  # bounded evaluation, where configured
    fraction = getattr(config, "counterfactual_fraction", 1.0)
    for attempt in range(len(g.slots) + 1):
        try:
            measured, cost = await anyio.to_thread.run_sync(
                bounded_evaluate, g.model, g.slots, g.task, val_loader, g.device, fraction
            )
            break
        except SeedRuntimeError as exc:
            if attempt == len(g.slots) or not g.slots[exc.slot].lifecycle.live:
                raise
            g.seed_failed(exc)
    if measured.batches == 0:
        raise no_batches("validation", later=g.epoch > g.run.first_epoch, epoch=g.epoch)
    widths: dict[str, Counterfactual] = {}
    if g.width_trials:
        started = time.perf_counter()  # the trials read the counterfactuals' batches
        widths = await anyio.to_thread.run_sync(
            measure_widths,
            g.model,
            g.task,
            strided(val_loader, fraction),
            g.device,
            g.width_trials,
            cost.subset,
        )
        cost.width_trials_s = time.perf_counter() - started
    for slot in g.slots.values():
        slot.lifecycle.epochs_in_state += 1
    g.run.reset_epoch()
    return EpochReport(
        epoch=g.epoch,
        train_loss=train_loss,
        val_loss=measured.loss,
        val_acc=measured.metrics.get("accuracy", math.nan),
        health={name: slot.health() for name, slot in g.slots.items()},
        counterfactual=measured.counterfactual,
        steps=steps,
        dropped=dropped,
        metrics=measured.metrics,
        width_counterfactual=widths,
        eval_cost=cost.figures(),
    )
