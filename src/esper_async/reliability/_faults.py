"""Fault injection: a seeded plan of which operations fail and how, and the means to fail them.

Every fault is real at the point where it enters: a worker process is killed with ``SIGKILL``; a
compile genuinely runs past its timeout; a store blob's bytes are overwritten on disk; a kernel's
forward raises, returns NaN/Inf, or asks the allocator for more memory than exists (through torch
hooks on the loaded kernel module, so the failure comes from inside the seed's call); a blended
seed's output is pushed up until the loss spikes; a host parameter is set to NaN so the loss is
non-finite for a reason no seed explains. What happens next is the system's own doing.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._files import read_regular, write_atomic
from ._checkpoint_file import MAX_CHECKPOINT_BYTES

__all__ = (
    "FaultKind",
    "FaultPlan",
    "corrupt_file",
    "inject_kernel_nan",
    "inject_kernel_oom",
    "inject_kernel_raise",
    "inject_loss_spike",
    "kill_processes",
    "poison_parameter",
)

#: Bytes asked of the allocator by an injected out-of-memory fault: more than any machine has.
_IMPOSSIBLE_BYTES = 1 << 60


class FaultKind(StrEnum):
    """The faults the reliability layer recovers from."""

    WORKER_KILL = "worker_kill"
    """A compile worker is killed with SIGKILL mid-compile."""
    COMPILE_TIMEOUT = "compile_timeout"
    """A compile runs past its timeout."""
    KERNEL_NAN = "kernel_nan"
    """A grafted kernel's output turns NaN or Inf."""
    KERNEL_RAISE = "kernel_raise"
    """A grafted kernel raises in its forward pass."""
    LOSS_SPIKE = "loss_spike"
    """A blended seed makes the loss jump."""
    NON_FINITE_LOSS = "non_finite_loss"
    """The loss turns non-finite with no seed to blame (a host parameter went NaN)."""
    CORRUPT_STORE = "corrupt_store"
    """A kernel's blob in the store is corrupted on disk."""
    OOM_GRAFT = "oom_graft"
    """A freshly grafted seed runs out of memory."""


COMPILE_FAULTS = frozenset(
    {FaultKind.WORKER_KILL, FaultKind.COMPILE_TIMEOUT, FaultKind.CORRUPT_STORE}
)
"""Faults that strike while a kernel is being obtained (before it is grafted)."""


@dataclass
class FaultPlan:
    """Which operation gets which fault, drawn from a seeded generator.

    :param seed: seeds the draws.
    :param rate: probability that an operation carries a fault.
    :param kinds: the kinds to draw from (uniformly).
    :param at_least_once: every kind is injected exactly once among the first ``2·len(kinds)``
        operations after the warm-up (at shuffled positions), before ``rate`` applies.
    :param skip_first: operations at the start that carry no fault (warm-up: the governor needs
        some good losses before it can judge spikes).
    """

    seed: int = 0
    rate: float = 0.08
    kinds: Sequence[FaultKind] = tuple(FaultKind)
    at_least_once: bool = True
    skip_first: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1], got {self.rate}")
        self._rng = random.Random(self.seed)
        kinds = list(self.kinds) if self.at_least_once else []
        self._scheduled: list[FaultKind | None] = [*kinds, *[None] * len(kinds)]
        self._rng.shuffle(self._scheduled)
        self.drawn = 0

    def draw(self) -> FaultKind | None:
        """The fault for the next operation (``None``: no fault)."""
        self.drawn += 1
        if self.drawn <= self.skip_first:
            return None
        if self._scheduled:
            return self._scheduled.pop()
        if self._rng.random() < self.rate:
            return self._rng.choice(list(self.kinds))
        return None

    def uniform(self, low: float, high: float) -> float:
        """A draw from the plan's generator (for delays and the like)."""
        return self._rng.uniform(low, high)


def inject_kernel_raise(module: nn.Module) -> RemovableHandle:
    """Make ``module``'s forward raise ``RuntimeError`` from now on."""

    def hook(_module: nn.Module, _args: Any) -> None:
        raise RuntimeError("injected fault: kernel raised at run time")

    return module.register_forward_pre_hook(hook)


def inject_kernel_nan(module: nn.Module, *, inf: bool = False) -> RemovableHandle:
    """Make ``module``'s output NaN (or +Inf) from now on."""
    bad = float("inf") if inf else float("nan")

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + bad

    return module.register_forward_hook(hook)


def inject_kernel_oom(module: nn.Module) -> RemovableHandle:
    """Make ``module``'s forward ask the allocator for more memory than exists (a real
    allocation failure: ``torch.OutOfMemoryError`` on CUDA, ``RuntimeError`` on the CPU)."""

    def hook(_module: nn.Module, args: Any) -> None:
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else "cpu"
        torch.empty(_IMPOSSIBLE_BYTES, dtype=torch.uint8, device=device)

    return module.register_forward_pre_hook(hook)


def inject_loss_spike(module: nn.Module, *, scale: float = 1e3) -> RemovableHandle:
    """Push ``module``'s output up by ``scale`` from now on (finite, but the loss jumps)."""

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output + scale

    return module.register_forward_hook(hook)


@torch.no_grad()
def poison_parameter(module: nn.Module) -> str:
    """Set the first element of ``module``'s first floating parameter to NaN; return its name.

    :raises ValueError: if the module has no floating parameter.
    """
    for name, param in module.named_parameters():
        if param.is_floating_point():
            param.view(-1)[0] = float("nan")
            return name
    raise ValueError("the module has no floating parameter to poison")


def corrupt_file(path: str | os.PathLike[str]) -> None:
    """Flip the bits of the middle bytes of ``path`` in place (as disk rot would).

    :raises FileNotFoundError: if the file does not exist.
    :raises OSError: if it is not a regular file (refused unread) or cannot be rewritten.
    """
    target = Path(path)
    data = bytearray(read_regular(target, cap=MAX_CHECKPOINT_BYTES))
    middle = len(data) // 2
    for i in range(middle, min(len(data), middle + 16)):
        data[i] ^= 0xFF
    write_atomic(target, bytes(data), durable=False)


def kill_processes(pids: Iterable[int]) -> int:
    """Send ``SIGKILL`` to each process; return how many were signalled."""
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed
