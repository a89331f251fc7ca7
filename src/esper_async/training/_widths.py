"""Width growth in the grower: build a slot's widening (with GradMax's signal from a real batch),
and measure a widening's contribution by ablating its new units.

A widening on trial is recorded as the consumer columns its new units write to. Its
counterfactual is the model without them: for the zero fan-out inits their columns are zeroed
(they are zero at birth, so this is the model as it would be had they not been added, with
everything else as trained); for the split inits each new column is folded back onto the column
it was split from (a copy and its source read the same unit at birth). The weights are restored
exactly afterwards (copied back).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..control import Counterfactual
from ..surgery import ZERO_FANOUT, WidenSlot, capture_width_signal, find_slot_consumers, unit_shares
from ._evaluate import Measured, evaluate
from ._task import Task

__all__ = ("WidthTrial", "example_flops", "grow_width_operation", "measure_widths")


@dataclass(frozen=True)
class WidthTrial:
    """The new units of one widening, as the consumer columns they write to.

    :ivar columns: per consumer: its dotted path (a Linear or Conv2d whose ``weight`` reads the
        units along dim 1), the new columns, and for a split init the column each was split from
        (``None`` for a zero fan-out init).
    """

    columns: tuple[tuple[str, tuple[int, ...], tuple[int, ...] | None], ...]

    def to_json(self) -> list[Any]:
        """JSON-ready form (for checkpoints)."""
        return [[p, list(c), None if s is None else list(s)] for p, c, s in self.columns]

    @classmethod
    def from_json(cls, data: list[Any]) -> WidthTrial:
        """The inverse of :meth:`to_json`."""
        return cls(tuple(
            (str(p), tuple(int(i) for i in c), None if s is None else tuple(int(i) for i in s))
            for p, c, s in data
        ))


def grow_width_operation(
    model: nn.Module, task: Task, batch: Any, path: str, width: int, init: str, seed: int
) -> tuple[WidenSlot, WidthTrial]:
    """The :class:`WidenSlot` that widens the slot at ``path`` to ``width`` (its GradMax signal
    taken from ``batch``), and the trial record of its new units.

    :raises SurgeryError: the slot's consumers cannot be found, or the batch does not reach them.
    """
    slot = model.get_submodule(path)
    host = slot.host
    assert isinstance(host, (nn.Linear, nn.Conv2d))
    old = host.out_features if isinstance(host, nn.Linear) else host.out_channels
    operation = f"widen slot {path!r} to {width}"
    _, consumers = find_slot_consumers(
        model, path, old, operation=operation, unit_major=isinstance(host, nn.Conv2d)
    )
    signal = None
    if init == "gradmax":
        training = model.training
        model.eval()
        try:
            signal = capture_width_signal(model, path, lambda: task.forward(model, batch)[1])
        finally:
            model.train(training)
    mapping = unit_shares(old, width, seed, init, torch.device("cpu"))[0].tolist()
    columns = []
    for consumer in consumers:
        block = consumer.block
        new = tuple(k * block + b for k in range(old, width) for b in range(block))
        sources = None if init in ZERO_FANOUT else tuple(
            mapping[k] * block + b for k in range(old, width) for b in range(block)
        )
        columns.append((consumer.path, new, sources))
    return WidenSlot(path, width, seed=seed, init=init, signal=signal), WidthTrial(tuple(columns))


def measure_widths(
    model: nn.Module, task: Task, loader: Iterable[Any], device: torch.device,
    trials: Mapping[str, WidthTrial], measured: Measured,
) -> dict[str, Counterfactual]:
    """Each trial's counterfactual: ``measured`` (the whole model) against a validation pass with
    that widening's new units ablated. The weights are restored exactly."""
    out = {}
    for name, trial in trials.items():
        weights: list[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...] | None]] = []
        for path, new, sources in trial.columns:
            weight = model.get_submodule(path).weight
            assert isinstance(weight, torch.Tensor)
            weights.append((weight, new, sources))
        saved = [w.detach().clone() for w, _, _ in weights]
        try:
            with torch.no_grad():
                for weight, new, sources in weights:
                    index = torch.tensor(new, device=weight.device)
                    if sources is not None:
                        source = torch.tensor(sources, device=weight.device)
                        weight.index_add_(1, source, weight.index_select(1, index))
                    weight.index_fill_(1, index, 0.0)
            without = evaluate(model, {}, task, loader, device)
        finally:
            with torch.no_grad():
                for (weight, _, _), copy in zip(weights, saved, strict=True):
                    weight.copy_(copy)
        out[name] = Counterfactual(
            measured.loss, without.loss, measured.metrics.get("accuracy", math.nan),
            without.metrics.get("accuracy", math.nan),
        )
    return out


def example_flops(model: nn.Module, probe: Any) -> int:
    """Forward FLOPs of ``model`` on the first example of ``probe`` (a tensor batch)."""
    training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(probe[:1])
        return int(counter.get_total_flops())
    finally:
        model.train(training)
