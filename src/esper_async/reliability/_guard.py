"""``StepGuard``: one training step that refuses to apply a bad update, and says why.

The step runs forward and computes the loss; the governor judges the loss *before* the backward
pass, so a bad loss never reaches the parameters. When it is bad, a diagnosis (no gradients)
looks for the seed behind it:

* a non-finite loss: the forward runs again with every slot checking its seed's output; a seed
  whose output is not finite while its input is finite raises
  :class:`~esper_async.SeedRuntimeError` (culled by the trainer, the step redone without it);
* a spike: the loss is measured again with each live seed ablated in turn; a seed whose removal
  brings the loss back under the threshold is named as the culprit.

Whatever no seed explains is a :class:`LossAnomaly` without a culprit (the trainer rolls back).
A seed that raises in its forward pass surfaces as ``SeedRuntimeError`` straight from the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from .._exceptions import SeedRuntimeError
from ..seeds import SeedSlot
from ._errors import LossAnomaly, is_out_of_memory
from ._governor import Governor

__all__ = ("StepGuard",)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepGuard:
    """Guarded training steps over one model.

    :param forward: calls the model (or the wrapper training steps use, e.g. DDP).
    :param optimizer: its optimizer.
    :param loss_fn: ``loss_fn(logits, targets)``.
    :param slots: the model's slots by name.
    :param governor: judges losses and keeps the recent good ones.
    """

    def __init__(
        self, forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
        loss_fn: LossFn, slots: Mapping[str, SeedSlot], governor: Governor,
    ) -> None:
        self.forward = forward
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.slots = slots
        self.governor = governor

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on ``(x, y)``; returns the loss.

        :raises SeedRuntimeError: a seed raised or produced non-finite values (nothing updated).
        :raises LossAnomaly: the loss was bad for a reason the diagnosis did or did not pin on a
            seed (nothing updated).
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.forward(x), y)
        value = float(loss.detach())
        verdict = self.governor.judge(value)
        if verdict is not None:
            raise self._diagnose(verdict, value, x, y)
        try:
            loss.backward()
        except SeedRuntimeError:
            raise
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise LossAnomaly("backward", value) from exc
        self.optimizer.step()
        self.governor.accept(value)
        return value

    @torch.no_grad()
    def _diagnose(
        self, verdict: str, value: float, x: torch.Tensor, y: torch.Tensor
    ) -> SeedRuntimeError | LossAnomaly:
        live = [s for s in self.slots.values() if s.seed is not None]
        if verdict == "non_finite":
            with self._checking(live):
                try:
                    self.forward(x)
                except SeedRuntimeError as exc:
                    return exc
            return LossAnomaly("non_finite", value)
        for slot in live:
            with slot.ablated():
                ablated = float(self.loss_fn(self.forward(x), y))
            if self.governor.judge(ablated) is None:
                return LossAnomaly("spike", value, culprit=slot.slot_name)
        return LossAnomaly("spike", value)

    @staticmethod
    @contextmanager
    def _checking(slots: list[SeedSlot]) -> Iterator[None]:
        for slot in slots:
            slot.check_finite = True
        try:
            yield
        finally:
            for slot in slots:
                slot.check_finite = False
