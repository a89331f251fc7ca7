"""Running training steps off the event loop, and measuring how free the loop stays.

:class:`StepRunner` runs one step — a plain function that launches the step's work — so that the
loop is never blocked by it:

* on a CPU (:class:`ThreadStepRunner`) the step runs in a worker thread;
* on a GPU (:class:`CudaStepRunner`) the step's kernels are launched from a worker thread (the
  launch itself takes CPU time: Python, autograd, the dispatcher), then the loop awaits the
  completion of the step's stream through a :class:`~esper_async.runtime.CompletionBridge`, once
  per step. The result is returned when the GPU has finished, so reading it (``float(loss)``)
  does not wait.

Steps are serialised (one at a time per runner): the training task is the one writer of the model.

:class:`LoopLagMonitor` is a heartbeat task that sleeps for a fixed interval and records how late
it wakes; its p50 / p99 lateness is the loop lag.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
import structlog
import torch
from anyio.abc import TaskGroup, TaskStatus

from ..errors import StreamError
from ._bridge import BridgeKind, Completion, CompletionBridge

__all__ = ("CudaStepRunner", "LagStats", "LoopLagMonitor", "StepRunner", "ThreadStepRunner")

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Default heartbeat interval of :class:`LoopLagMonitor` (seconds): often enough to catch a stall
#: of a few milliseconds, rarely enough to cost nothing measurable.
DEFAULT_HEARTBEAT_S = 0.005
#: Lag samples kept (a ring): hours of heartbeats at the default interval would not fit in less.
DEFAULT_MAX_SAMPLES = 200_000


class StepRunner:
    """Runs training steps without blocking the event loop. Make one with :meth:`for_device`.

    :ivar device: the device the steps run on.
    """

    device: torch.device

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # One step at a time: the training task is the model's only writer.
        self._limiter = anyio.CapacityLimiter(1)
        #: :meth:`launch` runs ``fn`` on the event loop's thread, not a worker thread (a GPU
        #: only: ``fn`` must queue device work and never wait for it).
        self.launch_on_loop = False

    @staticmethod
    def for_device(
        device: torch.device | str, *, bridge: BridgeKind | str = BridgeKind.HOST_FUNC,
        side_streams: Any = None,
    ) -> StepRunner:
        """The runner for ``device``: a worker thread on a CPU, launch-and-bridge on a GPU.

        :param device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        :param bridge: how a GPU step's completion is awaited (ignored on a CPU).
        :param side_streams: a :class:`~esper_async.seeds.SideStreams` whose streams every step
            joins before its completion is bridged (ignored on a CPU).
        :raises ValueError: for a device type other than CPU and CUDA.
        :raises StreamError: for a CUDA device when CUDA is not available.
        """
        device = torch.device(device)
        if device.type == "cpu":
            return ThreadStepRunner(device)
        if device.type == "cuda":
            return CudaStepRunner(device, bridge=bridge, side_streams=side_streams)
        raise ValueError(f"StepRunner supports 'cpu' and 'cuda' devices, not {device.type!r}")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` off the loop and return its result once its work is done.

        :raises: whatever ``fn`` raises.
        """
        raise NotImplementedError

    async def launch(self, fn: Callable[..., T], *args: Any) -> tuple[T, Completion | None]:
        """Run ``fn(*args)`` off the loop (on it with :attr:`launch_on_loop`) and return as soon
        as its work is *queued*: the next step can be launched while this one runs on the
        device (lagged verdicts).

        :returns: ``fn``'s result and the completion of its work, to await (or close) later;
            ``None`` where the work is done when ``fn`` returns (a CPU).
        :raises: whatever ``fn`` raises.
        """
        raise NotImplementedError


