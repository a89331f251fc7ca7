"""The trainer: an async training loop that grows its model.

One task — the training task — is the only writer of the model and the optimizer, and it changes
them only between steps. Compiles run beside it in the trainer's task group and hand finished
kernels back through a memory-object stream; the training task grafts them at the next step
boundary. CPU steps run in a worker thread so the event loop stays free.

Faults do not stop training (see ``docs/reliability.md``): a seed that raises, turns non-finite or
runs out of memory is culled and its step redone without it; a bad loss (non-finite, or a spike)
never updates the model, and the governor rolls model, optimizer and seeds back to the last good
snapshot (taken at epoch boundaries) and embargoes the culprit; failed compiles are retried with
jittered backoff when their workers died, and each blueprint has a circuit breaker. Checkpoints of
the whole morphogenetic state are written atomically at epoch boundaries, and a run resumes from
them without compiling anything.

With a surgery policy (``surgery=``), the trainer also changes the model's architecture: at an
epoch boundary, after the controller's decisions, each seed that fossilized is reported to the
policy, and the widening it proposes (see ``docs/surgery.md``) runs as one validated transaction
between steps; the optimizer steps the new parameters from the next step on. Committed operations
are recorded in checkpoints and replayed on the fresh model when a run resumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import structlog
import torch
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from opentelemetry.sdk.trace import TracerProvider
from torch import nn

from ..blueprints import Blueprint
from ..compiler import BlueprintCompiler, WorkerDiedError
from ..control._controller import (
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
from ..errors import (
    CompileError,
    CompileTimeoutError,
    EsperError,
    SeedRuntimeError,
    SurgeryError,
)
from ..kernels import Kernel, load_kernel
from ..reliability import (
    Admission,
    BreakerBoard,
    BreakerState,
    CheckpointError,
    CheckpointStore,
    Governor,
    GovernorError,
    Restored,
    Snapshot,
    retry,
)
from ..reliability._config import ReliabilityConfig
from ..reliability._errors import LossAnomaly, is_out_of_memory
from ..reliability._incidents import Incident, IncidentKind
from ..runtime._execution import StepRunner
from ..seeds import SeedSlot, SeedState, find_slots
from ..surgery import ModelSurgeon, SurgeryPolicy, SurgeryPolicyConfig
from ..surgery._replay import operation_record
from ..telemetry import SPAN_EPOCH, SPAN_LIFECYCLE, SPAN_ROLLBACK, SPAN_RUN, SPAN_SURGERY, Telemetry
from ._guard import StepConsensus, StepGuard
from ._loaders import batch_count, check_loaders, no_batches
from ._optim import add_module_params, remove_module_params
from ._results import FitResult, GrowthEvent
from ._state import apply_checkpoint, checkpoint_payload

__all__ = ("FitResult", "GrowthEvent", "Trainer")

log = structlog.get_logger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Finished compiles waiting for a step boundary. Small: at most a few seeds germinate at once.
_READY_BUFFER = 16
#: Validation examples a surgery's probe batch takes: enough to show a broken function-preservation
#: promise, for the cost of one small forward pass.
_SURGERY_PROBE = 64


@dataclass(frozen=True)
class _Compiled:
    slot: str
    blueprint: Blueprint
    kernel: Kernel | None
    module: nn.Module | None
    error: EsperError | None


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def _transient(exc: BaseException) -> bool:
    """Whether a compile failure may pass if tried again: its workers died (or their pipes
    broke), not the blueprint."""
    if isinstance(exc, EsperError):  # typed: retried only when the workers died
        return isinstance(exc, CompileError) and isinstance(exc.__cause__, WorkerDiedError)
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


def _loader_generator(loader: object) -> torch.Generator | None:
    """The RNG that orders a ``DataLoader``'s batches, if it has one (saved in checkpoints)."""
    sampler = getattr(loader, "sampler", None)
    generator = getattr(sampler, "generator", None) or getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


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
    :param scheduler: a learning-rate scheduler, stepped once per epoch (and checkpointed).
    :param reliability: fault handling: breakers, compile retries, resource limits, the governor.
    :param surgery: architecture changes during training (``None``: none). A
        :class:`~esper_async.surgery.SurgeryPolicyConfig` (the trainer builds the policy on its
        step counter) or a ready :class:`~esper_async.surgery.SurgeryPolicy`. The trainer reports
        every fossilized seed's slot to it and applies its proposals at epoch boundaries.
    :param writes_checkpoints: whether this process writes the checkpoints of
        ``fit(checkpoint_dir=...)``. Under DDP pass ``ctx.is_leader``: rank 0 writes into a
        directory every rank can read, and with ``resume=True`` every rank restores the same
        newest file (every rank holds the same state, so rank 0's is the job's).
    :raises ValueError: if ``graft`` is neither ``"epoch"`` nor ``"step"``, or the surgery
        policy's ``fossil_threshold`` exceeds 1 (a slot fossilizes at most once, so it could never
        fire).
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
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        reliability: ReliabilityConfig | None = None,
        surgery: SurgeryPolicyConfig | SurgeryPolicy | None = None,
        writes_checkpoints: bool = True,
    ) -> None:
        if graft not in ("epoch", "step"):
            raise ValueError(f"graft must be 'epoch' or 'step', got {graft!r}")
        if isinstance(surgery, SurgeryPolicyConfig):
            surgery = SurgeryPolicy(surgery, step=lambda: self.step)
        if surgery is not None and surgery.config.fossil_threshold > 1:
            raise ValueError(
                f"surgery fossil_threshold={surgery.config.fossil_threshold} can never be reached: "
                "the trainer reports fossils per seed slot, and a slot fossilizes at most once; "
                "use fossil_threshold=1"
            )
        self.writes_checkpoints = writes_checkpoints
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
        self._rewrap()
        self.step = 0
        self.epoch = 0
        self._steps_per_epoch = 1
        self._first_epoch = 0  # the first epoch of the current fit (a resumed fit starts later)
        self._epochs_without_steps = 0  # epochs in a row in which every step was dropped
        self._result = FitResult()
        # CPU: the step runs in a worker thread; CUDA: it is launched in one and its completion is
        # awaited through the stream bridge, so the event loop never waits on the device.
        self._steps = StepRunner.for_device(self.device)
        self.scheduler = scheduler
        self.reliability = rel = reliability or ReliabilityConfig()
        self.breakers = BreakerBoard(rel.breaker, clock=rel.clock)
        self.governor = Governor(rel.governor)
        self.admission = Admission(rel.limits)
        #: Every kernel loaded in a slot (and in the last snapshot), by id: checkpoints carry them.
        self.kernels: dict[str, Kernel] = {}
        self._guard = StepGuard(
            lambda x: self.runner(x), self.optimizer, loss_fn, self.slots, self.governor
        )
        self._pending: dict[str, Blueprint] = {}  # compiles in flight, by slot
        self._faulty: set[int] = set()  # ids of seeds culled for faults since the last snapshot
        self._growth_paused_until = 0  # first epoch at which germination may start again
        self._oom_pause = rel.oom_backoff_epochs
        self._stop_requested = False
        self._checkpoint_requested = False
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[_Compiled] | None = None
        #: Proposes architecture changes (``None``: the architecture changes only by seeds).
        self.surgery = surgery
        self.surgeon = ModelSurgeon()
        #: Every surgery committed on the model, as records (checkpoints carry them for replay).
        self.surgeries: list[dict[str, Any]] = []

    @property
    def result(self) -> FitResult:
        """The current (or last) fit's record so far."""
        return self._result

    def request_stop(self) -> None:
        """End :meth:`fit` cleanly after the current epoch (checkpointed if checkpoints are on)."""
        self._stop_requested = True

    def request_checkpoint(self) -> None:
        """Write a checkpoint at the next epoch boundary, whatever the schedule."""
        self._checkpoint_requested = True

    # --- the loop --------------------------------------------------------------------------------

    async def fit(
        self,
        train_loader: Iterable[Batch],
        val_loader: Iterable[Batch],
        *,
        epochs: int,
        on_epoch: Callable[[EpochReport, FitResult], None] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
    ) -> FitResult:
        """Train until epoch ``epochs``, growing seeds as the controller decides.

        :param train_loader: batches ``(inputs, targets)`` for training, e.g. a ``DataLoader``.
            It must yield at least one batch every epoch, and be re-iterable (a ``DataLoader``
            or a list, not a generator) when more than one epoch is to run.
        :param val_loader: batches for validation and the controller's measurements, under the
            same rules even with ``grow=False``: every epoch's report is measured on it.
        :param epochs: the run's length in epochs (a resumed run trains the ones left).
        :param on_epoch: called after every epoch with its report (for progress display).
        :param checkpoint_dir: where checkpoints go (``None``: none are written).
        :param checkpoint_every: epochs between checkpoints (the last epoch is always written).
        :param resume: continue from the newest checkpoint in ``checkpoint_dir`` that restores
            (damaged ones are skipped with a warning); there must be one.
        :returns: the run's history, growth events and incidents (a resumed run's include those
            before the checkpoint). An epoch in which every step was dropped reports
            ``train_loss=None`` and records an ``epoch_without_steps`` incident; one whose
            validation loss is not finite records a ``non_finite_validation`` incident. The
            controller is not asked after either (no seed is judged on such figures).
        :raises GovernorError: if rolling back could not make training sound again, or every
            step was dropped in ``reliability.max_epochs_without_steps`` epochs in a row.
        :raises LoaderError: if a loader yields no batches, or is a one-shot iterator and more
            than one epoch is to run (checked before training where it can be).
        :raises ValueError: if ``resume`` is set without a ``checkpoint_dir``.
        :raises CheckpointError: if ``resume`` is set and ``checkpoint_dir`` holds no checkpoint,
            or none that restores (see :meth:`restore`).
        """
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir to resume from")
        checkpoints = None
        if checkpoint_dir is not None:
            checkpoints = CheckpointStore(checkpoint_dir, keep=self.reliability.checkpoint_keep)
        generator = _loader_generator(train_loader)
        self._result = result = FitResult()
        first = 0
        if resume and checkpoints is not None:
            first = self.restore(checkpoints.directory, generator=generator).epoch
            result = self._result
        check_loaders({"training": train_loader, "validation": val_loader}, epochs - first)
        self._steps_per_epoch = batch_count(train_loader) or 1  # counted after each epoch
        self._first_epoch = first
        self._epochs_without_steps = 0
        self._stop_requested = False
        self._pending.clear()
        self.admission.in_flight = 0
        started = time.perf_counter()
        send, ready = anyio.create_memory_object_stream[_Compiled](_READY_BUFFER)
        tel = self.telemetry
        try:
            async with AsyncExitStack() as stack:
                if self.grow:
                    await stack.enter_async_context(self.compiler)
                tg = await stack.enter_async_context(anyio.create_task_group())
                await stack.enter_async_context(send)
                await stack.enter_async_context(ready)
                run_span = stack.enter_context(
                    tel.span(SPAN_RUN, epochs=epochs, slots=len(self.slots), grow=self.grow)
                )
                self._tg, self._send = tg, send
                self._resume_compiles()
                self.governor.offer(await self._snapshot())
                for epoch in range(first, epochs):
                    self.epoch = epoch
                    report = await self._epoch(train_loader, val_loader, ready)
                    last = epoch + 1 == epochs or self._stop_requested
                    await self._end_epoch(epoch, checkpoints, checkpoint_every, last, generator)
                    log.info(
                        "epoch",
                        epoch=epoch,
                        train_loss=report.train_loss,
                        val_loss=report.val_loss,
                        val_acc=report.val_acc,
                    )
                    if on_epoch is not None:
                        on_epoch(report, result)
                    if self._stop_requested:
                        break
                run_span.set_attribute("esper.params", self.param_count())
                # Compiles still running when training ends are not needed any more.
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The task group wraps what the training task raised: give callers the error itself.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise
        finally:
            self._tg = self._send = None
        result.wall_s = time.perf_counter() - started
        result.steps = self.step
        return result

    async def _epoch(
        self,
        train_loader: Iterable[Batch],
        val_loader: Iterable[Batch],
        ready: MemoryObjectReceiveStream[_Compiled],
    ) -> EpochReport:
        """Train one epoch, graft what is due, apply the controller's decisions."""
        self.governor.new_epoch()
        with self.telemetry.span(SPAN_EPOCH, epoch=self.epoch) as epoch_span:
            report = await self._train_epoch(train_loader, val_loader, ready)
            epoch_span.set_attribute("esper.loss", report.val_loss)
            await self._await_late_kernels(ready)
            sound = self._judge_epoch(report)
            if self.grow and self._agreed(sound):
                for decision in self.controller.decide(report, self._result.history, self.slots):
                    self._apply(decision)
            if self.surgery is not None:
                await self._operate(val_loader)
        self._result.history.append(report)
        self._stop_if_stalled()
        if self.scheduler is not None:
            self.scheduler.step()
        return report

    def _judge_epoch(self, report: EpochReport) -> bool:
        """Record an epoch that trained nothing or measured a non-finite validation loss as an
        incident (logged as a warning).

        :returns: whether the controller may decide on ``report``.
        """
        sound = True
        if report.steps == 0:
            self._epochs_without_steps += 1
            self._incident(
                IncidentKind.EPOCH_WITHOUT_STEPS, None,
                f"all {report.dropped} steps of epoch {report.epoch} were dropped (bad losses, "
                f"rolled back); {self._epochs_without_steps} such epoch(s) in a row",
            )
            sound = False
        else:
            self._epochs_without_steps = 0
        if not report.val_finite:
            self._incident(
                IncidentKind.NON_FINITE_VALIDATION, None,
                f"validation loss {report.val_loss} in epoch {report.epoch}; the controller is "
                "not asked this epoch",
            )
            sound = False
        return sound

    def _agreed(self, sound: bool) -> bool:
        """``sound`` on every rank, under data parallelism (a :class:`StepConsensus` loss), so
        that every rank asks its controller, or none does (``decide`` may be a collective)."""
        if isinstance(self.loss_fn, StepConsensus):
            return self.loss_fn.agree_all(sound)
        return sound

    def _stop_if_stalled(self) -> None:
        """:raises GovernorError: after ``max_epochs_without_steps`` epochs in a row in which
        every step was dropped: rolling back is not making training sound."""
        limit = self.reliability.max_epochs_without_steps
        if self._epochs_without_steps >= limit:
            raise GovernorError(
                f"every step of the last {self._epochs_without_steps} epoch(s) was dropped (bad "
                f"losses, rolled back), up to epoch {self.epoch}: training makes no progress; "
                "check the data for NaN/Inf and lower the learning rate",
                step=self.step,
            )

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
        batches = 0
        for x, y in train_loader:
            batches += 1
            if self.graft == "step":
                self._graft_ready(ready)
            x, y = x.to(self.device), y.to(self.device)
            with tel.step_span(self.step, epoch=self.epoch):
                started = time.perf_counter()
                loss = await self._guarded_step(x, y)
                tel.metrics.step_finished(time.perf_counter() - started)
            if loss is not None:
                losses.append(loss)
            self.step += 1
            for slot in self.slots.values():
                self._tracked(slot, slot.on_step)
        if batches == 0:
            raise no_batches("training", later=self.epoch > self._first_epoch, epoch=self.epoch)
        self._steps_per_epoch = batches
        train_loss = sum(losses) / len(losses) if losses else None
        report = await self._guarded_evaluate(val_loader, train_loss)
        for slot in self.slots.values():
            slot.lifecycle.epochs_in_state += 1
        return replace(report, steps=len(losses), dropped=batches - len(losses))

    async def _guarded_step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """One training step that survives a failing seed or a bad loss.

        :returns: the loss, or ``None`` when the batch was dropped by a rollback.
        """
        for _ in range(len(self.slots) + 1):  # every retry culls a seed, so this ends
            try:
                # The loss is read before the update (a device sync on a GPU): a bad step must
                # never reach the parameters.
                return await self._steps.run(self._guard.step, x, y)
            except SeedRuntimeError as exc:
                if not self.slots[exc.slot].lifecycle.live:  # a fossilized seed: nothing to cull
                    self._roll_back(LossAnomaly("fossilized seed failed", float("nan")), exc)
                    return None
                self._seed_failed(exc)
            except LossAnomaly as exc:
                self._roll_back(exc, exc.__cause__)
                return None
        raise AssertionError("unreachable: every slot's seed was culled and the step still failed")

    async def _guarded_evaluate(
        self, loader: Iterable[Batch], train_loss: float | None
    ) -> EpochReport:
        """The validation measurements; a seed that fails in them is culled and they are redone."""
        evaluate = partial(self._evaluate, loader, self.epoch, train_loss)
        for _ in range(len(self.slots)):
            try:
                return await anyio.to_thread.run_sync(evaluate)
            except SeedRuntimeError as exc:
                if not self.slots[exc.slot].lifecycle.live:
                    raise
                self._seed_failed(exc)
        return await anyio.to_thread.run_sync(evaluate)

    @torch.no_grad()
    def _evaluate(
        self, loader: Iterable[Batch], epoch: int, train_loss: float | None
    ) -> EpochReport:
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
        if count == 0:
            raise no_batches("validation", later=epoch > self._first_epoch, epoch=epoch)
        n = count
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

    def _apply(self, decision: Decision) -> None:
        slot = self.slots[decision.slot]
        match decision:
            case Germinate(blueprint=blueprint, reason=reason):
                refusal = self._refusal(blueprint)
                if refusal is not None:
                    self._incident(IncidentKind.GERMINATION_REFUSED, slot, refusal, blueprint)
                    return
                self._tracked(slot, slot.germinate, blueprint, reason)
                self._start_compile(slot.slot_name, blueprint)
            case StartBlending(epochs=epochs, reason=reason):
                self._tracked(slot, slot.start_blending, epochs * self._steps_per_epoch, reason)
            case Fossilize(reason=reason):
                self._tracked(slot, slot.fossilize, reason)
                if self.surgery is not None:
                    self.surgery.record_fossilized(self._module_path(slot))
            case Cull(reason=reason):
                self._cull(slot, reason)
            case Release(reason=reason):
                self._tracked(slot, slot.release, reason)

    def _refusal(self, blueprint: Blueprint) -> str | None:
        """Why a germination of ``blueprint`` may not start now (backpressure), or ``None``."""
        if self.epoch + 1 < self._growth_paused_until:
            return f"growth paused until epoch {self._growth_paused_until} after out-of-memory"
        reason = self.admission.refusal()
        if reason is not None:
            return reason
        breaker = self.breakers[blueprint.id]
        if not breaker.allow():
            return f"{blueprint.name} paused by its breaker for {breaker.retry_after():.1f} s more"
        return self.admission.try_start()

    def _start_compile(self, slot: str, blueprint: Blueprint) -> None:
        assert self._tg is not None and self._send is not None  # only during fit()
        self._pending[slot] = blueprint
        self._tg.start_soon(self._compile, slot, blueprint, self._send.clone())

    def _resume_compiles(self) -> None:
        """Start the compile of every germinated slot that has none in flight (after a resume or
        a rollback brought a germination back)."""
        for name, slot in self.slots.items():
            if slot.state is SeedState.GERMINATED and name not in self._pending:
                assert slot.blueprint is not None
                self.admission.reserve()
                self._start_compile(name, slot.blueprint)

    def _cull(self, slot: SeedSlot, reason: str, *, release: bool = False) -> None:
        """Cull ``slot``'s seed and embargo the slot (``release``: free it again at once)."""
        seed = self._tracked(slot, slot.cull, reason)
        if seed is not None:
            remove_module_params(self.optimizer, seed)
            self._rewrap()
        self._tracked(slot, slot.embargo, "cooling down after cull")
        if release:
            self._tracked(slot, slot.release, "nothing was grafted; the blueprint's breaker "
                          "decides when it is tried again")
        self.admission.set_loaded(self._loaded_bytes())

    async def _compile(
        self, slot: str, blueprint: Blueprint, send: MemoryObjectSendStream[_Compiled]
    ) -> None:
        contract = self.slots[slot].contract
        assert contract is not None  # germinate() checked it
        rel = self.reliability

        def retried(exc: BaseException, attempt: int, delay: float) -> None:
            self._incident(
                IncidentKind.COMPILE_RETRIED, self.slots[slot],
                f"attempt {attempt} failed ({exc}); retrying in {delay:.2f} s", blueprint,
            )

        async with send:
            error: EsperError
            try:
                kernel = await retry(
                    lambda: self.compiler.compile(blueprint, contract, seed=self.seed),
                    attempts=rel.compile_attempts, backoff=rel.backoff, retry_on=_transient,
                    what=f"compile {blueprint.name}", on_retry=retried,
                )
                # load_kernel serialises loads itself, across every caller in the process.
                module = await anyio.to_thread.run_sync(
                    lambda: load_kernel(kernel, device=self.device)
                )
            except EsperError as exc:
                error = exc
            except Exception as exc:  # an unmapped dependency error must not end the run
                error = CompileError(
                    f"compiling {blueprint.name}: {exc!r}", blueprint=blueprint.name
                )
                error.__cause__ = exc
            else:
                await send.send(_Compiled(slot, blueprint, kernel, module, None))
                return
            log.warning("compile failed", slot=slot, blueprint=blueprint.name, error=str(error))
            await send.send(_Compiled(slot, blueprint, None, None, error))

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
        self.admission.finished()
        if self._pending.get(done.slot) == done.blueprint:
            del self._pending[done.slot]
        slot = self.slots[done.slot]
        if slot.state is not SeedState.GERMINATED or slot.blueprint != done.blueprint:
            return  # the slot moved on (e.g. culled) while the kernel compiled
        breaker = self.breakers[done.blueprint.id]
        if done.module is None or done.kernel is None:
            breaker.record_failure(str(done.error))
            if isinstance(done.error, CompileTimeoutError):
                self._incident(IncidentKind.COMPILE_TIMEOUT, slot, str(done.error), done.blueprint)
                self._cull(slot, f"compile timed out: {done.error}", release=True)
            else:
                self._incident(IncidentKind.COMPILE_FAILED, slot, str(done.error), done.blueprint)
                self._cull(slot, f"compile failed: {done.error}")
            return
        try:
            self._tracked(slot, slot.graft, done.module, done.kernel.kernel_id)
            add_module_params(self.optimizer, done.module)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            self._seed_failed(SeedRuntimeError(f"grafting: {exc}", slot=slot.slot_name), exc)
            return
        self.kernels[done.kernel.kernel_id] = done.kernel
        self._oom_pause = self.reliability.oom_backoff_epochs  # a graft went through: reset
        if breaker.state is not BreakerState.CLOSED:
            breaker.record_success()  # the half-open trial went through
        self._rewrap()
        self.admission.set_loaded(self._loaded_bytes())

    # --- surgery: architecture changes, at epoch boundaries -------------------------------------

    async def _operate(self, val_loader: Iterable[Batch]) -> None:
        """Apply the surgery policy's proposal, if it has one, in one transaction (between steps:
        the training task, the model's only writer, is here). A refused proposal changes nothing.
        """
        assert self.surgery is not None
        operation = self.surgery.propose(self.model)
        if operation is None:
            return
        batch = next(iter(val_loader), None)
        if batch is None:  # nothing to validate the change on: ask again at the next boundary
            return
        probe = batch[0][:_SURGERY_PROBE].to(self.device)
        before = self.param_count()
        with self.telemetry.span(
            SPAN_SURGERY, surgery__op=operation.describe(), slot=operation.target,
            epoch=self.epoch, step=self.step,
        ) as span:
            refusal: SurgeryError | None = None
            try:
                await self.surgeon.apply(self.model, self.optimizer, operation, probe=probe)
            except SurgeryError as exc:
                refusal = exc
            self._agree_on_surgery(operation, committed=refusal is None)
            if refusal is not None:
                self.surgery.rejected(operation)
                span.set_attribute("esper.outcome", "rejected")
                with self.telemetry.span(
                    SPAN_ROLLBACK, surgery__op=operation.describe(),
                    error__type=type(refusal).__name__,
                ):
                    pass
                log.warning(
                    "surgery rejected", operation=operation.describe(), error=str(refusal),
                    epoch=self.epoch, step=self.step,
                )
                return
            self.surgery.committed(operation)
            self.surgeries.append(operation_record(operation))
            self._rewrap()
            added = self.param_count() - before
            span.set_attribute("esper.outcome", "committed")
            span.set_attribute("esper.params.added", added)
            self.telemetry.metrics.params_added(added, slot=operation.target)
            log.info(
                "surgery", operation=operation.describe(), params_before=before,
                params_after=before + added, epoch=self.epoch, step=self.step,
            )
        # The last snapshot has the old shapes: a rollback must land on the new structure.
        if not self.governor.offer(await self._snapshot()):
            self.governor.snapshot = None

    def _module_path(self, module: nn.Module) -> str:
        """``module``'s dotted path in the model (a slot's name is its path in the module that
        :func:`~esper_async.wrap` was given, which may sit deeper in the trainer's model)."""
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"{type(module).__name__} is not part of the trainer's model")

    def _agree_on_surgery(self, operation: Any, *, committed: bool) -> None:
        """Under data parallelism (a :class:`StepConsensus` loss), check that every rank reached
        the same outcome. Every rank validated the same operation on the same probe and equal
        parameters, so they agree unless numerics differ between devices; if they do not, the
        models now differ and the run stops here, on every rank, rather than hang in DDP.

        :raises EsperError: some rank committed the operation and another refused it.
        """
        if not isinstance(self.loss_fn, StepConsensus):
            return
        everywhere = self.loss_fn.agree_all(committed)
        nowhere = self.loss_fn.agree_all(not committed)
        if not (everywhere or nowhere):
            raise EsperError(
                f"surgery {operation.describe()} was committed on some ranks and refused on "
                "others: the ranks' models differ; resume from the last checkpoint"
            )

    # --- faults: seeds that fail, losses that go bad -------------------------------------------

    def _incident(
        self, kind: IncidentKind, slot: SeedSlot | None, detail: str,
        blueprint: Blueprint | None = None,
    ) -> None:
        bp = blueprint or (None if slot is None else slot.blueprint)
        incident = Incident(
            self.epoch, self.step, kind, None if slot is None else slot.slot_name,
            None if bp is None else bp.name, detail,
        )
        self._result.incidents.append(incident)
        log.warning("incident", **incident.to_json())

    def _seed_failed(self, exc: SeedRuntimeError, cause: BaseException | None = None) -> None:
        """A seed raised, turned non-finite or ran out of memory: cull it (and after an OOM,
        pause growth, doubling the pause each time)."""
        slot = self.slots[exc.slot]
        if is_out_of_memory(cause or exc):
            kind = IncidentKind.OUT_OF_MEMORY
            self._growth_paused_until = self.epoch + 1 + self._oom_pause
            self._oom_pause = min(2 * self._oom_pause, self.reliability.oom_backoff_max_epochs)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif exc.__cause__ is not None:
            kind = IncidentKind.SEED_RAISED
        else:
            kind = IncidentKind.SEED_NON_FINITE
        self._incident(kind, slot, str(exc))
        if slot.blueprint is not None:
            self.breakers[slot.blueprint.id].record_failure(kind.value)
        if slot.seed is not None:
            self._faulty.add(id(slot.seed))
        self._cull(slot, f"{kind.value}: {exc}")

    def _roll_back(self, anomaly: LossAnomaly, cause: BaseException | None = None) -> None:
        """Restore the last good snapshot and embargo what caused the bad loss.

        :raises GovernorError: when the epoch's rollback budget is spent.
        """
        kind = IncidentKind.LOSS_SPIKE if anomaly.kind == "spike" else IncidentKind.NON_FINITE_LOSS
        culprit = None if anomaly.culprit is None else self.slots[anomaly.culprit]
        snapshot = self.governor.snapshot
        to = "no snapshot to roll back to" if snapshot is None else f"back to step {snapshot.step}"
        self._incident(kind, culprit, f"{anomaly}; {to}")
        if not self.governor.note_rollback():
            raise GovernorError(
                f"{self.governor.rollbacks_this_epoch - 1} rollbacks in epoch {self.epoch} did not "
                f"make training sound ({anomaly}); lower the learning rate or check the data",
                step=self.step,
            ) from cause or anomaly
        if snapshot is not None:
            snapshot.restore(self.model, self.optimizer, self.slots, self._extras())
            self._resume_compiles()
            for slot in self.slots.values():  # seeds culled for faults since stay culled
                if slot.seed is not None and id(slot.seed) in self._faulty and slot.lifecycle.live:
                    self._cull(slot, "culled for a fault before the rollback")
        if culprit is not None and culprit.lifecycle.live:
            if culprit.blueprint is not None:
                self.breakers[culprit.blueprint.id].record_failure(kind.value)
            self._cull(culprit, f"caused a {kind.value} (loss {anomaly.loss:.4g})")
        # A fresh wrapper even with nothing restored: a DDP whose forward raised mid-way on one
        # rank keeps per-step state the other ranks' wrappers do not (see StepConsensus).
        self._rewrap()
        self.admission.set_loaded(self._loaded_bytes())

    def _loaded_bytes(self) -> int:
        return sum(
            self.kernels[s.kernel_id].nbytes for s in self.slots.values()
            if s.seed is not None and s.kernel_id in self.kernels
        )

    # --- snapshots and checkpoints, at epoch boundaries -----------------------------------------

    def _extras(self) -> dict[str, Any]:
        return {} if self.scheduler is None else {"scheduler": self.scheduler}

    async def _snapshot(self) -> Snapshot:
        """A copy of the state now, taken in a worker thread (the model is not changing: this
        task, its only writer, is waiting)."""
        return await anyio.to_thread.run_sync(
            Snapshot.take, self.step, self.model, self.optimizer, self.slots, self._extras()
        )

    async def _end_epoch(
        self, epoch: int, checkpoints: CheckpointStore | None, every: int, last: bool,
        generator: torch.Generator | None,
    ) -> None:
        if self.governor.due(epoch) and self.governor.offer(await self._snapshot()):
            live = {s.kernel_id for s in self.slots.values() if s.kernel_id is not None}
            self.kernels = {k: v for k, v in self.kernels.items() if k in live}
            self._faulty.clear()
        due = (epoch + 1) % max(1, every) == 0 or last or self._checkpoint_requested
        if checkpoints is not None and due:
            self._checkpoint_requested = False
            if not self.writes_checkpoints:
                return
            await self.save_checkpoint(checkpoints.directory, generator=generator)

    async def save_checkpoint(
        self, directory: str | os.PathLike[str], *, generator: torch.Generator | None = None
    ) -> Path | None:
        """Write a checkpoint of the run now (call between epochs, or from ``on_epoch``).

        A write that fails is recorded as an incident; the previous checkpoint stands.

        :param directory: the checkpoint directory.
        :param generator: the training loader's RNG, to resume its order.
        :returns: the file written, or ``None`` if the write failed.
        """
        payload = await anyio.to_thread.run_sync(checkpoint_payload, self, generator)
        store = CheckpointStore(directory, keep=self.reliability.checkpoint_keep)
        try:
            return await anyio.to_thread.run_sync(store.save, payload)
        except CheckpointError as exc:
            self._incident(IncidentKind.CHECKPOINT_FAILED, None, str(exc))
            return None

    def restore(
        self, checkpoint: str | os.PathLike[str], *, generator: torch.Generator | None = None
    ) -> Restored:
        """Restore the run from ``checkpoint`` (a file, or a directory: its newest checkpoint that
        restores).

        The model must be built and wrapped as the checkpointed one was; grafted and fossilized
        seeds are loaded from the kernel bytes in the checkpoint (nothing is compiled), and the
        surgeries the checkpoint records are replayed on the model first (build it afresh). Then
        :meth:`fit` with the same ``epochs`` trains the epochs left.

        Every file is verified against its digest before it is read. From a directory, a
        checkpoint that is damaged or does not restore is skipped with a warning naming it, and
        the one before it is used.

        :param checkpoint: a checkpoint file, or a checkpoint directory.
        :param generator: the training loader's RNG, to resume its order.
        :raises CheckpointError: if there is no checkpoint, or none restores (the error lists
            each file tried and why; a ``CheckpointMismatchError`` when the files are sound but
            the model does not fit them).
        """
        path = Path(checkpoint)
        is_file = path.is_file()  # a path that does not exist names a directory with none
        store = CheckpointStore(path.parent if is_file else path)
        used, restored = store.restore(
            lambda p, payload: apply_checkpoint(self, payload, generator, str(p)),
            path if is_file else None,
        )
        self.admission.set_loaded(self._loaded_bytes())
        self._rewrap()
        log.info("resumed", checkpoint=str(used), epoch=restored.epoch, step=restored.step)
        return restored

    def _rewrap(self) -> None:
        """Set :attr:`runner`, the module training steps call: the model, wrapped anew if a
        wrapper is set (after every change of structure)."""
        self.runner = self.model if self.wrap_model is None else self.wrap_model(self.model)

    def param_count(self) -> int:
        """Trainable parameters of the model now, seeds included."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
