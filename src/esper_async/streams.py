"""CUDA streams and the event loop: completion bridges, and side streams for training seeds.

**Bridges.** A :class:`CompletionBridge` turns "everything queued on this stream so far has run"
into something a task can await, without blocking the event loop. Three kinds
(:class:`BridgeKind`):

``host_func`` (default)
    ``cudaLaunchHostFunc`` (or the driver's ``cuLaunchHostFunc``) queues a host function behind
    the stream's work. The host function is libc's ``close`` on the write end of a fresh pipe:
    it takes no lock, needs no GIL and calls no CUDA API, so neither CUDA rule for host functions
    can be broken. Closing the write end makes the read end readable (end of file), which wakes
    the loop's selector exactly as ``loop.call_soon_threadsafe`` does (that, too, writes to a
    pipe the selector watches). The loop waits with :func:`anyio.wait_readable`, so the bridge
    works on the asyncio backend (a selector loop: Linux, macOS; not Windows' Proactor) and on
    trio. No thread is blocked and no core spins.
``event_thread``
    a ``torch.cuda.Event(blocking=True)`` recorded on the stream and waited in a worker thread
    (``cudaEventBlockingSync``: the thread sleeps in the driver, the GIL released); the worker
    thread's return resolves the awaiting task through ``call_soon_threadsafe``.
``query_poll``
    ``Event.query()`` every ``poll_interval`` seconds. For measured comparison only: with
    ``poll_interval=0`` it keeps a core busy; with a sleep it adds up to that sleep to latency.

**Side streams.** A seed in TRAINING does not change its slot's output (the output is exactly
``h``), so its forward and backward need not hold up the host. With a side stream set on the slot
(:func:`enable_side_streams`), :func:`train_beside` runs the seed on that stream: the side stream
waits for ``h`` (``wait_stream``), ``h`` is marked as used there (``record_stream``) so the
caching allocator cannot hand its memory to the main stream while the seed still reads it, and
the slot's output is a copy of ``h`` made on the main stream, tied to the seed's output by
:class:`_SideBranch`. In backward, autograd runs the seed's backward on the stream its forward ran
on, after an event that makes the side stream wait for ``dL/dh``; at the end of ``backward()``
autograd makes the caller's stream wait for every stream that accumulated a leaf gradient, so
``optimizer.step()`` on the main stream sees the seed's gradients. :meth:`SideStreams.join`
makes that join explicit for code that reads gradients another way.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from enum import StrEnum
from typing import Any

import anyio
import structlog
import torch
from torch import nn

from ._exceptions import StreamError

__all__ = (
    "BridgeKind",
    "Completion",
    "CompletionBridge",
    "SideStreams",
    "enable_side_streams",
    "train_beside",
)

log = structlog.get_logger(__name__)

#: Default sleep between ``Event.query()`` polls of the ``query_poll`` bridge (seconds).
DEFAULT_POLL_INTERVAL = 1e-4




class BridgeKind(StrEnum):
    """How a :class:`CompletionBridge` learns that a stream's work has run (see the module doc)."""

    HOST_FUNC = "host_func"
    EVENT_THREAD = "event_thread"
    QUERY_POLL = "query_poll"


# --- cudaLaunchHostFunc through ctypes ---


def _loaded_library(fragment: str) -> str | None:
    """Path of a shared library already mapped into this process whose name contains
    ``fragment`` (so that ctypes binds to the very copy torch uses)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if fragment in os.path.basename(path):
                    return path
    except OSError:
        return None
    return None


class _HostFuncLauncher:
    """Queues libc's ``close(fd)`` as a CUDA host function: ``cudaLaunchHostFunc`` from the CUDA
    runtime torch loaded, else ``cuLaunchHostFunc`` from the driver.

    ``close`` takes an ``int``; CUDA passes a ``void*``. On the 64-bit Linux ABIs CUDA runs on
    (x86-64 SysV, AArch64) both travel in the first argument register and ``close`` reads its
    low 32 bits, so passing the descriptor as the pointer value is exact.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.close_fn = ctypes.c_void_p(ctypes.cast(libc.close, ctypes.c_void_p).value)
        self._driver_ctx: dict[int, ctypes.c_void_p] = {}
        self._local = threading.local()
        cudart = _loaded_library("libcudart.so")
        if cudart is not None:
            lib = ctypes.CDLL(cudart)
            self.launch = lib.cudaLaunchHostFunc
            self.api = "cudaLaunchHostFunc"
            self._driver: Any = None
        else:
            lib = ctypes.CDLL("libcuda.so.1")
            self.launch = lib.cuLaunchHostFunc
            self.api = "cuLaunchHostFunc"
            self._driver = lib
        self.launch.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        self.launch.restype = ctypes.c_int

    def _ensure_context(self, device: torch.device) -> None:
        """The driver API needs a current context on the calling thread: the device's primary
        context, which the CUDA runtime (and torch) use too."""
        if self._driver is None:
            return
        current = ctypes.c_void_p()
        self._driver.cuCtxGetCurrent(ctypes.byref(current))
        if current.value:
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        ctx = self._driver_ctx.get(index)
        if ctx is None:
            ctx = ctypes.c_void_p()
            rc = self._driver.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), index)
            if rc != 0:
                raise StreamError(f"cuDevicePrimaryCtxRetain failed with CUresult {rc}",
                                  device=device)
            self._driver_ctx[index] = ctx
        self._driver.cuCtxSetCurrent(ctx)

    def close_after(self, stream: torch.cuda.Stream, fd: int) -> None:
        """Queue ``close(fd)`` behind the work queued on ``stream`` so far.

        :raises StreamError: if CUDA refuses the host function (``fd`` is then still open).
        """
        self._ensure_context(stream.device)
        rc = self.launch(ctypes.c_void_p(stream.cuda_stream), self.close_fn, ctypes.c_void_p(fd))
        if rc != 0:
            raise StreamError(f"{self.api} failed with error {rc}", device=stream.device)


