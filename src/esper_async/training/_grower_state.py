"""The grower's one state path: :meth:`GrowerState.state_dict` and
:meth:`GrowerState.load_state_dict`, which :class:`~esper_async.training.Grower` inherits.

The payload holds all growth state — the model, the optimizer, every slot and the bytes of its
kernel, the controller's and selector's statistics, the governor, the breakers, the scheduler,
the surgery policy, the counters (step, epoch, out-of-memory pause), the committed surgeries and
width trials, the run's record — and the RNGs. :meth:`esper_async.Trainer.state_dict` and the
data-parallel :func:`esper_async.distributed.save_checkpoint` wrap it; a hand-written loop calls
it directly to checkpoint and resume exactly. The format itself is
:mod:`esper_async.reliability`'s (:func:`~esper_async.reliability.capture_state`).

A checkpoint's tensors have the shapes of the model after every surgery committed before it, but a
resumed run builds its model afresh: the record lists the committed operations, and
:meth:`GrowerState.load_state_dict` replays those the model lacks before it loads any tensor.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anyio
import torch

from ..compiler import BlueprintCompiler
from ..control import HeuristicController, StatefulController
from ..errors import SurgeryError, TrainingConfigError
from ..kernels import Kernel
from ..reliability import (
    BreakerBoard,
    CheckpointIntegrityError,
    CheckpointMismatchError,
    Restored,
    Snapshot,
    apply_state,
    capture_state,
    verify_state,
)
from ..surgery import SurgeryPolicy, replay_operations
from ..telemetry import Telemetry
from ._results import FitResult
from ._widths import WidthTrial

if TYPE_CHECKING:
    from ._compile_queue import CompileQueue
    from ._faults import Faults
    from ._grower import Grower
    from ._grower_surgery import GrowerSurgery
    from ._run_state import RunState

__all__ = ("GrowerState",)


class GrowerState:
    """The state path of :class:`~esper_async.training.Grower` and read-only views of its
    parts' state (a mixin)."""

    if TYPE_CHECKING:
        run: RunState
        compiles: CompileQueue
        faults: Faults
        surgeon: GrowerSurgery

    def start_run(self: Grower) -> None:
        """Start a new record from epoch 0 (the step count goes on): what a new fit does."""
        self.run.result = FitResult()
        self.run.resume_at(epoch=0, step=self.run.step)

    def continue_from(self: Grower, *, step: int, surgeries: list[dict[str, Any]]) -> None:
        """Continue a run whose model was restored outside the grower (e.g. by
        :func:`esper_async.distributed.load_checkpoint` before the trainer was built): its global
        ``step``, and the ``surgeries`` its record lists (already replayed on the model)."""
        self.run.resume_at(epoch=self.run.epoch, step=step)
        self.surgeon.records = list(surgeries)

    def expect_steps_per_epoch(self: Grower, steps: int) -> None:
        """How many steps an epoch has (blending ramps are counted in steps); otherwise the
        last epoch's count is used.

        :raises TrainingConfigError: ``steps`` is below 1.
        """
        if steps < 1:
            raise TrainingConfigError(f"steps per epoch must be at least 1, got {steps}")
        self.run.steps_per_epoch = steps

    def use_telemetry(self: Grower, telemetry: Telemetry, *, compiler: bool = True) -> None:
        """Record the run in ``telemetry`` from now on: the grower's, the compiler's (if
        ``compiler``) and the controller's selection spans, where it recorded in the old one.

        :param telemetry: the new telemetry.
        :param compiler: whether the compiler's telemetry is replaced too.
        """
        previous, self.telemetry = self.telemetry, telemetry
        if compiler:
            self.compiles.compiler.telemetry = telemetry
        if isinstance(self.controller, HeuristicController) and (
            self.controller.telemetry is previous
        ):
            self.controller.telemetry = telemetry

    async def snapshot(self: Grower, *, replace: bool = False) -> bool:
        """Take a snapshot now (in a worker thread; the model is not changing) and keep it as
        the rollback point if its parameters are finite; then kernels no slot or snapshot holds
        are dropped.

        :param replace: after a change of structure: a refused snapshot drops the old one (it
            has the old shapes), and kernels are kept.
        :returns: whether it was kept.
        """
        snapshot = await anyio.to_thread.run_sync(
            Snapshot.take, self.step, self.model, self.optimizer, self.slots, self._extras()
        )
        kept = self.governor.offer(snapshot)
        if replace:
            if not kept:
                self.governor.snapshot = None
            return kept
        if kept:
            live = {s.kernel_id for s in self.slots.values() if s.kernel_id is not None}
            self.run.kernels = {k: v for k, v in self.run.kernels.items() if k in live}
            self.faults.snapshot_taken()
        return kept

    def restore_snapshot(self: Grower, snapshot: Snapshot) -> None:
        """Put ``snapshot`` back (model, optimizer, slots, scheduler) and restart the compiles
        of the slots it holds that wait for a kernel (between steps): germinated ones, and those
        running their blueprint's eager module (``graft="eager"``; a snapshot taken before a
        kernel swap puts the eager module back, and its kernel is compiled again)."""
        snapshot.restore(self.model, self.optimizer, self.slots, self._extras())
        self.compiles.resume(self.slots)

    def stateful(self: Grower) -> dict[str, Any]:
        """Everything with a ``state_dict()`` the payload carries beside the model."""
        controller = self.controller if isinstance(self.controller, StatefulController) else None
        return {
            "controller": controller,
            "scheduler": self.scheduler,
            "governor": self.governor,
            "breakers": self.compiles.breakers,
            "surgery": self.surgeon.policy,
        }

    def state_dict(self: Grower, *, generator: torch.Generator | None = None) -> dict[str, Any]:
        """All growth state now, as a checkpoint payload (blocking: copies every tensor to the
        CPU; call between steps, e.g. after :meth:`end_epoch`). Save it with
        :class:`~esper_async.reliability.CheckpointStore` (or ``torch.save``).

        :param generator: the training loader's RNG, saved to resume its order.
        :returns: the payload :meth:`load_state_dict` takes.
        """
        record = {
            **self.run.record_json(),
            **self.faults.state_dict(),
            **self.surgeon.state_dict(),
            "steps_per_epoch": self.run.steps_per_epoch,
            "host_growth": self.host.state_dict(),
        }
        return capture_state(
            epoch=len(self.run.result.history),
            step=self.run.step,
            model=self.model,
            optimizer=self.optimizer,
            slots=self.slots,
            kernels=self.run.kernels,
            stateful=self.stateful(),
            record=record,
            generator=generator,
        )

    def load_state_dict(
        self: Grower,
        state: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        path: str = "",
    ) -> Restored:
        """Put :meth:`state_dict`'s payload back (replaying its surgeries on the model first);
        the next epoch is the one after the payload's last. Call before ``async with grower:``
        on a grower built as the saved one was (a fresh model, wrapped with the same slots).
        Everything that can be checked without touching the run is checked first, so a payload
        that does not verify changes nothing, with one exception: a ``host_schedule``'s growth
        is replayed first (the payload's tensors fit the grown host), and stays if the payload
        then fails; a later load of a checkpoint with less growth is refused
        (:class:`CheckpointMismatchError`), so build the model afresh for it. A slot that ran
        its blueprint's eager module when the payload was taken is rebuilt from the blueprint
        and its init seed (never unpickled) and its trained weights loaded; entering
        ``async with grower:`` compiles its kernel again.

        :param state: the payload.
        :param generator: the training loader's RNG, to resume its order.
        :param path: where ``state`` came from, for messages.
        :returns: the epoch, step, record and kernels restored.
        :raises CheckpointIntegrityError: the payload or its record is malformed.
        :raises CheckpointMismatchError: the model has surgeries the payload lacks, a recorded
            surgery does not fit it, or its tensors do not.
        """
        # Host growth first: the grown structure (and the slots copied with it) is what the
        # payload's tensors and slots fit.
        self.host.load_state_dict(_host_record(state), path)
        verified = verify_state(state, slots=self.slots, device=self.device, path=path)
        record = verified.restored.record
        try:
            faults = {
                "growth_paused_until": int(record["growth_paused_until"]),
                "oom_pause": int(record["oom_pause"]),
                "epochs_without_steps": int(record.get("epochs_without_steps", 0)),
            }
            surgeries = list(record.get("surgery", []))
            probe = type(self.run)(lambda: self.telemetry)
            probe.load_record(record, step=verified.restored.step)
        except Exception as exc:
            raise CheckpointIntegrityError(
                f"checkpoint {path} holds a malformed run record ({type(exc).__name__}: "
                f"{str(exc)[:120]})",
                path=path,
            ) from exc
        self._replay_surgeries(surgeries, path)
        restored = apply_state(
            verified,
            model=self.model,
            optimizer=self.optimizer,
            slots=self.slots,
            stateful=self.stateful(),
            generator=generator,
        )
        self.faults.load_state_dict(faults)
        self.surgeon.load_state_dict({**record, "surgery": surgeries})
        self.run.resume_at(epoch=restored.epoch, step=restored.step)
        self.run.steps_per_epoch = int(record.get("steps_per_epoch", self.run.steps_per_epoch))
        self.run.kernels = dict(restored.kernels)
        self.run.result = probe.result
        self.restored()
        self.compiles.resume(self.slots)  # loaded inside `async with grower:` (else a no-op)
        return restored

    def _replay_surgeries(self: Grower, recorded: list[dict[str, Any]], path: str) -> None:
        """Bring the model to the structure of a checkpoint that recorded ``recorded``."""
        done = self.surgeon.records
        if recorded[: len(done)] != done:
            raise CheckpointMismatchError(
                f"the model has had surgery ({done}) that checkpoint {path} does not start with "
                f"({recorded}); build the model afresh before restoring",
                path=path,
            )
        try:
            replay_operations(self.model, self.optimizer, recorded[len(done) :])
        except SurgeryError as exc:
            raise CheckpointMismatchError(
                f"the surgery of checkpoint {path} does not fit the model ({exc}); build and "
                "wrap the model as the checkpointed run did",
                path=path,
            ) from exc
        self.surgeon.records = list(recorded)

    # --- read-only views of the parts' state ---------------------------------------------------

    @property
    def compiler(self) -> BlueprintCompiler:
        """The compiler (the compile queue's)."""
        return self.compiles.compiler

    @property
    def breakers(self) -> BreakerBoard:
        """The per-blueprint breakers (the compile queue's)."""
        return self.compiles.breakers

    @property
    def step(self) -> int:
        """The global training step."""
        return self.run.step

    @property
    def epoch(self) -> int:
        """The current (or last) epoch."""
        return self.run.epoch

    @property
    def first_epoch(self) -> int:
        """The epoch this run (or resume) started at."""
        return self.run.first_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch (blending ramps are counted in steps)."""
        return self.run.steps_per_epoch

    @property
    def epoch_open(self) -> bool:
        """Whether an epoch is open (begun, not yet ended)."""
        return self.run.epoch_open

    @property
    def result(self) -> FitResult:
        """The run's record: reports, lifecycle events, incidents."""
        return self.run.result

    @property
    def kernels(self) -> dict[str, Kernel]:
        """Every kernel loaded in a slot (and in the last snapshot), by id."""
        return self.run.kernels

    @property
    def surgeries(self) -> list[dict[str, Any]]:
        """Every surgery committed on the model, as records."""
        return self.surgeon.records

    @property
    def width_trials(self) -> dict[str, WidthTrial]:
        """Widenings on trial, by slot."""
        return self.surgeon.width_trials

    @property
    def surgery(self) -> SurgeryPolicy | None:
        """The surgery policy, if any."""
        return self.surgeon.policy


def _host_record(state: dict[str, Any]) -> dict[str, Any] | None:
    """The host-growth record of a payload (``None``: none, or a payload too malformed to hold
    one: :func:`verify_state` then says what is wrong)."""
    try:
        record = json.loads(state["record"])
        host = record.get("host_growth")
    except Exception:
        return None
    return host if isinstance(host, dict) else None
