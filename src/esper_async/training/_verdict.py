"""Lagged loss verdicts: a step's loss judged on the device, read by the host steps later.

A synchronous verdict reads the loss on the host before the backward pass: on a GPU the host
then waits for the forward pass to finish before it can launch anything more, every step.
:class:`LaggedVerdicts` judges the loss on the device instead (finite, and at most the
governor's spike threshold, a host float known when the step is launched) into a 0-dim bool
tensor, and the update is masked with it (:class:`~esper_async.training._masked.MaskedStep`).

A **halt** flag, also on the device, turns the first bad verdict into a barrier: every step
launched after a bad one applies nothing (``apply = ok & ~halt``), until the host has read the
bad verdict and dealt with it. So when the host learns of a bad step, the parameters and the
optimizer are exactly as they were before it, whatever was launched since; the steps in flight
behind it are run again afterwards.

Each step writes ``(loss, ok)`` to one row of a small host ring (pinned on a GPU, copied without
blocking); the host reads a row once the step's completion has been awaited, so the read never
waits on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..runtime import Completion
from ._masked import HostUndo

__all__ = ("LaggedVerdicts", "Launched")


@dataclass
class Launched:
    """A step launched with a lagged verdict, not yet read.

    :ivar batch: its batch (run again if a step before it turns out bad).
    :ivar index: its launch number (its row in the ring).
    :ivar undo: host-resident optimizer state to restore if its verdict is bad.
    :ivar done: the completion of its device work (``None`` on a CPU).
    """

    batch: Any
    index: int
    undo: HostUndo
    done: Completion | None


class LaggedVerdicts:
    """The device-side verdicts of one trainer's steps and the host ring they are read from.

    :param device: the training device.
    :param lag: the most steps launched before the oldest unread verdict is read.
    """

    def __init__(self, device: torch.device, lag: int) -> None:
        self.device = device
        self.lag = lag
        self.halt = torch.zeros((), dtype=torch.bool, device=device)
        rows = lag + 2  # the unread ones, the one being written, and one spare
        self.ring = torch.full(
            (rows, 2), math.nan, pin_memory=device.type == "cuda" and torch.cuda.is_available()
        )
        self.launches = 0
        #: Rows read from the ring (one per launched step), for tests.
        self.reads = 0

    def judge(self, loss: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The verdict on ``loss`` (no host read), and whether its step may update the model.

        :param loss: the step's scalar loss.
        :param threshold: the governor's spike threshold now (``inf`` during warm-up).
        :returns: ``(ok, apply)``: 0-dim bool tensors; ``apply`` is false behind a bad step.
        """
        value = loss.detach().float()
        ok = torch.isfinite(value) & (value <= threshold)
        apply = ok & ~self.halt
        torch.logical_or(self.halt, ~ok, out=self.halt)
        return ok, apply

    def record(self, loss: torch.Tensor, ok: torch.Tensor) -> int:
        """Queue the copy of ``(loss, ok)`` to the ring. :returns: the step's launch number."""
        index = self.launches
        self.launches += 1
        row = torch.stack((loss.detach().float(), ok.float()))
        self.ring[index % len(self.ring)].copy_(row, non_blocking=True)
        return index

    async def read(self, launched: Launched) -> tuple[float, bool]:
        """``(loss, ok)`` of ``launched``, once its work is done (awaited, never blocking)."""
        if launched.done is not None:
            await launched.done.wait()
        value, ok = self.ring[launched.index % len(self.ring)].tolist()
        self.reads += 1
        return value, ok > 0.5

    def clear(self) -> None:
        """Lift the halt (the host has dealt with the bad step; nothing is in flight)."""
        self.halt.zero_()
