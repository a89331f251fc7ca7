"""``Grower``: the growth engine, for any training loop.

It owns everything about seeds that is not the training step: compiles in flight (in a task group
that ``async with grower:`` opens and closes), grafting finished kernels at step or epoch
boundaries, culls, admission control and per-blueprint breakers, the controller's decisions, the
lifecycle events, snapshots for rollback, and (optionally) surgery. The loop that calls it stays
the only writer of the model: the grower changes the model only inside :meth:`Grower.after_step`
and :meth:`Grower.end_epoch`, i.e. between steps.

A hand-written loop::

    async with Grower(model, optimizer) as grower:
        for epoch in range(epochs):
            for x, y in train:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                grower.after_step(loss)
            report = await grower.end_epoch(val)

:class:`~esper_async.Trainer` is this loop with guarded steps, rollbacks and checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine, Iterable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from types import TracebackType
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
    EndWidthTrial,
    EpochReport,
    Fossilize,
    Germinate,
    GrowWidth,
    HeuristicController,
    Release,
    StartBlending,
)
from ..errors import (
    CompileError,
    CompileTimeoutError,
    EsperError,
    LoaderError,
    SeedRuntimeError,
    SurgeryError,
)
from ..kernels import Kernel, load_kernel
from ..reliability import (
    Admission,
    BreakerBoard,
    BreakerState,
    Governor,
    GovernorError,
    Snapshot,
    retry,
)
from ..reliability._config import ReliabilityConfig
from ..reliability._errors import LossAnomaly, is_out_of_memory
from ..reliability._incidents import Incident, IncidentKind
from ..seeds import SeedSlot, SeedState, find_slots
from ..surgery import ModelSurgeon, SurgeryPolicy, SurgeryPolicyConfig, WidenSlot
from ..surgery._replay import operation_record
from ..telemetry import SPAN_EPOCH, SPAN_LIFECYCLE, SPAN_ROLLBACK, SPAN_SURGERY, Telemetry
from ._bounded_eval import bounded_evaluate, strided  # issue 28: bounded evaluation
from ._eager_graft import awaits_kernel, eager_for, start_eager, swap_in_kernel  # issue 28
from ._guard import StepConsensus
from ._loaders import no_batches
from ._optim import add_module_params, remove_module_params
from ._results import FitResult, GrowthEvent
from ._task import ClassificationTask, Task
from ._widths import WidthTrial, example_flops, grow_width_operation, measure_widths

__all__ = ("Grower",)

log = structlog.get_logger(__name__)

#: Finished compiles waiting for a step boundary. Small: at most a few seeds germinate at once.
_READY_BUFFER = 16
#: Validation examples a surgery's probe batch takes.
_SURGERY_PROBE = 64
#: ``graft_deadline_epochs`` with ``graft="step"`` when none is given.
_DEFAULT_DEADLINE = 2


@dataclass(frozen=True)
class _Compiled:
    slot: str
    blueprint: Blueprint
    kernel: Kernel | None
    module: nn.Module | None
    error: EsperError | None


def _transient(exc: BaseException) -> bool:
    """Whether a compile failure may pass if tried again: its workers died, not the blueprint."""
    if isinstance(exc, EsperError):
        return isinstance(exc, CompileError) and isinstance(exc.__cause__, WorkerDiedError)
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


class Grower:
    """Grow seeds in a wrapped model while any loop trains it.

    :param model: the host, wrapped with :func:`esper_async.wrap`.
    :param optimizer: the loop's optimizer; seeds' parameters are added to it when they are
        grafted and removed when they are culled.
    :param task: how batches are read, losses computed and figures measured in
        :meth:`end_epoch`; default :class:`ClassificationTask`.
    :param controller: decides growth at epoch boundaries; default
        :class:`~esper_async.HeuristicController` seeded with ``seed``.
    :param compiler: turns blueprints into kernels; default :class:`BlueprintCompiler`.
    :param grow: whether to grow at all (``False``: epochs are measured, nothing grows).
    :param device: where the model and batches live (default: the model's parameters' device).
    :param seed: RNG seed of the kernels' initial weights and of the default controller.
    :param graft: ``"epoch"`` (default): finished kernels enter their slots at the first epoch
        boundary after germination (reproducible whatever the compile latency); ``"step"``: at
        the first step boundary after they are ready; ``"eager"`` (issue 28): a seed trains at
        once as its blueprint's eager module and its validated kernel takes over its parameters
        when ready (reproducible whatever the latency; see ``docs/async.md``).
    :param graft_deadline_epochs: with ``graft="step"``, a kernel still compiling this many epochs
        after germination is waited for (default 2).
    :param telemetry: the run's telemetry; default: recorded nowhere.
    :param wrap_model: rebuilds the module steps should call (e.g. DDP) after every structural
        change; :attr:`runner` is the current one.
    :param scheduler: a learning-rate scheduler that :meth:`end_epoch` steps once per epoch and
        rollbacks restore.
    :param reliability: breakers, compile retries, resource limits, the governor.
    :param surgery: architecture changes at epoch boundaries (see ``docs/surgery.md``).
    :raises ValueError: ``graft`` is not ``"epoch"``, ``"step"`` or ``"eager"``;
        ``graft_deadline_epochs`` is given with ``graft="epoch"`` (which always waits at the
        first boundary) or is below 1;
        ``graft="eager"`` under data parallelism (a task whose loss is a ``StepConsensus``);
        or the surgery policy's ``fossil_threshold`` exceeds 1.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        task: Task | None = None,
        controller: Controller | None = None,
        compiler: BlueprintCompiler | None = None,
        grow: bool = True,
        device: torch.device | str | None = None,
        seed: int = 0,
        graft: Literal["epoch", "step", "eager"] = "epoch",  # issue 28: "eager"
        graft_deadline_epochs: int | None = None,
        telemetry: Telemetry | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        reliability: ReliabilityConfig | None = None,
        surgery: SurgeryPolicyConfig | SurgeryPolicy | None = None,
    ) -> None:
        if graft not in ("epoch", "step", "eager"):  # issue 28: "eager"
            raise ValueError(f"graft must be 'epoch', 'step' or 'eager', got {graft!r}")
        if graft == "epoch" and graft_deadline_epochs is not None:
            raise ValueError(
                "graft_deadline_epochs applies to graft='step' only: graft='epoch' always grafts "
                "at the first epoch boundary after germination; drop it or use graft='step'"
            )
        if graft_deadline_epochs is not None and graft_deadline_epochs < 1:
            raise ValueError(
                f"graft_deadline_epochs must be at least 1, got {graft_deadline_epochs}"
            )
        if isinstance(surgery, SurgeryPolicyConfig):
            surgery = SurgeryPolicy(surgery, step=lambda: self.step)
        if surgery is not None and surgery.config.fossil_threshold > 1:
            raise ValueError(
                f"surgery fossil_threshold={surgery.config.fossil_threshold} can never be reached: "
                "fossils are reported per seed slot, and a slot fossilizes at most once; "
                "use fossil_threshold=1"
            )
        self.device = _model_device(model) if device is None else torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.task: Task = task or ClassificationTask()
        loss_fn = getattr(self.task, "loss_fn", None)
        #: The task's loss when it is a collective over ranks (then decisions are agreed on).
        self.consensus = loss_fn if isinstance(loss_fn, StepConsensus) else None
        if graft == "eager" and self.consensus is not None:  # issue 28
            raise ValueError(
                "graft='eager' swaps each kernel in when it arrives, at a different step on each "
                "rank (DDP is rebuilt then); under data parallelism use graft='epoch'"
            )
        self.telemetry = telemetry or Telemetry(tracer_provider=TracerProvider())
        self.controller: Controller = controller or HeuristicController(
            seed=seed, telemetry=self.telemetry
        )
        self.compiler = compiler or BlueprintCompiler(
            device=str(self.device), telemetry=self.telemetry
        )
        self.grow = grow
        self.seed = seed
        self.graft = graft
        self.graft_deadline_epochs = (
            1 if graft == "epoch" else graft_deadline_epochs or _DEFAULT_DEADLINE
        )
        self.slots: dict[str, SeedSlot] = find_slots(model)
        self.wrap_model = wrap_model
        self.scheduler = scheduler
        self.reliability = rel = reliability or ReliabilityConfig()
        self.breakers = BreakerBoard(rel.breaker, clock=rel.clock)
        self.governor = Governor(rel.governor)
        self.admission = Admission(rel.limits)
        self.surgery = surgery
        self.surgeon = ModelSurgeon()
        #: Every surgery committed on the model, as records (checkpoints carry them for replay).
        self.surgeries: list[dict[str, Any]] = []
        #: Widenings on trial (width growth), by slot: how to ablate their new units.
        self.width_trials: dict[str, WidthTrial] = {}
        #: Every kernel loaded in a slot (and in the last snapshot), by id.
        self.kernels: dict[str, Kernel] = {}
        #: The run's record: reports, lifecycle events, incidents.
        self.result = FitResult()
        self.step = 0
        self.epoch = 0
        #: Where the run's epochs started (a resumed run starts later): for loader messages.
        self.first_epoch = 0
        self.steps_per_epoch = 1
        self._epoch_steps = 0
        self._epoch_losses: list[float] = []
        self._epoch_loss_sum: torch.Tensor | None = None  # tensor losses, summed on the device
        self._epoch_loss_count = 0
        self._epoch_dropped = 0
        self._epochs_without_steps = 0
        self._pending: dict[str, Blueprint] = {}
        self._faulty: set[int] = set()
        self._growth_paused_until = 0
        self._oom_pause = rel.oom_backoff_epochs
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[_Compiled] | None = None
        self._ready: MemoryObjectReceiveStream[_Compiled] | None = None
        self._stack: AsyncExitStack | None = None
        self._epoch_span: ExitStack | None = None
        self._epoch_span_obj: Any = None
        self._ended = False  # the epoch :attr:`epoch` names has ended: the next one is +1
        self.rewrap()

    # --- the context: compiles in flight --------------------------------------------------------

    async def __aenter__(self) -> Grower:
        """Start the compiler and the task group compiles run in; take the first snapshot."""
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self.grow:
                await stack.enter_async_context(self.compiler)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            send, ready = anyio.create_memory_object_stream[_Compiled](_READY_BUFFER)
            self._send = await stack.enter_async_context(send)
            self._ready = await stack.enter_async_context(ready)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._pending.clear()
        self.admission.in_flight = 0
        self._resume_compiles()
        self.governor.offer(await self._snapshot())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Cancel the compiles still running (they are not needed any more) and close."""
        if kind is None:  # issue 28: seeds still running eagerly get their kernels first
            await self.await_eager_kernels()
        self._close_epoch_span()
        stack, self._stack = self._stack, None
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        self._tg = self._send = self._ready = None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(kind, exc, tb)
        except BaseExceptionGroup as group:
            # The task group wraps what the loop raised: give callers the error itself.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from group.exceptions[0].__cause__
            raise

    async def start_background(self, fn: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        """Start ``fn`` in the grower's task group, beside the compiles: it runs until the
        grower exits, which cancels it (a monitor, e.g. ``monitor_loop_lag``). ``fn`` is
        started with anyio's ``TaskGroup.start``, so it must call ``task_status.started()``.

        :param fn: an async function taking ``task_status=``.
        :raises RuntimeError: called outside ``async with grower:``.
        """
        if self._tg is None:
            raise RuntimeError("Grower.start_background works only inside `async with grower:`")
        await self._tg.start(fn)

    # --- the loop's calls -----------------------------------------------------------------------

    def begin_epoch(self) -> None:
        """Open the epoch (its span; the governor's per-epoch budget). Optional: the first
        :meth:`after_step` of an epoch opens it."""
        if self._epoch_span is not None:
            return
        if self._ended:
            self.epoch += 1
            self._ended = False
        self.governor.new_epoch()
        self._epoch_span = ExitStack()
        self._epoch_span_obj = self._epoch_span.enter_context(
            self.telemetry.span(SPAN_EPOCH, epoch=self.epoch)
        )

    def after_step(self, loss: float | torch.Tensor | None = None, *, updated: bool = True) -> None:
        """Call after every optimizer step (between steps: the model is not changing).

        Advances the seeds' blending ramps and, with ``graft="step"``, grafts kernels that
        finished compiling.

        :param loss: the step's training loss (for the epoch's ``train_loss``), if known; a
            tensor is summed where it lives and read once, at the end of the epoch (no host
            sync per step).
        :param updated: whether the step updated the model (``False``: it was dropped).
        """
        self.begin_epoch()
        self._epoch_steps += 1
        if updated:
            if isinstance(loss, torch.Tensor):  # summed on its device, read at the epoch's end
                value = loss.detach().double()  # the same sum as of the values read one by one
                total = self._epoch_loss_sum
                self._epoch_loss_sum = value if total is None else total + value
                self._epoch_loss_count += 1
            elif loss is not None:
                self._epoch_losses.append(float(loss))
        else:
            self._epoch_dropped += 1
        self.step += 1
        for slot in self.slots.values():
            self._tracked(slot, slot.on_step)
        if self.graft in ("step", "eager"):  # issue 28: "eager" swaps kernels in here
            self.graft_ready()

    async def end_epoch(self, val_loader: Iterable[Any]) -> EpochReport:
        """Close the epoch: measure on ``val_loader`` (with counterfactuals for blended seeds),
        graft the kernels due, apply the controller's decisions (and surgery), snapshot.

        :param val_loader: validation batches, as the task reads them (at least one).
        :returns: the epoch's report (also appended to :attr:`result`'s history).
        :raises LoaderError: ``val_loader`` yielded no batches, or no step was reported with
            :meth:`after_step` this epoch.
        :raises GovernorError: every step was dropped for too many epochs in a row.
        """
        if self._epoch_steps == 0:
            raise LoaderError(
                f"epoch {self.epoch} ended with no step reported: call grower.after_step() after "
                "every optimizer step", loader="training",
            )
        self.begin_epoch()
        assert self._epoch_span is not None
        steps = self._epoch_steps - self._epoch_dropped
        losses = self._epoch_losses
        count = len(losses) + self._epoch_loss_count
        total = sum(losses) + (0.0 if self._epoch_loss_sum is None else float(self._epoch_loss_sum))
        train_loss = total / count if count else None
        report = await self._measure(val_loader, train_loss, steps, self._epoch_dropped)
        for slot in self.slots.values():
            slot.lifecycle.epochs_in_state += 1
        self.steps_per_epoch = self._epoch_steps
        self._epoch_steps, self._epoch_losses, self._epoch_dropped = 0, [], 0
        self._epoch_loss_sum, self._epoch_loss_count = None, 0
        try:
            await self._await_late_kernels()
            sound = self._judge_epoch(report)
            if self.grow and self._agreed(sound):
                for decision in self.controller.decide(report, self.result.history, self.slots):
                    if isinstance(decision, GrowWidth):
                        await self._grow_width(decision, val_loader)
                    else:
                        self.apply(decision)
            if self.surgery is not None:
                await self._operate(val_loader)
        finally:
            if self._epoch_span_obj is not None:  # the dashboard's curves and the epoch gauges
                self.telemetry.epoch_figures(
                    report, params=self.param_count(), span=self._epoch_span_obj
                )
            self._close_epoch_span(loss=report.val_loss)
        self.result.history.append(report)
        self._stop_if_stalled()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.governor.due(self.epoch) and self.governor.offer(await self._snapshot()):
            live = {s.kernel_id for s in self.slots.values() if s.kernel_id is not None}
            self.kernels = {k: v for k, v in self.kernels.items() if k in live}
            self._faulty.clear()
        self._ended = True
        return report

    def _close_epoch_span(self, loss: float | None = None) -> None:
        span_stack, self._epoch_span = self._epoch_span, None
        if span_stack is not None:
            if loss is not None:
                self._epoch_span_obj.set_attribute("esper.loss", loss)
            span_stack.close()
        self._epoch_span_obj = None

    async def settle(self, how: Literal["judge", "cull", "keep"]) -> None:
        """Decide the seeds still alive at the end of training.

        :param how: ``"judge"``: a blended seed is kept if its counterfactual gain (last report)
            exceeds the controller's margin (or is positive), culled otherwise, and an unblended
            one is culled; ``"cull"``: every live seed is culled; ``"keep"``: nothing changes.
        :raises ValueError: ``how`` is none of these.
        """
        if how not in ("judge", "cull", "keep"):
            raise ValueError(f"settle must be 'judge', 'cull' or 'keep', got {how!r}")
        await self.await_eager_kernels()  # issue 28: the run ends on validated kernels
        if how == "keep":
            return
        last = self.result.history[-1] if self.result.history else None
        margin = getattr(getattr(self.controller, "config", None), "fossilize_margin", 0.0)
        for name, slot in self.slots.items():
            if not slot.lifecycle.live:
                continue
            cf = None if last is None else last.counterfactual.get(name)
            if how == "judge" and slot.state is SeedState.PROBATION and cf is not None and (
                math.isfinite(cf.loss_with) and cf.loss_gain > margin
            ):
                self.apply(Fossilize(name, f"settled at the end: gain {cf.loss_gain:.4f}"))
            else:
                self.apply(Cull(name, f"settled at the end ({how}) in state {slot.state.value}"))

    # --- faults the loop reports ----------------------------------------------------------------

    def seed_failed(self, exc: SeedRuntimeError, cause: BaseException | None = None) -> None:
        """A seed raised, turned non-finite or ran out of memory: cull it (after an OOM, pause
        growth, doubling the pause each time). Call between steps.

        :param exc: the error the slot raised.
        :param cause: the underlying error, when it is not ``exc.__cause__``.
        """
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
        self.incident(kind, slot, str(exc))
        if slot.blueprint is not None:
            self.breakers[slot.blueprint.id].record_failure(kind.value)
        if slot.seed is not None:
            self._faulty.add(id(slot.seed))
        self._cull(slot, f"{kind.value}: {exc}")

    def roll_back(self, anomaly: LossAnomaly, cause: BaseException | None = None) -> None:
        """Restore the last good snapshot and embargo what caused the bad loss.

        :param anomaly: what was wrong with the loss (and the culprit seed, if one was found).
        :param cause: the underlying error, if any.
        :raises GovernorError: when the epoch's rollback budget is spent.
        """
        kind = IncidentKind.LOSS_SPIKE if anomaly.kind == "spike" else IncidentKind.NON_FINITE_LOSS
        culprit = None if anomaly.culprit is None else self.slots[anomaly.culprit]
        snapshot = self.governor.snapshot
        to = "no snapshot to roll back to" if snapshot is None else f"back to step {snapshot.step}"
        self.incident(kind, culprit, f"{anomaly}; {to}")
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
        self.rewrap()
        self.admission.set_loaded(self._loaded_bytes())

    def incident(
        self, kind: IncidentKind, slot: SeedSlot | None, detail: str,
        blueprint: Blueprint | None = None,
    ) -> None:
        """Record a fault met and what was done about it (logged as a warning)."""
        bp = blueprint or (None if slot is None else slot.blueprint)
        incident = Incident(
            self.epoch, self.step, kind, None if slot is None else slot.slot_name,
            None if bp is None else bp.name, detail,
        )
        self.result.incidents.append(incident)
        log.warning("incident", **incident.to_json())

    # --- state, for checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The grower's own counters and its committed surgeries (JSON-ready). The model, the
        optimizer, the slots and :meth:`stateful` objects are captured beside it."""
        return {
            "growth_paused_until": self._growth_paused_until, "oom_pause": self._oom_pause,
            "surgery": list(self.surgeries),
            "width_trials": {k: t.to_json() for k, t in self.width_trials.items()},
        }

    def stateful(self) -> dict[str, Any]:
        """Everything with a ``state_dict()`` a checkpoint carries beside the model."""
        controller = self.controller if hasattr(self.controller, "state_dict") else None
        return {
            "controller": controller, "scheduler": self.scheduler, "governor": self.governor,
            "breakers": self.breakers, "surgery": self.surgery,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters :meth:`state_dict` returned (the record's surgery list is
        replayed by the caller before tensors are loaded)."""
        self._growth_paused_until = int(state["growth_paused_until"])
        self._oom_pause = int(state["oom_pause"])
        self.surgeries = list(state.get("surgery", []))
        self.width_trials = {
            str(k): WidthTrial.from_json(v) for k, v in state.get("width_trials", {}).items()
        }

    def resume_at(self, *, epoch: int, step: int) -> None:
        """Continue the run at ``epoch`` (the next to train) and global ``step``."""
        self.epoch, self.step, self._ended = epoch, step, False
        self.first_epoch = epoch

    def restored(self) -> None:
        """Bring derived state up to date after the model and slots were restored."""
        self.admission.set_loaded(self._loaded_bytes())
        self.rewrap()

    # --- growth: decisions and kernels, applied at step boundaries ------------------------------

    def rewrap(self) -> None:
        """Set :attr:`runner`, the module steps call: the model, wrapped anew if a wrapper is
        set (after every change of structure)."""
        self.runner = self.model if self.wrap_model is None else self.wrap_model(self.model)

    def param_count(self) -> int:
        """Trainable parameters of the model now, seeds included."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _tracked(self, slot: SeedSlot, action: Callable[..., Any], *args: Any) -> Any:
        """Run a lifecycle action on ``slot`` and record the transitions it made."""
        before = len(slot.lifecycle.history)
        out = action(*args)
        for source, target, reason in slot.lifecycle.history[before:]:
            event = GrowthEvent(
                self.epoch, self.step, slot.slot_name, source.value, target.value, reason
            )
            self.result.events.append(event)
            with self.telemetry.span(
                SPAN_LIFECYCLE, slot=event.slot, lifecycle__from=event.source,
                lifecycle__to=event.target, reason=reason, step=event.step, epoch=event.epoch,
                blueprint=None if slot.blueprint is None else slot.blueprint.name,
                kernel_id=slot.kernel_id,
            ):
                self.telemetry.metrics.seed_transition(source, target)
            log.info(
                "lifecycle", slot=event.slot, source=event.source, target=event.target,
                reason=reason, epoch=event.epoch, step=event.step,
            )
        return out

    def apply(self, decision: Decision) -> None:
        """Apply one decision now (between steps)."""
        slot = self.slots[decision.slot]
        match decision:
            case Germinate(blueprint=blueprint, reason=reason):
                refusal = self._refusal(blueprint)
                if refusal is not None:
                    self.incident(IncidentKind.GERMINATION_REFUSED, slot, refusal, blueprint)
                    return
                self._tracked(slot, slot.germinate, blueprint, reason)
                if self.graft == "eager":  # issue 28: train at once as the eager module
                    start_eager(slot, seed=self.seed, device=self.device,
                                optimizer=self.optimizer, tracked=self._tracked)
                    self.rewrap()
                self._start_compile(slot.slot_name, blueprint)
            case StartBlending(epochs=epochs, reason=reason):
                self._tracked(slot, slot.start_blending, epochs * self.steps_per_epoch, reason)
            case Fossilize(reason=reason):
                self._tracked(slot, slot.fossilize, reason)
                if self.surgery is not None:
                    self.surgery.record_fossilized(self._module_path(slot))
            case Cull(reason=reason):
                self._cull(slot, reason)
            case Release(reason=reason):
                self._tracked(slot, slot.release, reason)
            case EndWidthTrial(reason=reason):
                if self.width_trials.pop(decision.slot, None) is not None:
                    log.info("width trial ended", slot=decision.slot, reason=reason,
                             epoch=self.epoch)
            case GrowWidth():
                raise ValueError(
                    f"GrowWidth({decision.slot!r}) is surgery: it runs in end_epoch (it needs a "
                    "validation batch and a transaction), not through Grower.apply"
                )

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
        if self._tg is None or self._send is None:
            raise RuntimeError("a Grower compiles only inside `async with grower:`")
        self._pending[slot] = blueprint
        self._tg.start_soon(self._compile, slot, blueprint, self._send.clone())

    def _resume_compiles(self) -> None:
        """Start the compile of every germinated slot that has none in flight."""
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
            self.rewrap()
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
            self.incident(
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

    async def await_eager_kernels(self) -> None:
        """Wait for the kernels of seeds still running as their eager module (``graft="eager"``)
        and swap them in (issue 28: called by :meth:`settle` and on leaving the context)."""
        while self._ready is not None and any(
            awaits_kernel(s, self._pending) for s in self.slots.values()
        ):
            self._graft(await self._ready.receive())  # every compile sends exactly one message

    def graft_ready(self) -> None:
        """Graft every kernel that finished compiling (between steps only)."""
        if self._ready is None:
            return
        while True:
            try:
                self._graft(self._ready.receive_nowait())
            except anyio.WouldBlock:
                return

    async def _await_late_kernels(self) -> None:
        """Wait for kernels whose seeds germinated ``graft_deadline_epochs`` or more epochs ago."""
        deadline = self.graft_deadline_epochs
        while self._ready is not None and any(
            s.state is SeedState.GERMINATED and s.lifecycle.epochs_in_state >= deadline
            for s in self.slots.values()
        ):
            # Every compile task sends exactly one message (kernel or error), so this ends.
            self._graft(await self._ready.receive())

    def _graft(self, done: _Compiled) -> None:
        self.admission.finished()
        if self._pending.get(done.slot) == done.blueprint:
            del self._pending[done.slot]
        slot = self.slots[done.slot]
        eager = eager_for(slot, done.blueprint)  # issue 28: the slot runs its eager module
        if eager is None and (
            slot.state is not SeedState.GERMINATED or slot.blueprint != done.blueprint
        ):
            return  # the slot moved on (e.g. culled) while the kernel compiled
        breaker = self.breakers[done.blueprint.id]
        if done.module is None or done.kernel is None:
            breaker.record_failure(str(done.error))
            if eager is not None and not slot.lifecycle.live:  # issue 28: a fossil can't be culled
                self.incident(IncidentKind.COMPILE_FAILED, slot, f"{done.error}; the fossil keeps "
                              "its eager module, the validator's reference", done.blueprint)
                return
            if isinstance(done.error, CompileTimeoutError):
                self.incident(IncidentKind.COMPILE_TIMEOUT, slot, str(done.error), done.blueprint)
                self._cull(slot, f"compile timed out: {done.error}", release=True)
            else:
                self.incident(IncidentKind.COMPILE_FAILED, slot, str(done.error), done.blueprint)
                self._cull(slot, f"compile failed: {done.error}")
            return
        try:
            if eager is not None:  # issue 28: the kernel takes over the eager module's params
                swap_in_kernel(slot, eager, done.module, done.kernel.kernel_id)
            else:
                self._tracked(slot, slot.graft, done.module, done.kernel.kernel_id)
                add_module_params(self.optimizer, done.module)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            self.seed_failed(SeedRuntimeError(f"grafting: {exc}", slot=slot.slot_name), exc)
            return
        self.kernels[done.kernel.kernel_id] = done.kernel
        self._oom_pause = self.reliability.oom_backoff_epochs  # a graft went through: reset
        if breaker.state is not BreakerState.CLOSED:
            breaker.record_success()  # the half-open trial went through
        self.rewrap()
        self.admission.set_loaded(self._loaded_bytes())

    # --- epoch boundaries -----------------------------------------------------------------------

    async def _measure(
        self, loader: Iterable[Any], train_loss: float | None, steps: int, dropped: int
    ) -> EpochReport:
        """The validation measurements; a seed that fails in them is culled and they are redone."""
        config = getattr(self.controller, "config", None)  # issue 28: bounded evaluation
        fraction = getattr(config, "counterfactual_fraction", 1.0)
        for attempt in range(len(self.slots) + 1):
            try:
                measured, cost = await anyio.to_thread.run_sync(  # issue 28: bounded_evaluate
                    bounded_evaluate, self.model, self.slots, self.task, loader, self.device,
                    fraction,
                )
                break
            except SeedRuntimeError as exc:
                if attempt == len(self.slots) or not self.slots[exc.slot].lifecycle.live:
                    raise
                self.seed_failed(exc)
        if measured.batches == 0:
            raise no_batches("validation", later=self.epoch > self.first_epoch, epoch=self.epoch)
        widths: dict[str, Counterfactual] = {}
        if self.width_trials:
            started = time.perf_counter()  # issue 28: the trials on the counterfactual batches
            widths = await anyio.to_thread.run_sync(
                measure_widths, self.model, self.task, strided(loader, fraction), self.device,
                self.width_trials, cost.subset,
            )
            cost.width_trials_s = time.perf_counter() - started
        return EpochReport(
            epoch=self.epoch, train_loss=train_loss, val_loss=measured.loss,
            val_acc=measured.metrics.get("accuracy", math.nan),
            health={name: slot.health() for name, slot in self.slots.items()},
            counterfactual=measured.counterfactual, steps=steps, dropped=dropped,
            metrics=measured.metrics, width_counterfactual=widths,
            eval_cost=cost.figures(),  # issue 28
        )

    def _judge_epoch(self, report: EpochReport) -> bool:
        """Record an epoch that trained nothing or measured a non-finite validation loss as an
        incident. :returns: whether the controller may decide on ``report``."""
        sound = True
        if report.steps == 0:
            self._epochs_without_steps += 1
            self.incident(
                IncidentKind.EPOCH_WITHOUT_STEPS, None,
                f"all {report.dropped} steps of epoch {report.epoch} were dropped (bad losses, "
                f"rolled back); {self._epochs_without_steps} such epoch(s) in a row",
            )
            sound = False
        else:
            self._epochs_without_steps = 0
        if not report.val_finite:
            self.incident(
                IncidentKind.NON_FINITE_VALIDATION, None,
                f"validation loss {report.val_loss} in epoch {report.epoch}; the controller is "
                "not asked this epoch",
            )
            sound = False
        return sound

    def _agreed(self, sound: bool) -> bool:
        """``sound`` on every rank under data parallelism, so every rank asks its controller or
        none does (``decide`` may be a collective)."""
        return self.consensus.agree_all(sound) if self.consensus is not None else sound

    def _stop_if_stalled(self) -> None:
        limit = self.reliability.max_epochs_without_steps
        if self._epochs_without_steps >= limit:
            raise GovernorError(
                f"every step of the last {self._epochs_without_steps} epoch(s) was dropped (bad "
                f"losses, rolled back), up to epoch {self.epoch}: training makes no progress; "
                "check the data for NaN/Inf and lower the learning rate",
                step=self.step,
            )

    def _loaded_bytes(self) -> int:
        return sum(
            self.kernels[s.kernel_id].nbytes for s in self.slots.values()
            if s.seed is not None and s.kernel_id in self.kernels
        )

    def _extras(self) -> dict[str, Any]:
        return {} if self.scheduler is None else {"scheduler": self.scheduler}

    async def _snapshot(self) -> Snapshot:
        """A copy of the state now, taken in a worker thread (the model is not changing)."""
        return await anyio.to_thread.run_sync(
            Snapshot.take, self.step, self.model, self.optimizer, self.slots, self._extras()
        )

    # --- surgery: architecture changes, at epoch boundaries -------------------------------------

    async def _operate(self, val_loader: Iterable[Any]) -> None:
        """Apply the surgery policy's proposal, if any, in one transaction; a refused proposal
        changes nothing."""
        assert self.surgery is not None
        operation = self.surgery.propose(self.model)
        if operation is None:
            return
        batch = next(iter(val_loader), None)
        inputs = getattr(self.task, "inputs", None)
        if batch is None or inputs is None:  # nothing to validate on: ask again next boundary
            return
        probe = self.task.to_device(inputs(batch)[:_SURGERY_PROBE], self.device)
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
            self.rewrap()
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

    async def _grow_width(self, decision: GrowWidth, val_loader: Iterable[Any]) -> None:
        """Widen ``decision.slot``'s host in one transaction (GradMax reads the first validation
        batch), put the new units on trial and tell the controller what it added."""
        widened = getattr(self.controller, "widened", None)
        slot = self.slots[decision.slot]
        batch = next(iter(val_loader), None)
        inputs = getattr(self.task, "inputs", None)
        if batch is None or inputs is None:
            if widened is not None:
                widened(decision.slot, committed=False)
            return
        batch = self.task.to_device(batch, self.device)
        probe = inputs(batch)[:_SURGERY_PROBE]
        path = self._module_path(slot)
        before, flops_before = self.param_count(), example_flops(self.model, probe)
        with self.telemetry.span(
            SPAN_SURGERY, surgery__op=f"widen slot {path!r} to {decision.width}", slot=path,
            epoch=self.epoch, step=self.step,
        ) as span:
            try:
                operation, trial = await anyio.to_thread.run_sync(
                    grow_width_operation, self.model, self.task, batch, path, decision.width,
                    decision.init, self.step,
                )
                await self.surgeon.apply(self.model, self.optimizer, operation, probe=probe)
            except SurgeryError as exc:
                self._agree_on_surgery(
                    WidenSlot(path, decision.width, init=decision.init), committed=False
                )
                span.set_attribute("esper.outcome", "rejected")
                log.warning("width growth rejected", slot=path, error=str(exc), epoch=self.epoch)
                if widened is not None:
                    widened(decision.slot, committed=False)
                return
            self._agree_on_surgery(operation, committed=True)
            self.surgeries.append(operation_record(operation))
            self.width_trials[decision.slot] = trial
            self.rewrap()
            added = self.param_count() - before
            flops = example_flops(self.model, probe) - flops_before
            span.set_attribute("esper.outcome", "committed")
            span.set_attribute("esper.params.added", added)
            self.telemetry.metrics.params_added(added, slot=path)
            log.info(
                "width growth", operation=operation.describe(), params_added=added,
                flops_added=flops, epoch=self.epoch, step=self.step,
            )
        if widened is not None:
            widened(decision.slot, committed=True, params_added=added, flops_added=flops)
        if not self.governor.offer(await self._snapshot()):
            self.governor.snapshot = None

    def _module_path(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"{type(module).__name__} is not part of the grower's model")

    def _agree_on_surgery(self, operation: Any, *, committed: bool) -> None:
        """Under data parallelism, check that every rank reached the same outcome.

        :raises EsperError: some rank committed the operation and another refused it.
        """
        if self.consensus is None:
            return
        everywhere = self.consensus.agree_all(committed)
        nowhere = self.consensus.agree_all(not committed)
        if not (everywhere or nowhere):
            raise EsperError(
                f"surgery {operation.describe()} was committed on some ranks and refused on "
                "others: the ranks' models differ; resume from the last checkpoint"
            )
