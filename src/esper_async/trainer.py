"""The trainer: an async training loop that grows its model.

One task — the training task — is the only writer of the model and the optimizer, and it changes
them only between steps. Compiles run beside it in the trainer's task group and hand finished
kernels back through a memory-object stream; the training task grafts them at the next step
boundary. CPU steps run in a worker thread so the event loop stays free.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import structlog
import torch
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.sdk.trace import TracerProvider
from torch import nn

from ._exceptions import EsperError
from ._execution import StepRunner
from ._optim import add_module_params, remove_module_params
from .blueprints import Blueprint
from .compiler import BlueprintCompiler
from .controller import (
    Controller,
    Counterfactual,
    Cull,
    Decision,
    EpochReport,
    Fossilize,
    Germinate,
    HeuristicController,
    Release,
    StartBlending,
)
from .kernels import Kernel, load_kernel
from .seeds import SeedSlot, SeedState, find_slots
from .telemetry import SPAN_EPOCH, SPAN_LIFECYCLE, SPAN_RUN, Telemetry

__all__ = ("FitResult", "GrowthEvent", "Trainer")

log = structlog.get_logger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Finished compiles waiting for a step boundary. Small: at most a few seeds germinate at once.
_READY_BUFFER = 16


@dataclass(frozen=True)
class GrowthEvent:
    """One lifecycle transition, as it happened.

    :ivar epoch: the epoch in which it happened.
    :ivar step: the global training step.
    :ivar slot: the slot's name.
    :ivar source: the state before.
    :ivar target: the state after.
    :ivar reason: why, with the figures behind the decision.
    """

    epoch: int
    step: int
    slot: str
    source: str
    target: str
    reason: str


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    :ivar history: one report per epoch.
    :ivar events: every lifecycle transition, in order.
    :ivar wall_s: wall-clock seconds of the whole fit.
    :ivar steps: training steps taken.
    """

    history: list[EpochReport] = field(default_factory=list)
    events: list[GrowthEvent] = field(default_factory=list)
    wall_s: float = 0.0
    steps: int = 0

    def count(self, target: SeedState) -> int:
        """How many transitions into ``target`` happened."""
        return sum(e.target == target.value for e in self.events)


@dataclass(frozen=True)
class _Compiled:
    slot: str
    blueprint: Blueprint
    kernel: Kernel | None
    module: nn.Module | None
    error: EsperError | None


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


