"""Blueprint families that fail in specific ways, for the compiler's failure-path tests.

Workers import this module (``BlueprintCompiler(imports=["faulty_families"])``) so the families
exist on both sides of the process boundary.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn

from esper_async.blueprints import Family, Option, SlotKind, register_family
from esper_async.errors import BlueprintError


def _raises(contract, message: str = "boom") -> nn.Module:
    raise RuntimeError(message)


def _kills_worker(contract) -> nn.Module:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def _sleeps(contract, seconds: int) -> nn.Module:
    time.sleep(seconds)
    return nn.Linear(contract.channels, contract.channels)


class _Noisy(nn.Module):
    """Adds fresh noise on every call: not deterministic, and not what its reference computes."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, f)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h) + torch.rand_like(h)


class _Reshaping(nn.Module):
    """Breaks the shape contract: returns half the features."""

    def __init__(self, f: int) -> None:
        super().__init__()
        self.fc = nn.Linear(f, max(1, f // 2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)


for family in (
    Family("test_raises", SlotKind.LINEAR, {}, _raises),
    Family("test_kills_worker", SlotKind.LINEAR, {}, _kills_worker),
    Family("test_sleeps", SlotKind.LINEAR, {"seconds": Option(int, 30, 0, 600)}, _sleeps),
    Family("test_noisy", SlotKind.LINEAR, {}, lambda c: _Noisy(c.channels)),
    Family("test_reshaping", SlotKind.LINEAR, {}, lambda c: _Reshaping(c.channels)),
):
    try:
        register_family(family)
    except BlueprintError:
        pass  # already registered in this process
