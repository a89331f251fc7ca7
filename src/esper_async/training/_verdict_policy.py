"""The two verdict policies of a training step: judged on the host before the update, or on the
device and read later. :meth:`esper_async.Trainer._step` is one step for both: zero the
gradients, forward, ``judge``, backward, ``update``; the trainer builds its policies once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..reliability import Governor
from ._guard import StepGuard
from ._masked import HostUndo, MaskedStep
from ._verdict import LaggedVerdicts

__all__ = ("DeviceVerdict", "HostVerdict")


class HostVerdict:
    """The loss is read on the host and judged before the backward pass (a bad step never
    reaches the parameters); ``update`` steps the optimizer and returns the loss.

    :param guard: the step's checks (the judgement and its diagnosis).
    :param optimizer: the model's optimizer.
    :param governor: records every good loss.
    :param autocast: the step's autocast context (the diagnosis runs the forward as the step did).
    """

    def __init__(
        self,
        guard: StepGuard,
        optimizer: torch.optim.Optimizer,
        governor: Governor,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.guard, self.optimizer, self.governor, self.autocast = (
            guard,
            optimizer,
            governor,
            autocast,
        )

    def judge(self, loss: torch.Tensor | None, batch: Any) -> tuple[float, Any]:
        """:returns: the loss's value and no verdict (a bad loss raised)."""
        with self.autocast():
            return self.guard.judge(loss, batch), None

    def update(self, loss: torch.Tensor, value: float, verdict: Any) -> float:
        """Step the optimizer; :returns: the loss."""
        self.optimizer.step()
        self.governor.accept(value)
        return value


class DeviceVerdict:
    """The loss is judged on the device (no host read) and the update masked by the verdict;
    ``update`` returns the host-resident state to restore if the verdict, read later, is bad.

    :param verdicts: the run's lagged verdicts.
    :param masked: the masked optimizer step.
    :param governor: its spike threshold as of the verdicts read so far.
    """

    def __init__(self, verdicts: LaggedVerdicts, masked: MaskedStep, governor: Governor) -> None:
        self.verdicts, self.masked, self.governor = verdicts, masked, governor

    def judge(self, loss: torch.Tensor | None, batch: Any) -> tuple[float, Any]:
        """:returns: NaN (nothing is read) and the device verdict ``(ok, apply)``."""
        assert loss is not None
        return float("nan"), self.verdicts.judge(loss, self.governor.threshold())

    def update(self, loss: torch.Tensor, value: float, verdict: Any) -> HostUndo:
        """The masked step; :returns: what to restore if the verdict is bad."""
        ok, apply = verdict
        undo = self.masked.step(apply)
        self.verdicts.record(loss, ok)
        return undo
