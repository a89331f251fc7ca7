"""CUDA completion bridges: awaiting a stream's work from the event loop.

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

from ..errors import StreamError

__all__ = ("BridgeKind", "Completion", "CompletionBridge")

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
