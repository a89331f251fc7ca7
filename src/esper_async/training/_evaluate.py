"""Validation with counterfactuals: the whole model's figures, and each blended seed's
contribution measured on the same batches with that seed's α set to 0."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..control import Counterfactual
from ..seeds import SeedSlot, SeedState
from ._task import Task

__all__ = ("Measured", "evaluate")


@dataclass(frozen=True)
class Measured:
    """What one validation pass measured.

    :ivar loss: the whole model's mean loss.
    :ivar metrics: the task's figures (means).
    :ivar counterfactual: per blended seed, the loss and accuracy with and without it.
    :ivar batches: validation batches seen (0: the loader yielded none).
    """

    loss: float
    metrics: dict[str, float]
    counterfactual: dict[str, Counterfactual]
    batches: int


class _Mean:
    """Weighted means of a loss and named figures."""

    def __init__(self) -> None:
        self.weight = 0
        self.sums: dict[str, float] = {}

    def add(self, loss: float, metrics: Mapping[str, float], weight: int) -> None:
        self.weight += weight
        for name, value in {"loss": loss, **metrics}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * weight

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.weight) for k, v in self.sums.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, slots: Mapping[str, SeedSlot], task: Task, loader: Iterable[Any],
    device: torch.device,
) -> Measured:
    """Measure ``model`` on ``loader`` (in eval mode), and each blended seed's contribution.

    Slots observe their activations (health signals) during the first batch's first forward.

    :param model: the model.
    :param slots: its slots by name.
    :param task: how batches are read and losses computed.
    :param loader: the validation batches.
    :param device: where batches go.
    :returns: the figures; ``batches == 0`` when the loader yielded nothing.
    :raises SeedRuntimeError: a seed failed in a forward pass.
    """
    model.eval()
    blended = [
        n for n, s in slots.items()
        if s.seed is not None and s.state in (SeedState.BLENDING, SeedState.PROBATION)
    ]
    whole, without = _Mean(), {n: _Mean() for n in blended}
    batches = 0
    for slot in slots.values():
        slot.observe = True
    try:
        for batch in loader:
            batches += 1
            batch = task.to_device(batch, device)
            weight = task.batch_size(batch)
            outputs, loss = task.forward(model, batch)
            whole.add(float(loss), task.metrics(outputs, batch), weight)
            for slot in slots.values():
                slot.observe = False
            for name in blended:
                with slots[name].ablated():
                    outputs, loss = task.forward(model, batch)
                without[name].add(float(loss), task.metrics(outputs, batch), weight)
    finally:
        for slot in slots.values():
            slot.observe = False
    figures = whole.means()
    mean_loss = figures.pop("loss", math.nan)
    counterfactual = {}
    for name in blended:
        other = without[name].means()
        counterfactual[name] = Counterfactual(
            mean_loss, other.get("loss", math.nan), figures.get("accuracy", math.nan),
            other.get("accuracy", math.nan),
        )
    return Measured(mean_loss, figures, counterfactual, batches)
