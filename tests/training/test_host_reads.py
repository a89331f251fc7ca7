"""No host read of a tensor on the training hot path.

:class:`HostReads` is a ``TorchFunctionMode`` that counts the calls that copy a tensor's value to
the host (``.item()``, ``float()``, ``bool()`` — an ``if`` on a tensor —, ``int()``,
``.tolist()``, ``.cpu()``, ``.numpy()``, formatting). On a GPU each of these is a device sync.
Modes are per thread, so the trainer's step (run in a worker thread) is counted by entering a
second counter there. A fit of N batches minus a fit of N/2 batches leaves the reads per step
(the epoch boundary's reads, validation and snapshots, cancel out). The CUDA test runs the
steps under ``torch.cuda.set_sync_debug_mode("error")`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
import torch
from tests.reliability import _helpers as helpers
from torch import nn
from torch.overrides import TorchFunctionMode

from esper_async.reliability import ReliabilityConfig
from esper_async.seeds import SeedState, find_slots
from esper_async.training._grower import Grower
from esper_async.training.trainer import Trainer

_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy",
          "__format__"}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors (reads of the ``ignore`` storages apart, in ``ignored``).

    :param log: where each read's name is appended (shared between threads).
    :param ignore: storages (``untyped_storage().data_ptr()``) whose reads go to ``ignored``.
    """

    def __init__(self, log: list[str], ignored: list[str], ignore: set[int]) -> None:
        super().__init__()
        self.log, self.ignored, self.ignore = log, ignored, ignore

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _READS and args and isinstance(args[0], torch.Tensor):
            ptr = args[0].untyped_storage().data_ptr()
            (self.ignored if ptr in self.ignore else self.log).append(name)
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_host_read() -> None:
    log: list[str] = []
    t = torch.tensor([1.5])
    with HostReads(log, [], set()):
        t.item(), float(t), int(t), t.tolist(), t.cpu(), t.numpy(), f"{t[0]:.1f}"
        if t > 0:
            pass
        torch.ones(3).sum() * 2  # no read
    assert log == ["item", "__float__", "__int__", "tolist", "cpu", "numpy", "__format__",
                   "__bool__"]


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(n)]


def _model(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    if kind == "plain":
        torch.manual_seed(0)
        model: nn.Module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    else:
        model = helpers.host()  # slots "0" and "2", dormant
    # Fused, as the trainer's default on a GPU: the unfused Adam reads its step counters (host
    # tensors beside GPU parameters, so no sync there; on a CPU they would count here).
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    if kind == "training":
        helpers.grow(model, opt, "0", rank=2)
        assert find_slots(model)["0"].state is SeedState.TRAINING
    return model, opt


def _reads_in_fit(kind: str, verdict: str, batches: int,
                  hook: Callable[[nn.Module], None] | None = None) -> tuple[int, int, int]:
    """Host reads during a 1-epoch fit: (reads, verdict-ring reads, steps)."""
    model, opt = _model(kind)
    if hook is not None:
        hook(model)
    trainer = Trainer(model, grow=False, optimizer=opt,
                      reliability=ReliabilityConfig(verdict=verdict))  # type: ignore[arg-type]
    log: list[str] = []
    ignored: list[str] = []
    ring = set() if trainer.verdicts is None else {
        trainer.verdicts.ring.untyped_storage().data_ptr()}

    def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any) -> Any:
            with HostReads(log, ignored, ring):
                return fn(*args)
        return step

    trainer._step = counted(trainer._step)  # type: ignore[method-assign]
    train = _batches(batches)
    with HostReads(log, ignored, ring):
        anyio.run(lambda: trainer.fit(train, train[:1], epochs=1))
    return len(log), len(ignored), trainer.step


def _per_step(kind: str, verdict: str, hook: Callable[[nn.Module], None] | None = None
              ) -> tuple[float, float]:
    # A warm-up so that the steps measured are past the governor's warm-up and every first step
    # (state creation) of the optimizer: the difference of two fits is the steady state.
    long, long_ring, long_steps = _reads_in_fit(kind, verdict, 24, hook)
    short, short_ring, short_steps = _reads_in_fit(kind, verdict, 12, hook)
    steps = long_steps - short_steps
    return (long - short) / steps, (long_ring - short_ring) / steps


@pytest.mark.parametrize("kind", ["plain", "dormant", "training"])
def test_a_lagged_step_reads_nothing_on_the_host_but_its_verdict(kind: str) -> None:
    reads, ring = _per_step(kind, "lagged")
    assert reads == 0
    assert ring == 1  # each step's (loss, ok), from the host ring, a step later


def test_a_synchronous_step_reads_its_loss_once() -> None:
    reads, ring = _per_step("dormant", "sync")
    assert (reads, ring) == (1, 0)  # the documented constant: the loss, before the backward


def test_the_count_fails_on_a_new_read_in_the_step() -> None:
    def read_in_forward(model: nn.Module) -> None:
        model.register_forward_hook(lambda _m, _a, out: math.isfinite(out.sum().item()) and None)

    reads, _ = _per_step("training", "lagged", read_in_forward)
    assert reads == 1


def test_a_hand_written_loop_reads_no_loss_per_step() -> None:
    model, opt = _model("dormant")
    log: list[str] = []

    async def loop(batches: int) -> float | None:
        async with Grower(model, opt, grow=False) as grower:
            for x, y in _batches(batches):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                with HostReads(log, [], set()):
                    grower.after_step(loss)
            report = await grower.end_epoch(_batches(1))
        return report.train_loss

    train_loss = anyio.run(loop, 6)
    assert log == []
    assert train_loss is not None and math.isfinite(train_loss)


@contextmanager
def _sync_errors_during_steps(trainer: Trainer) -> Iterator[None]:
    """``set_sync_debug_mode("error")`` from each epoch's start to its end (the boundary's
    validation and snapshot read the device on purpose)."""
    grower = trainer.grower
    begin, end = grower.begin_epoch, grower.end_epoch

    def begin_epoch() -> None:
        opening = not grower.epoch_open  # end_epoch calls it too, on an open epoch
        begin()
        if opening:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    async def end_epoch(val: Any) -> Any:
        torch.cuda.set_sync_debug_mode("default")
        return await end(val)

    grower.begin_epoch = begin_epoch  # type: ignore[method-assign]
    grower.end_epoch = end_epoch  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["plain", "dormant", "training"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_epoch_on_a_gpu_never_syncs_in_a_step(kind: str, precision: str) -> None:
    model, _ = _model(kind)
    model = model.cuda()
    trainer = Trainer(model, grow=False, device="cuda", precision=precision)  # type: ignore[arg-type]
    if kind == "training":  # the default (fused) Adam must know the seed's parameters
        assert find_slots(model)["0"].seed is not None
    assert trainer.verdicts is not None  # lagged by default on a GPU
    train = _batches(32)
    with _sync_errors_during_steps(trainer):
        fit = anyio.run(lambda: trainer.fit(train, train[:1], epochs=2))
    assert fit.steps == 64 and not fit.incidents
