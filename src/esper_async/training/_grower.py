"""``Grower``: the growth engine, for any training loop.

A thin front over parts that own their state:

* :class:`~esper_async.training.RunState`: step, epoch, the epoch's losses, the record, kernels
  and the lifecycle events;
* :class:`~esper_async.training.CompileQueue`: compiles in flight (in a task group that
  ``async with grower:`` opens and closes), admission and the per-blueprint breakers;
* :class:`~esper_async.training.Faults`: a seed that failed, a bad loss (rollback), a stall;
* :class:`~esper_async.training.GrowerSurgery`: surgery and width growth;
* the :class:`~esper_async.reliability.Governor`: the loss judge, the snapshot, the budget.

The loop that calls it stays the only writer of the model: the grower changes the model only in
its calls between steps. :meth:`Grower.end_epoch` is made of public steps a loop may also call one
by one: :meth:`~Grower.measure`, :meth:`~Grower.graft_due`, :meth:`~Grower.decide` (which
applies), :meth:`~Grower.snapshot`. A hand-written loop::

    async with Grower(model, optimizer) as grower:
        for epoch in range(epochs):
            model.train()
            for x, y in train:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                grower.after_step(loss)
            report = await grower.end_epoch(val)  # leaves the model in the mode it found

:meth:`Grower.state_dict` holds all growth state (see ``docs/training.md``).
:class:`~esper_async.Trainer` is this loop with guarded steps, rollbacks and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Literal

import structlog
import torch
from opentelemetry.sdk.trace import TracerProvider
from torch import nn

from ..blueprints import Blueprint
from ..compiler import BlueprintCompiler
from ..control import (
    Controller,
    Decision,
    HeuristicController,
)
from ..errors import (
    LossAnomaly,
    SeedRuntimeError,
)
from ..reliability import (
    Governor,
    IncidentKind,
    ReliabilityConfig,
)
from ..seeds import SeedSlot, SeedState, find_slots
from ..surgery import GrowthSchedule, HostGrowthEvent, SurgeryPolicy, SurgeryPolicyConfig
from ..telemetry import Telemetry
from ._compile_queue import CompileQueue
from ._faults import Faults
from ._grower_epoch import GrowerEpoch
from ._grower_options import (
    DEFAULT_DEADLINE,
    Graft,
    GraftMode,
    check_options,
    check_width_slots,
    model_device,
    resolve_graft,
)
from ._grower_state import GrowerState
from ._grower_surgery import GrowerSurgery
from ._guard import StepConsensus
from ._host_growth import HostGrowth
from ._run_state import RunState
from ._seed_actions import SeedActions
from ._task import ClassificationTask, Task, task_loss

__all__ = ("Grower",)

log = structlog.get_logger(__name__)


class Grower(GrowerState, GrowerEpoch):
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
    :param graft: ``"auto"`` (default): ``"eager"``, or ``"epoch"`` under data parallelism
        (a task whose loss is a ``StepConsensus``, where eager is refused, or any process of
        several ``torch.distributed`` ranks). ``"eager"``: a seed
        trains at once as its blueprint's eager module (the validator's reference, built in
        this process) and its validated kernel takes over its parameters when ready, at a step
        boundary; the run never waits for a compile, and a seed whose kernel has not arrived when
        the run ends ends as its eager module (:meth:`await_kernels` waits; see
        ``docs/async.md``). ``"epoch"``: finished kernels enter their slots at the first epoch
        boundary after germination, waiting there for the compile; ``"step"``: at the first step
        boundary after they are ready. ``"eager"`` and ``"epoch"`` grow the same weights whatever
        the compile latency (with ``"eager"``, which seeds end as their eager module, recorded
        in :attr:`FitResult.ended_eager`, does depend on it).
    :param graft_deadline_epochs: with ``graft="step"``, a kernel still compiling this many epochs
        after germination is waited for (default 2).
    :param telemetry: the run's telemetry; default: recorded nowhere.
    :param wrap_model: rebuilds the module steps should call (e.g. DDP) after every structural
        change; :attr:`runner` is the current one.
    :param scheduler: a learning-rate scheduler that :meth:`end_epoch` steps once per epoch and
        rollbacks restore.
    :param reliability: breakers, compile retries, resource limits, the governor.
    :param surgery: architecture changes at epoch boundaries (see ``docs/surgery.md``).
    :param host_schedule: grows the host itself toward a target shape (a
        :class:`~esper_async.surgery.GrowthSchedule` built on ``model`` and ``optimizer``),
        applied by :meth:`grow_host`; its progress is in :meth:`state_dict`.
    :raises ValueError: ``graft`` is not ``"auto"``, ``"epoch"``, ``"step"`` or ``"eager"``;
        ``graft_deadline_epochs`` is given with ``graft="epoch"`` (which always waits at the
        first boundary) or is below 1; ``graft="eager"`` under data parallelism (a task whose
        loss is a ``StepConsensus``); or the surgery policy's ``fossil_threshold`` exceeds 1.
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
        graft: Graft = "auto",
        graft_deadline_epochs: int | None = None,
        telemetry: Telemetry | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        reliability: ReliabilityConfig | None = None,
        surgery: SurgeryPolicyConfig | SurgeryPolicy | None = None,
        host_schedule: GrowthSchedule | None = None,
    ) -> None:
        if isinstance(surgery, SurgeryPolicyConfig):
            surgery = SurgeryPolicy(surgery, step=lambda: self.step)
        check_options(graft, graft_deadline_epochs, surgery)
        self.device = model_device(model) if device is None else torch.device(device)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.task: Task = task or ClassificationTask()
        loss_fn = task_loss(self.task)
        #: The task's loss when it is a collective over ranks (then decisions are agreed on).
        self.consensus = loss_fn if isinstance(loss_fn, StepConsensus) else None
        mode = resolve_graft(graft, consensus=self.consensus is not None)
        self.telemetry = telemetry or Telemetry(tracer_provider=TracerProvider())
        self.controller: Controller = controller or HeuristicController(
            seed=seed, telemetry=self.telemetry
        )
        self.grow = grow
        self.seed = seed
        #: The graft mode in use (``"auto"`` resolved): ``"eager"``, ``"epoch"`` or ``"step"``.
        self.graft: GraftMode = mode
        self.graft_deadline_epochs = (
            1 if mode == "epoch" else graft_deadline_epochs or DEFAULT_DEADLINE
        )
        self.slots: dict[str, SeedSlot] = find_slots(model)
        if grow:  # a static arm may share a growth arm's controller (and its width_slots)
            check_width_slots(self.controller, self.slots)
        self.wrap_model = wrap_model
        self.scheduler = scheduler
        self.reliability = rel = reliability or ReliabilityConfig()
        self.governor = Governor(rel.governor)
        #: Step, epoch, the record, kernels.
        self.run = RunState(lambda: self.telemetry)
        #: Compiles in flight, admission, breakers.
        self.compiles = CompileQueue(
            compiler or BlueprintCompiler(device=str(self.device), telemetry=self.telemetry),
            rel,
            device=self.device,
            seed=seed,
            on_retry=self._compile_retried,
        )
        #: Seeds that failed, rollbacks, stalls.
        self.faults = Faults(self, rel)
        #: Surgery and width growth.
        self.surgeon = GrowerSurgery(self, surgery)
        #: Decisions, grafts, settlement.
        self.actions = SeedActions(self)
        #: The host's own growth (a GrowthSchedule toward a target shape), if any.
        self.host = HostGrowth(self, host_schedule)
        self.rewrap()

    # --- the context: compiles in flight --------------------------------------------------------

    async def __aenter__(self) -> Grower:
        """Start the compiler and the task group compiles run in; take the first snapshot."""
        await self.compiles.start(compiler=self.grow)
        try:
            self.compiles.resume(self.slots)
            await self.snapshot()
        except BaseException as exc:  # cancelled (SIGTERM, Ctrl-C) or failed: close what opened
            await self.compiles.stop(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Cancel the compiles still running (they are not needed any more) and close, without
        waiting for them: after a clean exit, a seed still running as its eager module
        (``graft="eager"``) ends as it, recorded in :attr:`FitResult.ended_eager
        <esper_async.FitResult.ended_eager>` with an ``ended_eager`` incident (call
        :meth:`await_kernels` first to end on kernels)."""
        try:
            if kind is None:
                self.actions.end_eager()
            self.run.close_epoch()
        finally:  # the compile queue closes whatever happened above
            return_value = await self.compiles.stop(kind, exc, tb)
        return return_value

    async def start_background(self, fn: Callable[..., Coroutine[Any, Any, Any]]) -> None:
        """Start ``fn`` in the grower's task group, beside the compiles: it runs until the
        grower exits, which cancels it (a monitor, e.g. ``monitor_loop_lag``). ``fn`` is
        started with anyio's ``TaskGroup.start``, so it must call ``task_status.started()``.

        :param fn: an async function taking ``task_status=``.
        :raises RuntimeError: called outside ``async with grower:``.
        """
        await self.compiles.start_background(fn)

    # --- the loop's calls -----------------------------------------------------------------------

    def begin_epoch(self) -> None:
        """Open the epoch (its span; the governor's per-epoch budget). Optional: the first
        :meth:`after_step` of an epoch opens it."""
        if self.run.open_epoch():
            self.governor.new_epoch()

    def after_step(self, loss: float | torch.Tensor | None = None, *, updated: bool = True) -> None:
        """Call after every optimizer step (between steps: the model is not changing).

        Advances the seeds' blending ramps and, with ``graft="step"`` or ``"eager"``, grafts
        kernels that finished compiling.

        :param loss: the step's training loss (for the epoch's ``train_loss``), if known; a
            tensor is summed where it lives and read once, at the end of the epoch (no host
            sync per step).
        :param updated: whether the step updated the model (``False``: it was dropped).
        """
        self.begin_epoch()
        self.run.count_step(loss, updated=updated)
        for slot in self.slots.values():
            if slot.state is SeedState.BLENDING:  # the one state a step can end (ramp done)
                self.run.transition(slot, slot.on_step)
            else:
                slot.on_step()  # a step counter: no transition to record
        if self.graft != "epoch":  # "step", "eager": kernels enter at step boundaries
            self.graft_ready()

    async def settle(self, how: Literal["judge", "cull", "keep"]) -> None:
        """Decide the seeds still alive at the end of training.

        :param how: ``"judge"``: a blended seed is kept if its counterfactual gain (last report)
            exceeds the controller's margin (:class:`~esper_async.control.MarginController`;
            otherwise any gain), culled otherwise, and an unblended one is culled; ``"cull"``:
            every live seed is culled; ``"keep"``: nothing changes. Kernels still compiling are
            not waited for (see :meth:`await_kernels`).
        :raises ValueError: ``how`` is none of these.
        """
        await self.actions.settle(how)

    async def await_kernels(self) -> None:
        """Wait for the kernels of seeds still running as their blueprint's eager module
        (``graft="eager"``) and swap each in as it arrives (a compile that fails culls its seed,
        as at any step). Nothing else changes: the weights are the same with or without the
        wait in the ``export`` form. Call it between steps, inside ``async with grower:``, before
        the run ends if it must end on validated kernels (``Trainer.fit(wait_for_kernels=True)``
        does); by default a run ends without waiting, and such seeds end as their eager module
        (:attr:`FitResult.ended_eager <esper_async.FitResult.ended_eager>`). Returns at once
        outside the context or when no seed waits.
        """
        await self.actions.await_eager_kernels()

    async def grow_host(
        self, *, tokens: int = 0, loss: float | None = None
    ) -> list[HostGrowthEvent]:
        """Grow the host by its ``host_schedule``'s stages due now (a step boundary: call it
        between optimizer steps; the Trainer calls it after each epoch). Seeds in the grown
        blocks come along; a new rollback snapshot is taken.

        :param tokens: training tokens (or samples) seen so far, for token triggers.
        :param loss: the latest training loss, for plateau triggers.
        :returns: the growth events (none without a schedule or when nothing is due).
        :raises SurgeryError: a stage failed; the model and optimizer are as before it.
        """
        return await self.host.grow(tokens=tokens, loss=loss)

    def graft_ready(self) -> None:
        """Graft every kernel that finished compiling (between steps only)."""
        self.actions.graft_ready()

    async def graft_due(self) -> None:
        """Graft every kernel that finished, and wait for those whose seeds germinated
        ``graft_deadline_epochs`` or more epochs ago (at an epoch boundary)."""
        await self.actions.graft_due()

    def apply(self, decision: Decision) -> None:
        """Apply one decision now (between steps).

        :raises ValueError: a :class:`GrowWidth` (it runs in :meth:`decide`).
        """
        self.actions.apply(decision)

    # --- faults the loop reports ----------------------------------------------------------------

    def seed_failed(self, exc: SeedRuntimeError, cause: BaseException | None = None) -> None:
        """A seed raised, turned non-finite or ran out of memory: cull it (after an OOM, pause
        growth, doubling the pause each time). Call between steps.

        :param exc: the error the slot raised.
        :param cause: the underlying error, when it is not ``exc.__cause__``.
        """
        self.faults.seed_failed(exc, cause)

    def roll_back(self, anomaly: LossAnomaly, cause: BaseException | None = None) -> None:
        """Restore the last good snapshot and embargo what caused the bad loss.

        :param anomaly: what was wrong with the loss (and the culprit seed, if one was found).
        :param cause: the underlying error, if any.
        :raises GovernorError: when the epoch's rollback budget is spent.
        """
        self.faults.roll_back(anomaly, cause)

    def incident(
        self,
        kind: IncidentKind,
        slot: SeedSlot | None,
        detail: str,
        blueprint: Blueprint | None = None,
    ) -> None:
        """Record a fault met and what was done about it (logged as a warning)."""
        self.run.incident(kind, slot, detail, blueprint)

    def _compile_retried(self, slot: str, blueprint: Blueprint, detail: str) -> None:
        self.incident(IncidentKind.COMPILE_RETRIED, self.slots[slot], detail, blueprint)

    # --- derived state --------------------------------------------------------------------------

    def rewrap(self) -> None:
        """Set :attr:`runner`, the module steps call: the model, wrapped anew if a wrapper is
        set (after every change of structure)."""
        self.runner = self.model if self.wrap_model is None else self.wrap_model(self.model)

    def restored(self) -> None:
        """Bring derived state up to date after the model and slots changed or were restored
        (the runner, the bytes loaded)."""
        self.compiles.admission.set_loaded(self.loaded_bytes())
        self.rewrap()

    def param_count(self) -> int:
        """Trainable parameters of the model now, seeds included."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def loaded_bytes(self) -> int:
        """Bytes of the kernels loaded in slots now."""
        return sum(
            self.run.kernels[s.kernel_id].nbytes
            for s in self.slots.values()
            if s.seed is not None and s.kernel_id in self.run.kernels
        )

    def _extras(self) -> dict[str, Any]:
        return {} if self.scheduler is None else {"scheduler": self.scheduler}
