"""Bounded evaluation: counterfactual and width-trial passes on a fraction of validation.

Every epoch measures the whole model on all of validation. Each blended seed's counterfactual
(the model with that seed ablated) and each width trial's (the model with the new units
ablated) costs one more forward over the batches it reads; with several seeds live, these
passes cost more than validation itself. :attr:`ControllerConfig.counterfactual_fraction`
bounds them: they read only the selected batches, spread evenly over validation (batch ``i``
is selected when ``ceil((i + 1) f) > ceil(i f)``: every batch at ``f = 1``, every fourth at
``f = 0.25``, the first one whatever ``f``, ``ceil(n f)`` of ``n``), and each compares with
the whole model measured on *those same* batches. At ``f = 1`` the figures are exactly those of
:func:`~esper_async.training._evaluate.evaluate`.

The cost lands in :attr:`EpochReport.eval_cost`: seconds of validation, counterfactual and
width-trial passes, and the batches each read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..control import Counterfactual
from ..seeds import SeedSlot, SeedState
from ._evaluate import Measured, _Mean
from ._task import Task

__all__ = ("EvalCost", "bounded_evaluate", "selected", "strided")


def selected(index: int, fraction: float) -> bool:
    """Whether validation batch ``index`` (0-based) takes the counterfactual passes."""
    return math.ceil((index + 1) * fraction) > math.ceil(index * fraction)


def strided(loader: Iterable[Any], fraction: float) -> Iterator[Any]:
    """The batches of ``loader`` that :func:`selected` picks, in order."""
    for index, batch in enumerate(loader):
        if selected(index, fraction):
            yield batch


@dataclass
class EvalCost:
    """What an epoch's measurements cost.

    :ivar validation_s: seconds of the whole model's validation pass.
    :ivar counterfactual_s: seconds of the seeds' ablated passes.
    :ivar width_trials_s: seconds of the width trials' ablated passes.
    :ivar batches: validation batches.
    :ivar counterfactual_batches: batches the counterfactual and width-trial passes read.
    :ivar fraction: the configured fraction.
    :ivar subset: the whole model's figures on the counterfactual batches.
    """

    validation_s: float = 0.0
    counterfactual_s: float = 0.0
    width_trials_s: float = 0.0
    batches: int = 0
    counterfactual_batches: int = 0
    fraction: float = 1.0
    subset: Measured = field(default_factory=lambda: Measured(math.nan, {}, {}, 0), repr=False)

    def figures(self) -> dict[str, float]:
        """The report's ``eval_cost`` mapping (``counterfactual_share``: the share of
        validation batches the ablated passes read)."""
        return {
            "validation_s": self.validation_s,
            "counterfactual_s": self.counterfactual_s,
            "width_trials_s": self.width_trials_s,
            "batches": float(self.batches),
            "counterfactual_batches": float(self.counterfactual_batches),
            "counterfactual_share": self.counterfactual_batches / max(1, self.batches),
            "fraction": self.fraction,
        }


@torch.no_grad()
def bounded_evaluate(
    model: nn.Module,
    slots: Mapping[str, SeedSlot],
    task: Task,
    loader: Iterable[Any],
    device: torch.device,
    fraction: float = 1.0,
) -> tuple[Measured, EvalCost]:
    """:func:`~esper_async.training._evaluate.evaluate` with the counterfactual passes on the
    batches :func:`selected` picks, and what each part cost.

    :param fraction: the share of validation batches the counterfactuals read, in ``(0, 1]``.
    :returns: the measurements (counterfactuals compare on the selected batches) and their
        cost, whose ``subset`` holds the whole model's figures on those batches (for the width
        trials, which must compare on the same ones).
    :raises SeedRuntimeError: a seed failed in a forward pass.
    """
    model.eval()
    blended = [
        n
        for n, s in slots.items()
        if s.seed is not None and s.state in (SeedState.BLENDING, SeedState.PROBATION)
    ]
    whole, part, without = _Mean(), _Mean(), {n: _Mean() for n in blended}
    cost = EvalCost(fraction=fraction)
    for slot in slots.values():
        slot.observe = True
    try:
        for index, batch in enumerate(loader):
            started = time.perf_counter()
            cost.batches += 1
            batch = task.to_device(batch, device)
            weight = task.batch_size(batch)
            outputs, loss = task.forward(model, batch)
            value, metrics = float(loss), task.metrics(outputs, batch)
            whole.add(value, metrics, weight)
            for slot in slots.values():
                slot.observe = False
            between = time.perf_counter()
            cost.validation_s += between - started
            if not selected(index, fraction):
                continue
            cost.counterfactual_batches += 1
            part.add(value, metrics, weight)
            for name in blended:
                with slots[name].ablated():
                    outputs, loss = task.forward(model, batch)
                without[name].add(float(loss), task.metrics(outputs, batch), weight)
            cost.counterfactual_s += time.perf_counter() - between
    finally:
        for slot in slots.values():
            slot.observe = False
    figures = whole.means()
    mean_loss = figures.pop("loss", math.nan)
    on_part = part.means()
    part_loss = on_part.pop("loss", math.nan)
    counterfactual = {}
    for name in blended:
        other = without[name].means()
        counterfactual[name] = Counterfactual(
            part_loss,
            other.get("loss", math.nan),
            on_part.get("accuracy", math.nan),
            other.get("accuracy", math.nan),
        )
    cost.subset = Measured(part_loss, on_part, {}, cost.counterfactual_batches)
    return Measured(mean_loss, figures, counterfactual, cost.batches), cost