class Trainer:
    """Train a wrapped model and grow seeds in its slots.

    :param model: the host, already wrapped with :func:`esper_async.wrap` (or with no slots, for a
        static baseline).
    :param optimizer: optimizer over the model's parameters; seeds' parameters are added to it when
        they are grafted and removed when they are culled. Default: Adam, lr 3e-3.
    :param loss_fn: ``loss_fn(logits, targets)``; default cross-entropy.
    :param controller: decides growth at epoch boundaries; default :class:`HeuristicController`.
    :param compiler: turns blueprints into kernels; default :class:`BlueprintCompiler`.
    :param grow: whether to grow at all (``False`` trains the host statically).
    :param device: where the model and batches live.
    :param seed: RNG seed of the kernels' initial weights.
    :param graft: when finished kernels enter their slots. ``"epoch"`` (default): at the first
        epoch boundary after germination, waiting there if the compile is slower than an epoch;
        runs are then reproducible from their seed, whatever the compile latency. ``"step"``: at
        the first step boundary after the kernel is ready (sooner, but timing-dependent); a
        kernel still compiling ``graft_deadline_epochs`` after germination is waited for.
    :param graft_deadline_epochs: see ``graft="step"``.
    :param wrap_model: wraps the model for training steps, e.g. ``DistributedDataParallel``; it is
        applied at start and again after every change of the model's structure (a graft or a
        cull), since such wrappers capture the parameter set when they are built.
    :param telemetry: the run's telemetry (spans for the run, epochs, sampled steps, compiles,
        lifecycle transitions; step-time and seed metrics). Default: recorded nowhere.
    :raises ValueError: if ``graft`` is neither ``"epoch"`` nor ``"step"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn = nn.functional.cross_entropy,
        controller: Controller | None = None,
        compiler: BlueprintCompiler | None = None,
        grow: bool = True,
        device: torch.device | str = "cpu",
        seed: int = 0,
        graft: Literal["epoch", "step"] = "epoch",
        graft_deadline_epochs: int = 2,
        telemetry: Telemetry | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        if graft not in ("epoch", "step"):
            raise ValueError(f"graft must be 'epoch' or 'step', got {graft!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=3e-3)
        self.loss_fn = loss_fn
        self.controller: Controller = controller or HeuristicController()
        self.telemetry = telemetry or Telemetry(tracer_provider=TracerProvider())
        self.compiler = compiler or BlueprintCompiler(
            device=str(self.device), telemetry=self.telemetry
        )
        self.grow = grow
        self.seed = seed
        self.graft = graft
        self.graft_deadline_epochs = 1 if graft == "epoch" else graft_deadline_epochs
        self.slots: dict[str, SeedSlot] = find_slots(model)
        self.wrap_model = wrap_model
        self.runner = self._rewrap()
        self.step = 0
        self.epoch = 0
        self._steps_per_epoch = 1
        self._result = FitResult()
        # CPU: the step runs in a worker thread; CUDA: it is launched in one and its completion is
        # awaited through the stream bridge, so the event loop never waits on the device.
        self._steps = StepRunner.for_device(self.device)
        # Deserialising an exported program is not safe to run twice at once in one process.
        self._load_limiter = anyio.CapacityLimiter(1)

    # --- the loop --------------------------------------------------------------------------------

    async def fit(
        self,
        train_loader: Iterable[Batch],
        val_loader: Iterable[Batch],
        *,
        epochs: int,
        on_epoch: Callable[[EpochReport, FitResult], None] | None = None,
    ) -> FitResult:
        """Train for ``epochs`` epochs, growing seeds as the controller decides.

        :param train_loader: batches ``(inputs, targets)`` for training, e.g. a ``DataLoader``.
        :param val_loader: batches for validation and the controller's measurements.
        :param epochs: how many epochs to train.
        :param on_epoch: called after every epoch with its report (for progress display).
        :returns: the run's history and growth events.
        """
        self._result = result = FitResult()
        self._steps_per_epoch = max(1, len(train_loader))  # type: ignore[arg-type]
        started = time.perf_counter()
        send, ready = anyio.create_memory_object_stream[_Compiled](_READY_BUFFER)
        tel = self.telemetry
        async with AsyncExitStack() as stack:
            if self.grow:
                await stack.enter_async_context(self.compiler)
            tg = await stack.enter_async_context(anyio.create_task_group())
            await stack.enter_async_context(send)
            await stack.enter_async_context(ready)
            run_span = stack.enter_context(
                tel.span(SPAN_RUN, epochs=epochs, slots=len(self.slots), grow=self.grow)
            )
            for epoch in range(epochs):
                self.epoch = epoch
                with tel.span(SPAN_EPOCH, epoch=epoch) as epoch_span:
                    report = await self._train_epoch(train_loader, val_loader, ready)
                    epoch_span.set_attribute("esper.loss", report.val_loss)
                    await self._await_late_kernels(ready)
                    if self.grow:
                        for decision in self.controller.decide(report, result.history, self.slots):
                            self._apply(decision, tg, send)
                result.history.append(report)
                log.info(
                    "epoch",
                    epoch=epoch,
                    train_loss=report.train_loss,
                    val_loss=report.val_loss,
                    val_acc=report.val_acc,
                )
                if on_epoch is not None:
                    on_epoch(report, result)
            run_span.set_attribute("esper.params", self.param_count())
            # Compiles still running when training ends are not needed any more.
            tg.cancel_scope.cancel()
        result.wall_s = time.perf_counter() - started
        result.steps = self.step
        return result

    async def _train_epoch(
        self,
        train_loader: Iterable[Batch],
        val_loader: Iterable[Batch],
        ready: MemoryObjectReceiveStream[_Compiled],
    ) -> EpochReport:
        """One pass over the training data, then the validation measurements."""
        tel = self.telemetry
        self.model.train()
        losses = []
        for x, y in train_loader:
            if self.graft == "step":
                self._graft_ready(ready)
            x, y = x.to(self.device), y.to(self.device)
            with tel.step_span(self.step, epoch=self.epoch):
                started = time.perf_counter()
                losses.append(float(await self._steps.run(self._train_step, x, y)))
                tel.metrics.step_finished(time.perf_counter() - started)
            self.step += 1
            for slot in self.slots.values():
                self._tracked(slot, slot.on_step)
        report = await anyio.to_thread.run_sync(
            self._evaluate, val_loader, self.epoch, sum(losses) / max(1, len(losses))
        )
        for slot in self.slots.values():
            slot.lifecycle.epochs_in_state += 1
        return report

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.runner(x), y)
        loss.backward()
        self.optimizer.step()
        # Not .item(): on a GPU that would wait for the device inside the launching thread.
        return loss.detach()

    @torch.no_grad()
    def _evaluate(self, loader: Iterable[Batch], epoch: int, train_loss: float) -> EpochReport:
        self.model.eval()
        blended = [
            n
            for n, s in self.slots.items()
            if s.seed is not None and s.state in (SeedState.BLENDING, SeedState.PROBATION)
        ]
        totals = {"all": [0.0, 0.0]} | {n: [0.0, 0.0] for n in blended}
        count = 0
        for slot in self.slots.values():
            slot.observe = True
        try:
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                logits = self.model(x)
                totals["all"][0] += float(self.loss_fn(logits, y)) * len(y)
                totals["all"][1] += _accuracy(logits, y) * len(y)
                count += len(y)
                for slot in self.slots.values():
                    slot.observe = False
                for name in blended:
                    with self.slots[name].ablated():
                        logits = self.model(x)
                    totals[name][0] += float(self.loss_fn(logits, y)) * len(y)
                    totals[name][1] += _accuracy(logits, y) * len(y)
        finally:
            for slot in self.slots.values():
                slot.observe = False
        n = max(1, count)
        loss, acc = totals["all"][0] / n, totals["all"][1] / n
        return EpochReport(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=loss,
            val_acc=acc,
            health={name: slot.health() for name, slot in self.slots.items()},
            counterfactual={
                name: Counterfactual(loss, totals[name][0] / n, acc, totals[name][1] / n)
                for name in blended
            },
        )

    # --- growth: decisions and kernels, applied at step boundaries ------------------------------

    def _tracked(self, slot: SeedSlot, action: Callable[..., Any], *args: Any) -> Any:
        """Run a lifecycle action on ``slot`` and record the transitions it made."""
        before = len(slot.lifecycle.history)
        out = action(*args)
        for source, target, reason in slot.lifecycle.history[before:]:
            event = GrowthEvent(
                self.epoch, self.step, slot.slot_name, source.value, target.value, reason
            )
            self._result.events.append(event)
            with self.telemetry.span(
                SPAN_LIFECYCLE,
                slot=event.slot,
                lifecycle__from=event.source,
                lifecycle__to=event.target,
                reason=reason,
                step=event.step,
                epoch=event.epoch,
                blueprint=None if slot.blueprint is None else slot.blueprint.name,
                kernel_id=slot.kernel_id,
            ):
                self.telemetry.metrics.seed_transition(source, target)
            log.info(
                "lifecycle",
                slot=event.slot,
                source=event.source,
                target=event.target,
                reason=reason,
                epoch=event.epoch,
                step=event.step,
            )
        return out

    def _apply(
        self, decision: Decision, tg: TaskGroup, send: MemoryObjectSendStream[_Compiled]
    ) -> None:
        slot = self.slots[decision.slot]
        match decision:
            case Germinate(blueprint=blueprint, reason=reason):
                self._tracked(slot, slot.germinate, blueprint, reason)
                tg.start_soon(self._compile, slot.slot_name, blueprint, send.clone())
            case StartBlending(epochs=epochs, reason=reason):
                self._tracked(slot, slot.start_blending, epochs * self._steps_per_epoch, reason)
            case Fossilize(reason=reason):
                self._tracked(slot, slot.fossilize, reason)
            case Cull(reason=reason):
                self._cull(slot, reason)
            case Release(reason=reason):
                self._tracked(slot, slot.release, reason)

    def _cull(self, slot: SeedSlot, reason: str) -> None:
        seed = self._tracked(slot, slot.cull, reason)
        if seed is not None:
            remove_module_params(self.optimizer, seed)
            self._rewrap()
        self._tracked(slot, slot.embargo, "cooling down after cull")

    async def _compile(
        self, slot: str, blueprint: Blueprint, send: MemoryObjectSendStream[_Compiled]
    ) -> None:
        contract = self.slots[slot].contract
        assert contract is not None  # germinate() checked it
        async with send:
            try:
                kernel = await self.compiler.compile(blueprint, contract, seed=self.seed)
                module = await anyio.to_thread.run_sync(
                    lambda: load_kernel(kernel, device=self.device), limiter=self._load_limiter
                )
            except EsperError as exc:
                log.warning("compile failed", slot=slot, blueprint=blueprint.name, error=str(exc))
                await send.send(_Compiled(slot, blueprint, None, None, exc))
                return
            await send.send(_Compiled(slot, blueprint, kernel, module, None))

    def _graft_ready(self, ready: MemoryObjectReceiveStream[_Compiled]) -> None:
        """Graft every kernel that finished compiling (called between steps only)."""
        while True:
            try:
                self._graft(ready.receive_nowait())
            except anyio.WouldBlock:
                return

    async def _await_late_kernels(self, ready: MemoryObjectReceiveStream[_Compiled]) -> None:
        """Wait for kernels whose seeds germinated ``graft_deadline_epochs`` or more epochs ago."""
        deadline = self.graft_deadline_epochs
        while any(
            s.state is SeedState.GERMINATED and s.lifecycle.epochs_in_state >= deadline
            for s in self.slots.values()
        ):
            # Every compile task sends exactly one message (kernel or error), so this ends.
            self._graft(await ready.receive())

    def _graft(self, done: _Compiled) -> None:
        slot = self.slots[done.slot]
        if slot.state is not SeedState.GERMINATED or slot.blueprint != done.blueprint:
            return  # the slot moved on (e.g. culled) while the kernel compiled
        if done.module is None or done.kernel is None:
            self._cull(slot, f"compile failed: {done.error}")
            return
        self._tracked(slot, slot.graft, done.module, done.kernel.kernel_id)
        add_module_params(self.optimizer, done.module)
        self._rewrap()

    def _rewrap(self) -> nn.Module:
        """The module training steps call: the model, wrapped anew if a wrapper is set."""
        self.runner = self.model if self.wrap_model is None else self.wrap_model(self.model)
        return self.runner

    def param_count(self) -> int:
        """Trainable parameters of the model now, seeds included."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
