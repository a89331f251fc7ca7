"""The trainer: a training loop that grows its model, built on :class:`Grower`.

The loop is :meth:`Trainer.fit`; one step is :meth:`Trainer._step` (zero the gradients, forward,
judge, backward, step), whose verdict policy — the loss read on the host before the update, or
judged on the device and read some steps later — is chosen once, when the trainer is built.
Growth is the grower's, through its public calls only: the trainer holds no copy of its state
(its attributes such as :attr:`Trainer.step` read the grower's). The trainer adds guarded steps (a
bad loss never updates the model), CPU steps in a worker thread, checkpoints (which wrap
:meth:`Grower.state_dict`) and a run's outputs (:class:`RunOutputs`). See ``docs/training.md``
and ``docs/reliability.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack, nullcontext
from typing import TYPE_CHECKING, Any, Literal

import structlog
import torch
from torch import nn

from ..compiler import BlueprintCompiler
from ..control import Controller, EpochReport
from ..errors import LossAnomaly, SeedRuntimeError, TrainingConfigError
from ..reliability import ReliabilityConfig
from ..runtime import StepRunner
from ..surgery import GrowthSchedule, SurgeryPolicy, SurgeryPolicyConfig
from ..telemetry import SPAN_RUN, MetricLogger, Telemetry, TelemetryConfig
from ._grower import Grower
from ._grower_options import Graft
from ._guard import StepGuard
from ._host_growth import check_for_trainer
from ._lagged import LaggedPump
from ._loaders import batch_count, check_loaders, loader_generator, no_batches
from ._masked import MaskedStep
from ._outputs import LOOP_LAG_INTERVAL_S, RunOutputs
from ._prefetch import Ready, prefetched, wait_ready
from ._progress import FitProgress, ProgressMode, check_progress
from ._results import FitResult, GrowthEvent
from ._state import TrainerState
from ._task import ClassificationTask, Task, task_inputs, task_loss
from ._verdict import LaggedVerdicts
from ._verdict_policy import DeviceVerdict, HostVerdict

if TYPE_CHECKING:
    from ..store import KernelStore

__all__ = ("FitResult", "GrowthEvent", "Trainer")

log = structlog.get_logger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Settle = Literal["judge", "cull", "keep"]
Precision = Literal["fp32", "bf16"]
#: A batch waiting to be stepped, and whether it must take the synchronous path.
_Queued = tuple[Any, Ready, bool]


class Trainer(TrainerState):
    """Train a wrapped model and grow seeds in its slots.

    :param model: the host, wrapped with :func:`esper_async.wrap` (or with no slots).
    :param optimizer: optimizer over the model's parameters; default Adam, lr 3e-3.
    :param loss_fn: ``loss_fn(logits, targets)`` of the default :class:`ClassificationTask`;
        default cross-entropy. Give ``task`` or ``loss_fn``, not both.
    :param task: how batches are read, losses computed and figures measured (see
        :mod:`esper_async.training._task`); default classification of ``(inputs, targets)``.
    :param controller: decides growth; default :class:`HeuristicController` seeded with ``seed``.
    :param compiler: turns blueprints into kernels; default :class:`BlueprintCompiler` (with
        ``store`` as its kernel store).
    :param grow: whether to grow at all (``False`` trains the host statically).
    :param device: where the model and batches live.
    :param seed: seeds the kernels' initial weights and the default controller's choices: two
        runs from the same model, data and seed grow the same seeds into the same weights.
    :param graft: when kernels enter their slots, as :class:`Grower`: ``"auto"`` (default) is
        ``"eager"`` (seeds train at once as their blueprint's eager module; no step or epoch
        waits for a compile), or ``"epoch"`` under data parallelism.
    :param graft_deadline_epochs, telemetry, wrap_model, scheduler, reliability, surgery:
        as :class:`Grower` (the scheduler is stepped once per epoch and checkpointed).
    :param host_schedule: as :class:`Grower` (built on ``model`` and the ``optimizer`` given
        here); the Trainer grows the host at epoch boundaries, after each epoch's decisions.
    :param writes_checkpoints: whether this process writes ``fit(checkpoint_dir=...)``'s
        checkpoints (under DDP pass ``ctx.is_leader``).
    :param run_dir, telemetry_config, store, loggers, loop_lag_interval_s: what each fit writes
        besides the model — a trace in ``run_dir``, the default compiler's kernel ``store``, epoch
        figures to ``loggers``, the loop-lag metric; see :class:`RunOutputs`. Defaults: nothing
        on disk, no store, no loggers, loop lag every 0.25 s.
    :param precision: ``"fp32"`` (default) or ``"bf16"``: training steps (host and seeds) run
        under bf16 autocast on the device (validation stays in fp32).
    :param progress: what each fit shows on standard error: ``"auto"`` (default: a live bar on
        a terminal, one line per epoch otherwise), ``"bar"``, ``"lines"`` or ``"off"`` (for
        library use; ``False`` too). See :mod:`esper_async.training._progress`.
    :raises ValueError: both ``task`` and ``loss_fn``, ``run_dir`` and ``telemetry``, or ``store``
        and ``compiler`` are given; ``loop_lag_interval_s`` is not positive; an unknown
        ``precision``; or as :class:`Grower`.
    :raises TelemetryConfigError: an unknown ``progress`` mode.
    :raises TrainingConfigError: a ``host_schedule`` the Trainer cannot drive (token-only
        triggers, or learning rates of its own).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn | None = None,
        task: Task | None = None,
        controller: Controller | None = None,
        compiler: BlueprintCompiler | None = None,
        grow: bool = True,
        device: torch.device | str = "cpu",
        seed: int = 0,
        graft: Graft = "auto",
        graft_deadline_epochs: int | None = None,
        telemetry: Telemetry | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        reliability: ReliabilityConfig | None = None,
        surgery: SurgeryPolicyConfig | SurgeryPolicy | None = None,
        host_schedule: GrowthSchedule | None = None,
        writes_checkpoints: bool = True,
        run_dir: str | os.PathLike[str] | None = None,
        telemetry_config: TelemetryConfig | None = None,
        store: str | os.PathLike[str] | KernelStore | None = None,
        loggers: Sequence[MetricLogger] = (),
        loop_lag_interval_s: float | None = LOOP_LAG_INTERVAL_S,
        precision: Precision = "fp32",
        progress: ProgressMode | bool = "auto",
    ) -> None:
        if host_schedule is not None:
            check_for_trainer(host_schedule)
        if task is not None and loss_fn is not None:
            raise ValueError("give Trainer a task or a loss_fn, not both (the task has its loss)")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision: Precision = precision
        # [progress hook 1/5] the display mode, checked here; a display is built per fit.
        self.progress: ProgressMode = check_progress(progress)
        self._progress = FitProgress("off")
        #: What each fit writes besides the model: trace, kernel store, loggers, loop lag.
        self.outputs = outputs = RunOutputs(
            run_dir=run_dir,
            telemetry_config=telemetry_config,
            store=store,
            loggers=loggers,
            loop_lag_interval_s=loop_lag_interval_s,
            telemetry_given=telemetry is not None,
            compiler_given=compiler is not None,
        )
        self.task: Task = task or ClassificationTask(loss_fn or nn.functional.cross_entropy)
        model = model.to(torch.device(device))
        # On a GPU the default Adam is fused: it masks a bad step itself (lagged verdicts).
        self.optimizer = optimizer or torch.optim.Adam(
            model.parameters(), lr=3e-3, fused=torch.device(device).type == "cuda" or None
        )
        self.grower = g = Grower(
            model,
            self.optimizer,
            task=self.task,
            controller=controller,
            compiler=compiler,
            grow=grow,
            device=device,
            seed=seed,
            graft=graft,
            graft_deadline_epochs=graft_deadline_epochs,
            telemetry=telemetry,
            wrap_model=wrap_model,
            scheduler=scheduler,
            reliability=reliability,
            surgery=surgery,
            host_schedule=host_schedule,
        )
        self.run_dir, self.store, self.loggers = outputs.run_dir, outputs.store, outputs.loggers
        g.compiler.store = self.store or g.compiler.store
        self.writes_checkpoints = writes_checkpoints
        self.device = g.device
        # CPU: the step runs in a worker thread; CUDA: it is launched in one and its completion
        # is awaited through the stream bridge, so the event loop never waits on the device.
        self._steps = StepRunner.for_device(self.device)
        inputs = task_inputs(self.task)
        self._guard = StepGuard(
            lambda batch: self.task.forward(g.runner, batch),
            self.optimizer,
            g.slots,
            g.governor,
            g.consensus,
            run_model=None if inputs is None else lambda batch: g.runner(inputs(batch)),
        )
        rel = g.reliability
        self._masked = MaskedStep(self.optimizer)
        lagged = rel.verdict == "lagged" or (
            rel.verdict == "auto" and self.device.type == "cuda" and self._masked.uses_found_inf
        )
        if lagged and g.consensus is not None:
            lagged = False  # the ranks agree on every step before it updates (see StepGuard)
        #: The lagged verdicts of the steps (``None``: each loss is judged on the host first).
        self.verdicts = LaggedVerdicts(self.device, rel.verdict_lag) if lagged else None
        # A lagged step only queues device work: it may be launched on the loop's own thread.
        self._steps.launch_on_loop = lagged and rel.launch == "loop"
        # The verdict policies, built here once: a step judged on the host before it updates
        # (every step of a synchronous run; a lagged run's re-judged steps), and one judged on
        # the device and read later (a lagged run's launches).
        self._on_host = HostVerdict(self._guard, self.optimizer, g.governor, self._autocast)
        self._on_device = (
            None
            if self.verdicts is None
            else DeviceVerdict(self.verdicts, self._masked, g.governor)
        )
        self._generator: torch.Generator | None = None
        self._stop_requested = False
        self._checkpoint_requested = False

    @property
    def loss_fn(self) -> Callable[..., Any] | None:
        """The task's loss function, if it declares one."""
        return task_loss(self.task)

    def param_count(self) -> int:
        """Trainable parameters of the model now, seeds included."""
        return self.grower.param_count()

    def request_stop(self) -> None:
        """End :meth:`fit` cleanly after the current epoch (checkpointed if checkpoints are on)."""
        self._stop_requested = True

    def request_checkpoint(self) -> None:
        """Write a checkpoint at the next epoch boundary, whatever the schedule."""
        self._checkpoint_requested = True

    # --- the loop --------------------------------------------------------------------------------

    async def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        *,
        epochs: int,
        on_epoch: Callable[[EpochReport, FitResult], None] | None = None,
        on_step: Callable[[int, float | None], None] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        settle: Settle = "keep",
        label: str | None = None,
        wait_for_kernels: bool = False,
    ) -> FitResult:
        """Train until epoch ``epochs``, growing seeds as the controller decides.

        :param train_loader: training batches as the task reads them (a ``DataLoader``, also
            over an ``IterableDataset``, or a list): at least one per epoch, re-iterable (not a
            generator) for several epochs.
        :param val_loader: validation batches, under the same rules.
        :param epochs: the run's length in epochs (a resumed run trains the ones left).
        :param on_epoch: ``on_epoch(report, record_so_far)`` after every epoch.
        :param on_step: ``on_step(step, loss)`` after every step (``loss`` ``None``: dropped).
        :param checkpoint_dir: where checkpoints go (``None``: none are written).
        :param checkpoint_every: epochs between checkpoints (the last epoch is always written).
        :param resume: continue from the newest checkpoint in ``checkpoint_dir`` that restores.
        :param settle: seeds still alive at the end: ``"keep"`` (default), ``"judge"`` (kept if
            their last counterfactual shows a gain) or ``"cull"``; before the final checkpoint.
        :param wait_for_kernels: with ``graft="eager"``, wait at the end of the last epoch for the
            kernels of seeds still running as their eager module and swap them in, before
            ``settle`` and the final checkpoint (:meth:`Grower.await_kernels`). Default
            ``False``: the run ends without waiting; such seeds end as their eager module (the
            validator's reference; the same weights in the ``export`` form), listed in
            :attr:`FitResult.ended_eager`, and their compiles are cancelled.
        :returns: the run's history, growth events and incidents.
        :raises GovernorError: rolling back could not make training sound.
        :raises LoaderError: a loader yields no batches, or is one-shot for several epochs.
        :raises ValueError: ``resume`` without ``checkpoint_dir``, or an unknown ``settle``.
        :param label: the run's name in its trace (``esper.label``; the dashboard's legend).
        :raises CheckpointError: ``resume`` found no checkpoint that restores.
        :raises TelemetryConfigError: the trainer's ``run_dir`` cannot be created.
        :raises StoreError: the trainer's ``store`` directory cannot be opened.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise TrainingConfigError(
                f"fit(epochs=...) must be an int >= 1 (the run's length in epochs), got "
                f"{epochs!r} ({type(epochs).__name__})"
            )
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir to resume from")
        if settle not in ("judge", "cull", "keep"):
            raise ValueError(f"settle must be 'judge', 'cull' or 'keep', got {settle!r}")
        self._generator = loader_generator(train_loader)
        self.grower.start_run()
        if resume and checkpoint_dir is not None:
            self.restore(checkpoint_dir, generator=self._generator)
        result = self.result
        first = self.epoch
        check_loaders({"training": train_loader, "validation": val_loader}, epochs - first)
        self.grower.expect_steps_per_epoch(batch_count(train_loader) or 1)
        self._stop_requested = False
        started = time.perf_counter()
        async with AsyncExitStack() as stack:  # closed in reverse: grower, run span, outputs
            await self.outputs.open(stack, self)
            stack.enter_context(
                self.telemetry.span(
                    SPAN_RUN, epochs=epochs, slots=len(self.slots), grow=self.grow, label=label
                )
            )
            grower = await stack.enter_async_context(self.grower)
            await self.outputs.start(grower)
            # [progress hook 2/5] construct this fit's display; the stack closes it (hook 5/5).
            self._progress = stack.enter_context(FitProgress(
                self.progress, epochs=epochs, first_epoch=first, label=label,
                steps_per_epoch=batch_count(train_loader) or 0, events_seen=len(result.events)))
            for epoch in range(first, epochs):
                grower.begin_epoch()
                await self._train_epoch(train_loader, on_step)
                report = await grower.end_epoch(val_loader)
                await grower.grow_host(loss=report.train_loss)  # the host's own growth, if due
                last = epoch + 1 == epochs or self._stop_requested
                if last:
                    if wait_for_kernels:
                        await grower.await_kernels()
                    await grower.settle(settle)
                due = (epoch + 1) % max(1, checkpoint_every) == 0 or last
                if checkpoint_dir is not None and (due or self._checkpoint_requested):
                    self._checkpoint_requested = False
                    if self.writes_checkpoints:
                        await self.save_checkpoint(checkpoint_dir, generator=self._generator)
                log.debug(
                    "epoch",
                    epoch=epoch,
                    train_loss=report.train_loss,
                    val_loss=report.val_loss,
                    metrics=dict(report.metrics),
                )
                self.outputs.log_epoch(report, self.step, self.param_count())
                # [progress hook 4/5] the epoch's line (and the bar's figures).
                self._progress.epoch(report, result.events, self.param_count())
                if on_epoch is not None:
                    on_epoch(report, result)
                if self._stop_requested:
                    break
        result.wall_s = time.perf_counter() - started
        result.steps = self.step
        return result

    async def _train_epoch(
        self, loader: Iterable[Any], on_step: Callable[[int, float | None], None] | None
    ) -> None:
        """One pass over the training data, each batch a guarded step (the next batch copied to
        the device while the step runs)."""
        self.model.train()
        batches = 0
        pump: LaggedPump | None = None
        if self.verdicts is not None:
            # An epoch left by an exception (a loader error, cancellation) may have left the halt
            # of a bad step set with nothing in flight any more: no step would apply again.
            self.verdicts.clear()
            pump = LaggedPump(
                self.verdicts,
                self.grower.governor,
                telemetry=lambda: self.grower.telemetry,
                step=lambda: self.grower.step,
                epoch=lambda: self.grower.epoch,
                launch=lambda b, r: self._steps.launch(self._step, b, r, True),
                sync_step=lambda b, r: self._sync_step(b, r, on_step),
                stepped=lambda loss: self._stepped(loss, on_step),
            )
        for batch, ready in prefetched(loader, self.task, self.device):
            batches += 1
            if pump is None:
                await self._sync_step(batch, ready, on_step)
            else:
                await pump.push(batch, ready)
        if pump is not None:
            await pump.pump(0)
        if batches == 0:
            later = self.epoch > self.grower.first_epoch
            raise no_batches("training", later=later, epoch=self.epoch)

    async def _sync_step(
        self, batch: Any, ready: Ready, on_step: Callable[[int, float | None], None] | None
    ) -> None:
        """A step whose loss is read on the host before it updates (:meth:`_guarded_step`)."""
        with self.telemetry.step_span(self.step, epoch=self.epoch):
            started = time.perf_counter()
            loss = await self._guarded_step(batch, ready)
            self.telemetry.metrics.step_finished(time.perf_counter() - started)
        self._stepped(loss, on_step)

    def _stepped(
        self, loss: float | None, on_step: Callable[[int, float | None], None] | None
    ) -> None:
        self.grower.after_step(loss, updated=loss is not None)
        self._progress.step(loss)  # [progress hook 3/5] per step: a counter, a rare redraw
        if on_step is not None:
            on_step(self.step, loss)

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _step(self, batch: Any, ready: Ready = None, lagged: bool = False) -> Any:
        """One optimizer step on ``batch`` (in a worker thread): zero the gradients, forward,
        judge, backward, step. The verdict is judged on the host (the loss is read before the
        backward pass, so a bad step never reaches the parameters; returns the loss) or, with
        ``lagged`` (a lagged run's launches), on the device with no host read (returns the
        host-resident state to restore if the verdict, read later, is bad).

        :raises SeedRuntimeError: a seed raised or produced non-finite values (nothing updated).
        :raises LossAnomaly: the loss was bad, or the backward pass failed (nothing updated).
        """
        wait_ready(batch, ready)
        self.optimizer.zero_grad(set_to_none=True)
        loss: torch.Tensor | None = None
        try:
            with self._autocast():
                _, loss = self.task.forward(self.grower.runner, batch)
        except SeedRuntimeError as exc:
            self._guard.forward_failed(exc)  # re-raised, unless ranks must agree on it first
        policy = self._on_device if lagged and self._on_device is not None else self._on_host
        value, verdict = policy.judge(loss, batch)
        assert loss is not None  # the judge raised for a failed forward
        self._guard.backward(loss, value)
        return policy.update(loss, value, verdict)

    async def _guarded_step(self, batch: Any, ready: Ready = None) -> float | None:
        """A step that survives a failing seed (culled, the step redone without it) or a bad
        loss (rolled back). :returns: the loss, or ``None`` when the batch was dropped."""
        for _ in range(len(self.slots) + 1):  # every retry culls a seed, so this ends
            try:
                return await self._steps.run(self._step, batch, ready)
            except SeedRuntimeError as exc:
                if not self.slots[exc.slot].lifecycle.live:  # a fossilized seed: nothing to cull
                    self.grower.roll_back(LossAnomaly("fossilized seed failed", float("nan")), exc)
                    return None
                self.grower.seed_failed(exc)
            except LossAnomaly as exc:
                self.grower.roll_back(exc, exc.__cause__)
                return None
        raise AssertionError("unreachable: every slot's seed was culled and the step still failed")
