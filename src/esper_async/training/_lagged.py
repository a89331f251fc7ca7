"""``LaggedPump``: a lagged run's epoch — steps launched with their verdicts judged on the device,
read some steps later.

A bad verdict puts the steps launched after it (which applied nothing: the device's halt) back at
the front of the queue, and the batch itself takes the synchronous path (judged on the host),
whose handling of it is the reference. The step itself is the trainer's
(:meth:`esper_async.Trainer._step`); this is only the order in which steps are launched and read.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import LossAnomaly, SeedRuntimeError
from ..reliability import Governor
from ..telemetry import Telemetry
from ._prefetch import Ready
from ._verdict import LaggedVerdicts, Launched

__all__ = ("LaggedPump",)

#: A batch waiting to be stepped, and whether it must take the synchronous path.
Queued = tuple[Any, Ready, bool]


class LaggedPump:
    """The queue of one lagged epoch.

    :param verdicts: the run's lagged verdicts.
    :param governor: its warm-up sets the lag to 0 (the first threshold needs every loss).
    :param telemetry: returns the run's telemetry now.
    :param step: returns the global step now.
    :param epoch: returns the epoch now.
    :param launch: ``launch(batch, ready)``: launch a lagged step; ``(undo, done)``.
    :param sync_step: ``sync_step(batch, ready)``: a step judged on the host (guarded).
    :param stepped: ``stepped(loss)``: a step's verdict was read and it applied.
    """

    def __init__(
        self,
        verdicts: LaggedVerdicts,
        governor: Governor,
        *,
        telemetry: Callable[[], Telemetry],
        step: Callable[[], int],
        epoch: Callable[[], int],
        launch: Callable[[Any, Ready], Awaitable[tuple[Any, Any]]],
        sync_step: Callable[[Any, Ready], Awaitable[None]],
        stepped: Callable[[float], None],
    ) -> None:
        self.verdicts = verdicts
        self.governor = governor
        self._telemetry, self._step, self._epoch = telemetry, step, epoch
        self._launch, self._sync_step, self._stepped = launch, sync_step, stepped
        self.queue: deque[Queued] = deque()
        self.in_flight: deque[Launched] = deque()

    async def push(self, batch: Any, ready: Ready) -> None:
        """Queue ``batch`` and launch what the lag allows."""
        self.queue.append((batch, ready, False))
        await self.pump(self.verdicts.lag)

    async def pump(self, lag: int) -> None:
        """Launch the queued batches, reading verdicts once more than ``lag`` steps are in flight
        (``0``: drain). A batch whose launch raised (a seed raised, the backward failed) waits
        for the steps in flight to be read, then takes the synchronous path."""
        queue, in_flight, verdicts = self.queue, self.in_flight, self.verdicts
        while queue or len(in_flight) > lag:
            # During the governor's warm-up, the spike threshold of the next step depends on the
            # losses in flight (it turns finite once enough are read): read them first.
            now = 0 if self.governor.warming_up else lag
            if len(in_flight) > now or (in_flight and queue and queue[0][2]):
                queue.extendleft(reversed(await self._resolve()))
                continue
            batch, ready, sync = queue.popleft()
            if sync:  # nothing is in flight: a halt left by the failed launch is stale
                verdicts.clear()
                await self._sync_step(batch, ready)
                continue
            telemetry = self._telemetry()
            with telemetry.step_span(self._step() + len(in_flight), epoch=self._epoch()):
                started = time.perf_counter()
                try:
                    undo, done = await self._launch(batch, ready)
                except (SeedRuntimeError, LossAnomaly):
                    queue.appendleft((batch, None, True))  # its copy was already waited for
                    continue
                finally:
                    telemetry.metrics.step_finished(time.perf_counter() - started)
            in_flight.append(Launched(batch, verdicts.launches - 1, undo, done))

    async def _resolve(self) -> list[Queued]:
        """Read the oldest verdict in flight and act on it. :returns: the batches to run again."""
        in_flight, verdicts = self.in_flight, self.verdicts
        launched = in_flight.popleft()
        value, ok = await verdicts.read(launched)
        if ok:
            self.governor.accept(value)
            self._stepped(value)
            return []
        # Nothing since this step has applied (the halt): undo what the host holds, lift the
        # halt, and let the synchronous path judge this batch again on the same model.
        again: list[Queued] = [(x.batch, None, False) for x in in_flight]
        for later in in_flight:
            if later.done is not None:
                await later.done.wait()
        in_flight.clear()
        launched.undo.restore()
        verdicts.clear()
        await self._sync_step(launched.batch, None)
        return again