# --- completions ---


class Completion:
    """The completion of the work queued on one stream when it was armed; await :meth:`wait`
    once. :meth:`close` releases it without waiting (it is idempotent; :meth:`wait` calls it)."""

    async def wait(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the completion holds (a no-op unless it holds a descriptor)."""


class _PipeCompletion(Completion):
    def __init__(self, read_fd: int) -> None:
        self._fd: int | None = read_fd

    async def wait(self) -> None:
        fd = self._fd
        if fd is None:
            raise StreamError("this completion was already awaited or closed")
        try:
            await anyio.wait_readable(fd)
        finally:
            self.close()

    def close(self) -> None:
        # The write end belongs to the host function, which closes it when the stream reaches
        # it; closing the read end first is harmless (nothing is written, so no SIGPIPE).
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class _EventThreadCompletion(Completion):
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    async def wait(self) -> None:
        # Event.synchronize releases the GIL; a blocking-sync event sleeps rather than spins.
        await anyio.to_thread.run_sync(self._event.synchronize, abandon_on_cancel=True)


class _PollCompletion(Completion):
    def __init__(self, event: torch.cuda.Event, interval: float) -> None:
        self._event = event
        self._interval = interval

    async def wait(self) -> None:
        # Polling is the point of this kind: it is the measured comparison to the others.
        while not self._event.query():  # noqa: ASYNC110
            await anyio.sleep(self._interval)


class CompletionBridge:
    """Arms completions of CUDA streams that a task can await without blocking the event loop.

    Bridge once per training step or per group of seeds, not per layer: each bridge costs tens
    of microseconds (``benchmarks/bench_async.py`` measures it).

    :param kind: how completion is detected (see the module doc).
    :param poll_interval: sleep between polls of the ``query_poll`` kind (seconds; 0 spins).
    :raises StreamError: if CUDA is not available, or the host-function API cannot be found.
    :raises ValueError: if ``poll_interval`` is negative or not finite.
    """

    def __init__(
        self, kind: BridgeKind | str = BridgeKind.HOST_FUNC, *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        if not torch.cuda.is_available():
            raise StreamError("a CUDA completion bridge needs CUDA; on a CPU run steps in a "
                              "worker thread (StepRunner.for_device('cpu'))")
        if not (math.isfinite(poll_interval) and poll_interval >= 0):
            raise ValueError(f"poll_interval must be a finite number >= 0, got {poll_interval}")
        self.kind = BridgeKind(kind)
        self.poll_interval = poll_interval
        self._launcher: _HostFuncLauncher | None = None
        if self.kind is BridgeKind.HOST_FUNC:
            try:
                self._launcher = _HostFuncLauncher()
            except (OSError, AttributeError) as exc:
                raise StreamError(f"no CUDA host-function API found ({exc}); use "
                                  "BridgeKind.EVENT_THREAD") from exc

    def arm(self, stream: torch.cuda.Stream | None = None) -> Completion:
        """Mark the end of the work queued on ``stream`` so far; cheap, never blocks. May be
        called from any thread (e.g. the one that launched the work).

        :param stream: default: the calling thread's current stream.
        :raises StreamError: if CUDA refuses the host function.
        """
        stream = stream if stream is not None else torch.cuda.current_stream()
        if self._launcher is not None:
            read_fd, write_fd = os.pipe()
            try:
                self._launcher.close_after(stream, write_fd)
            except BaseException:
                os.close(read_fd)
                os.close(write_fd)
                raise
            return _PipeCompletion(read_fd)
        event = torch.cuda.Event(blocking=self.kind is BridgeKind.EVENT_THREAD)
        event.record(stream)
        if self.kind is BridgeKind.EVENT_THREAD:
            return _EventThreadCompletion(event)
        return _PollCompletion(event, self.poll_interval)

    async def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Await the work queued on ``stream`` so far (:meth:`arm`, then wait).

        Cancelling the wait does not cancel the GPU work; it runs to its end.
        """
        completion = self.arm(stream)
        try:
            await completion.wait()
        finally:
            completion.close()

    @property
    def api(self) -> str:
        """The CUDA call behind the bridge (for reports)."""
        if self._launcher is not None:
            return self._launcher.api
        return "cudaEventSynchronize" if self.kind is BridgeKind.EVENT_THREAD else "cudaEventQuery"


# --- side streams for seeds in TRAINING ---


class _SideBranch(torch.autograd.Function):
    """``out = h`` in value, with the gradient of ``out`` also sent to ``s`` (the seed's output),
    as in ``h + (s - s.detach())``, but without reading ``s``: the main stream never waits for
    the seed in forward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, s: torch.Tensor, stream: Any) -> torch.Tensor:
        ctx.stream = stream
        # A copy, not h itself: the seed reads h on the side stream, so an in-place op
        # downstream (ReLU(inplace=True)) must not write into it.
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.stream is not None and grad.is_cuda:
            # grad is made on this (main) stream and read by the seed's backward on the side
            # stream: keep the allocator from reusing it before the side stream is done.
            grad.record_stream(ctx.stream)
        return grad, grad, None


def train_beside(
    seed: nn.Module, h: torch.Tensor, stream: torch.cuda.Stream | None
) -> torch.Tensor:
    """The output of a slot whose seed is in TRAINING, with the seed run on ``stream``.

    Equal in value to ``h``; the seed learns from the gradient of the output as if it were
    blended (as ``h + (s - s.detach())`` with ``s = seed(h.detach())``), and gradients of the
    host are those of the plain path. With ``stream=None`` (or a CPU tensor) nothing changes
    streams, which lets the autograd part be checked on a CPU.

    :param seed: the seed module, shape ``(N, *S) -> (N, *S)``.
    :param h: the host's output, ``(N, *S)``.
    :param stream: the side stream, on ``h``'s device.
    :returns: a new tensor equal to ``h``.
    """
    if stream is None or not h.is_cuda:
        return _SideBranch.apply(h, seed(h.detach()), None)
    stream.wait_stream(torch.cuda.current_stream(h.device))
    with torch.cuda.stream(stream):
        s = seed(h.detach())
    h.record_stream(stream)
    return _SideBranch.apply(h, s, stream)


class SideStreams:
    """Side streams lent to the slots of one model; made by :func:`enable_side_streams`.

    A context manager: leaving it takes the streams back (the slots run their seeds inline again).

    :ivar streams: the streams, in the order they were lent.
    :ivar slots: names of the slots that got one.
    """

    def __init__(self, slots: dict[str, Any], streams: list[torch.cuda.Stream]) -> None:
        self._slots = slots
        self.streams = streams
        self.slots = tuple(slots)

    def join(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for all work queued on the side
        streams so far. Cheap (an event per stream); call it before reading seed gradients
        outside ``backward()`` or before bridging a step's completion."""
        target = stream if stream is not None else torch.cuda.current_stream()
        for side in self.streams:
            target.wait_stream(side)

    def close(self) -> None:
        """Take the streams back from the slots (after joining them)."""
        if self.streams:
            self.join()
        for slot in self._slots.values():
            slot.side_stream = None
        self._slots = {}

    def __enter__(self) -> SideStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_side_streams(
    model: nn.Module, *, streams: int | None = None, device: torch.device | str | None = None
) -> SideStreams:
    """Give each seed slot of ``model`` a CUDA side stream on which a TRAINING seed runs.

    :param model: a model with :class:`~esper_async.SeedSlot` s (made by ``wrap``).
    :param streams: how many streams to share among the slots (round robin); default one per
        slot. Seeds sharing a stream run one after another on it.
    :param device: the CUDA device; default the device of the model's first parameter.
    :returns: the lent streams (see :class:`SideStreams`).
    :raises StreamError: if CUDA is not available or the model is not on a CUDA device.
    :raises ValueError: if ``streams`` is less than 1.
    """
    from .seeds import find_slots  # seeds imports this module: import at call time

    if streams is not None and streams < 1:
        raise ValueError(f"streams must be at least 1, got {streams}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise StreamError(f"side streams need a CUDA device, the model is on {device}; "
                          "on a CPU seeds run inline", device=device)
    slots = find_slots(model)
    count = len(slots) if streams is None else min(streams, max(1, len(slots)))
    pool = [torch.cuda.Stream(device=device) for _ in range(count)]
    for i, slot in enumerate(slots.values()):
        slot.side_stream = pool[i % count]
    log.debug("side streams enabled", slots=len(slots), streams=count, device=str(device))
    return SideStreams(dict(slots), pool)