class ThreadStepRunner(StepRunner):
    """CPU steps: ``fn`` runs in a worker thread (torch releases the GIL inside its ops)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def launch(self, fn: Callable[..., T], *args: Any) -> tuple[T, Completion | None]:
        return await self.run(fn, *args), None


class CudaStepRunner(StepRunner):
    """GPU steps: launch in a worker thread, then await the stream's completion on the loop.

    The step runs with ``device`` current, on that thread's current stream (the default stream
    unless ``fn`` sets one). Side-stream work that ``fn`` leaves unjoined is joined
    (``side_streams``) before the completion is armed, so the awaited completion covers it.

    :param device: a CUDA device.
    :param bridge: the bridge kind.
    :param side_streams: see :meth:`StepRunner.for_device`.
    :raises StreamError: if CUDA is not available.
    """

    def __init__(
        self, device: torch.device | str, *, bridge: BridgeKind | str = BridgeKind.HOST_FUNC,
        side_streams: Any = None,
    ) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaStepRunner needs a CUDA device, got {device}")
        if not torch.cuda.is_available():
            raise StreamError("CUDA is not available; use StepRunner.for_device('cpu')",
                              device=device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device)
        self.bridge = CompletionBridge(bridge)
        self.side_streams = side_streams

    def _launch(self, fn: Callable[..., T], args: tuple[Any, ...], armed: list[Completion]) -> T:
        with torch.cuda.device(self.device):
            result = fn(*args)
            stream = torch.cuda.current_stream(self.device)
            if self.side_streams is not None:
                self.side_streams.join(stream)
            armed.append(self.bridge.arm(stream))
        return result

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        armed: list[Completion] = []
        try:
            result = await anyio.to_thread.run_sync(
                self._launch, fn, args, armed, limiter=self._limiter
            )
            await armed[0].wait()
        finally:
            for completion in armed:
                completion.close()
        return result

    async def launch(self, fn: Callable[..., T], *args: Any) -> tuple[T, Completion | None]:
        armed: list[Completion] = []
        try:
            if self.launch_on_loop:
                # Grad mode is per thread: a worker thread starts with it on, so does this.
                with torch.inference_mode(False), torch.enable_grad():
                    result = self._launch(fn, args, armed)
                # The loop's other tasks run between launches; the step is queued, so a
                # cancellation must not drop it (the thread path's wait is shielded too).
                await anyio.lowlevel.cancel_shielded_checkpoint()
            else:
                result = await anyio.to_thread.run_sync(
                    self._launch, fn, args, armed, limiter=self._limiter
                )
        except BaseException:
            for completion in armed:
                completion.close()
            raise
        return result, armed[0]


# --- loop lag ---


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in [0, 1])."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LagStats:
    """Lateness of a heartbeat, in milliseconds.

    :ivar samples: heartbeats measured.
    :ivar p50_ms: median lateness.
    :ivar p99_ms: 99th percentile (nearest rank).
    :ivar max_ms: worst lateness.
    :ivar mean_ms: mean lateness.
    """

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def from_seconds(cls, lateness: list[float]) -> LagStats:
        """Statistics of lateness samples given in seconds (``nan`` figures when empty)."""
        ordered = sorted(lateness)
        n = len(ordered)
        return cls(
            samples=n,
            p50_ms=_percentile(ordered, 0.50) * 1e3,
            p99_ms=_percentile(ordered, 0.99) * 1e3,
            max_ms=(ordered[-1] if n else math.nan) * 1e3,
            mean_ms=(sum(ordered) / n if n else math.nan) * 1e3,
        )


class LoopLagMonitor:
    """A heartbeat task measuring the event loop's lag while the ``async with`` block runs.

    Every ``interval`` seconds it sleeps and records how much later than asked it woke. A loop
    that is never blocked shows a lateness of a fraction of a millisecond; a loop that runs a
    50 ms computation shows a 50 ms sample.

    Resource handling: the heartbeat lives in the monitor's own task group, started on entry
    (``task_status.started()`` before its first sleep) and cancelled on exit.

    :param interval: heartbeat period in seconds.
    :param clock: a monotonic clock in seconds (injectable for tests).
    :param max_samples: how many of the latest samples are kept.
    :raises ValueError: if ``interval`` is not positive or ``max_samples`` is less than 1.
    """

    def __init__(
        self, *, interval: float = DEFAULT_HEARTBEAT_S,
        clock: Callable[[], float] = time.perf_counter, max_samples: int = DEFAULT_MAX_SAMPLES,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, got {interval}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        self.interval = interval
        self._clock = clock
        self._max = max_samples
        self._samples: list[float] = []
        self._next = 0
        self._tg: TaskGroup | None = None

    def record(self, lateness: float) -> None:
        """Add one lateness sample (seconds); the heartbeat calls this."""
        if len(self._samples) < self._max:
            self._samples.append(lateness)
        else:
            self._samples[self._next] = lateness
            self._next = (self._next + 1) % self._max

    @property
    def samples(self) -> tuple[float, ...]:
        """The lateness samples kept, in seconds (oldest first once the ring has wrapped)."""
        return tuple(self._samples[self._next:] + self._samples[: self._next])

    def stats(self) -> LagStats:
        """Statistics of the samples kept so far."""
        return LagStats.from_seconds(self._samples)

    def reset(self) -> None:
        """Forget the samples taken so far."""
        self._samples = []
        self._next = 0

    async def _heartbeat(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        clock, interval = self._clock, self.interval
        while True:
            start = clock()
            await anyio.sleep(interval)
            self.record(max(0.0, clock() - start - interval))

    async def __aenter__(self) -> LoopLagMonitor:
        if self._tg is not None:
            raise RuntimeError("this LoopLagMonitor is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self._heartbeat)
        except BaseException as exc:
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._tg = tg
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)
