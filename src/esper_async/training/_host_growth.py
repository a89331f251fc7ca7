"""The Grower's host growth: a :class:`~esper_async.surgery.GrowthSchedule` driven at step
boundaries, its record in the Grower's one state path, and its replay on resume.

The schedule grows the host itself (stacked blocks, a wider residual stream, wider channels)
from a start shape toward a target. Seeds and host growth coexist: after a growth the Grower's
slots are found again (copied blocks bring renamed copies of their slots), the module steps run
is rewrapped, and a new rollback snapshot is taken, since a snapshot of the smaller host can no
longer be restored onto the grown one.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ..errors import SurgeryError, TrainingConfigError
from ..reliability import CheckpointMismatchError
from ..seeds import find_slots
from ..surgery import GrowthSchedule, HostGrowthEvent

if TYPE_CHECKING:
    from ._grower import Grower

__all__ = ("HostGrowth",)

log = structlog.get_logger(__name__)


class HostGrowth:
    """Holds a Grower's :class:`GrowthSchedule` (or none) and applies it.

    :param grower: the Grower whose model the schedule grows.
    :param schedule: the schedule, built on the Grower's model and optimizer.
    :raises TrainingConfigError: the schedule grows another model or optimizer.
    """

    def __init__(self, grower: Grower, schedule: GrowthSchedule | None) -> None:
        if schedule is not None and (
            schedule.model is not grower.model or schedule.optimizer is not grower.optimizer
        ):
            raise TrainingConfigError(
                "the host_schedule was built on another model or optimizer than the Grower's: "
                "build it with GrowthSchedule(model, optimizer, ...) on the same objects"
            )
        self.grower = grower
        self.schedule = schedule

    async def grow(self, *, tokens: int, loss: float | None) -> list[HostGrowthEvent]:
        """Fire the stages due at this step boundary; bring the Grower up to date after each.

        :raises SurgeryError: a stage failed (the model and optimizer are as before it).
        """
        if self.schedule is None:
            return []
        g = self.grower
        events = await self.schedule.maybe_grow_async(step=g.step, tokens=tokens, loss=loss)
        if events:
            self._adopt()
            await g.snapshot()
            for event in events:
                log.info(
                    "host grown",
                    stage=event.name,
                    step=event.step,
                    epoch=g.epoch,
                    parameters_before=event.parameters_before,
                    parameters_after=event.parameters_after,
                    seconds=round(event.seconds, 4),
                )
        return events

    def _adopt(self) -> None:
        """Take the schedule's (possibly new) model and its slots into the Grower."""
        assert self.schedule is not None
        g = self.grower
        g.model = self.schedule.model
        # In place: the step guard and the Grower's parts hold this very dict.
        g.slots.clear()
        g.slots.update(find_slots(g.model))
        g.restored()

    def state_dict(self) -> dict[str, Any] | None:
        """The schedule's progress (JSON-ready), or ``None`` without a schedule."""
        return None if self.schedule is None else self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None, path: str) -> None:
        """Replay the growth a checkpoint recorded on the freshly built start model (before its
        tensors are loaded).

        :raises CheckpointMismatchError: the checkpoint recorded host growth and the Grower has
            no schedule, or its stages do not fit this schedule or model.
        """
        saved = len(state.get("events", [])) if state else 0
        if self.schedule is not None and saved < len(self.schedule.events):
            raise CheckpointMismatchError(
                f"the model has grown by {len(self.schedule.events)} host-growth stages and "
                f"checkpoint {path} records {saved}; build the model and the schedule afresh "
                "to restore it",
                path=path,
            )
        if not state or not saved:
            return
        if self.schedule is None:
            raise CheckpointMismatchError(
                f"checkpoint {path} recorded host growth ({len(state['events'])} stages); build "
                "the Grower with the same host_schedule to resume it",
                path=path,
            )
        try:
            self.schedule.load_state_dict(state)
            _run_outside_loop(self.schedule.replay_async)
        except SurgeryError as exc:
            raise CheckpointMismatchError(
                f"the host growth of checkpoint {path} does not fit ({exc}); build the model and "
                "the schedule as the checkpointed run did",
                path=path,
            ) from exc
        self._adopt()


def _run_outside_loop(fn: Any) -> Any:
    """Run the coroutine function ``fn`` to completion from synchronous code, also when an
    event loop is running in this thread (``load_state_dict`` is a blocking call that a user
    may make from async code): then it runs in a thread of its own, which this one waits for."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(fn)
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = anyio.run(fn)
        except BaseException as exc:  # handed to the caller below
            out["error"] = exc

    thread = threading.Thread(target=target, name="esper-host-replay")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def check_for_trainer(schedule: GrowthSchedule) -> None:
    """Refuse what the Trainer cannot drive: it calls the schedule once per epoch boundary with
    the step count, and steps learning rates through its own ``scheduler``.

    :raises TrainingConfigError: a stage whose only trigger is ``at_tokens`` (it would never
        fire), or a schedule that sets learning rates (``lr``; they would move once per epoch).
    """
    if schedule.lr is not None:
        raise TrainingConfigError(
            "the Trainer calls a host_schedule once per epoch, so its GrowthLR would set the "
            "learning rate once per epoch: build the schedule with lr=None and give the Trainer "
            "a scheduler=, or drive the schedule per step from your own loop with a Grower"
        )
    for stage in schedule.stages:
        if stage.at_step is None and stage.plateau is None:
            raise TrainingConfigError(
                f"host_schedule stage {stage.name!r} triggers on tokens only, which the Trainer "
                "does not count: give it at_step= (steps) or plateau= (counted in epochs here)"
            )
