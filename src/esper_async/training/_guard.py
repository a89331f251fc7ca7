"""``StepGuard``: one training step that refuses to apply a bad update, and says why.

The trainer's step runs forward and computes the loss; the guard judges the loss *before* the
backward pass, so a bad loss never reaches the parameters. When it is bad, a diagnosis (no
gradients) looks for the seed behind it:

* a non-finite loss: the forward runs again with every slot checking its seed's output; a seed
  whose output is not finite while its input is finite raises
  :class:`~esper_async.SeedRuntimeError` (culled by the trainer, the step redone without it);
* a spike: the loss is measured again with each live seed ablated in turn; a seed whose removal
  brings the loss back under the threshold is named as the culprit.

Whatever no seed explains is a :class:`LossAnomaly` without a culprit (the trainer rolls back).
A seed that raises in its forward pass surfaces as ``SeedRuntimeError`` straight from the slot.

Under data parallelism a seed may fail on one rank's shard only. When the ``loss_fn`` is a
:class:`StepConsensus` (``esper_async.distributed.RankMeanLoss`` is one), the ranks agree instead:
a rank whose forward raised still takes part in the loss's collective, with a non-finite value,
so every rank judges the step non-finite and diagnoses it; the ranks then agree on one culprit
(or on none), and every rank raises the same error. The trainer's reaction (cull, or roll back)
is then the same everywhere and the ranks stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import LossAnomaly, SeedRuntimeError
from ..reliability import Governor, is_out_of_memory
from ..seeds import SeedSlot

#: How a seed failed, in the order the ranks' agreement prefers (the largest wins).
_NON_FINITE, _RAISED, _OOM = 0, 1, 2

__all__ = ("StepConsensus", "StepGuard")


@runtime_checkable
class StepConsensus(Protocol):
    """A ``loss_fn`` whose calls are collectives over ranks, and that lets the ranks agree on a
    failed step (see the module doc)."""

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def failed_forward(self) -> float:
        """Stand in for the call a failed forward pass could not make: take part in the same
        collective with a non-finite value, and return the (non-finite) agreed loss."""
        ...

    def agree_culprit(self, index: int) -> int:
        """The culprit every rank will name: ``index`` is this rank's finding (a non-negative
        code, -1 for none); the result — the largest code any rank found — is the same on every
        rank."""
        ...

    def agree_all(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (the same answer on every rank)."""
        ...


class StepGuard:
    """The checks around one training step (the step itself is the trainer's, see
    :meth:`esper_async.Trainer._step`): a seed failing in the forward pass, a bad loss judged
    before the backward pass, a backward pass that fails.

    :param forward: ``forward(batch) -> (outputs, loss)`` on the module steps call (the task's
        forward on the model, or on its DDP wrapper).
    :param optimizer: the model's optimizer (a failed backward clears its gradients).
    :param slots: the model's slots by name.
    :param governor: judges losses and keeps the recent good ones.
    :param consensus: the loss, when it is a collective over ranks (see the module doc).
    :param run_model: ``run_model(batch)``: the model alone, without the loss, for the diagnosis
        of a non-finite loss (under data parallelism the loss is a collective that a rank whose
        seed raised cannot join). Default: ``forward``.
    """

    def __init__(
        self, forward: Callable[[Any], tuple[Any, torch.Tensor]],
        optimizer: torch.optim.Optimizer, slots: Mapping[str, SeedSlot], governor: Governor,
        consensus: StepConsensus | None = None,
        run_model: Callable[[Any], Any] | None = None,
    ) -> None:
        self.forward = forward
        self.run_model = run_model or forward
        self.optimizer = optimizer
        self.slots = slots
        self.governor = governor
        self._consensus = consensus

    def forward_failed(self, exc: SeedRuntimeError) -> None:
        """A seed raised in the forward pass: raise ``exc``, unless the ranks must agree first
        (then take part in the loss's collective, and let :meth:`judge` diagnose).

        :raises SeedRuntimeError: ``exc``, without data parallelism.
        """
        if self._consensus is None:
            raise exc
        self._consensus.failed_forward()  # the other ranks are in the loss's collective

    def judge(self, loss: torch.Tensor | None, batch: Any) -> float:
        """The loss's value, if the governor accepts it (``None``: the forward failed here).

        :raises SeedRuntimeError: the diagnosis found a seed producing non-finite values.
        :raises LossAnomaly: the loss is bad (non-finite, or a spike), with or without a culprit.
        """
        value = math.nan if loss is None else float(loss.detach())
        verdict = self.governor.judge(value)
        if verdict is not None:
            error = self._diagnose(verdict, value, batch)
            # A spike no seed explains may be the loss's new level (new data): not a fault.
            if (isinstance(error, LossAnomaly) and error.culprit is None
                    and verdict == "spike" and self.governor.new_level(value)):
                return value
            raise error
        return value

    def backward(self, loss: torch.Tensor, value: float) -> None:
        """``loss.backward()``; a failure in it (other than OOM or a seed's) is a bad step.

        :raises LossAnomaly: the backward pass failed (gradients are cleared).
        """
        try:
            loss.backward()
        except SeedRuntimeError:
            raise
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise LossAnomaly("backward", value) from exc

    @torch.no_grad()
    def _diagnose(self, verdict: str, value: float, batch: Any) -> SeedRuntimeError | LossAnomaly:
        live = [s for s in self.slots.values() if s.seed is not None]
        if verdict == "non_finite":
            found: SeedRuntimeError | None = None
            with self._checking(live):
                try:
                    self.run_model(batch)
                except SeedRuntimeError as exc:
                    found = exc
            if self._consensus is not None:
                found = self._agree(self._consensus, found)
            return found if found is not None else LossAnomaly("non_finite", value)
        for slot in live:
            with slot.ablated():
                ablated = float(self.forward(batch)[1])
            if self.governor.judge(ablated) is None:
                return LossAnomaly("spike", value, culprit=slot.slot_name)
        return LossAnomaly("spike", value)

    def _agree(
        self, consensus: StepConsensus, found: SeedRuntimeError | None
    ) -> SeedRuntimeError | None:
        """The failure every rank names — the highest-ordered slot any rank found, and how it
        failed (out of memory over raised over non-finite, since the trainer's reaction depends
        on it) — or none."""
        names = sorted(self.slots)
        mine = -1 if found is None else 3 * names.index(found.slot) + _failure_kind(found)
        agreed = consensus.agree_culprit(mine)
        if agreed < 0:
            return None
        if agreed == mine:
            return found
        slot, kind = names[agreed // 3], agreed % 3
        error = SeedRuntimeError(
            f"the seed in slot {slot!r} failed on another rank's data", slot=slot
        )
        if kind == _OOM:
            error.__cause__ = torch.OutOfMemoryError("out of memory on another rank")
        elif kind == _RAISED:
            error.__cause__ = RuntimeError("raised on another rank")
        return error

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


def _failure_kind(exc: SeedRuntimeError) -> int:
    """How a seed failed, as the trainer tells it apart (see ``Trainer._seed_failed``)."""
    if is_out_of_memory(exc):
        return _OOM
    return _RAISED if exc.__cause__ is not None else _NON_FINITE
