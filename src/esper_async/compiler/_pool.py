"""``ProcessPool``: a bounded pool of spawn-context worker processes, driven from anyio.

Workers are fresh interpreters (``multiprocessing`` spawn context: never fork a process that holds
torch threads or a CUDA context). Each one sets its torch and Inductor thread counts and puts itself
under the ``SCHED_IDLE`` scheduling policy before it reports ready, so compiles use only the cores
training leaves idle.

Resource handling: the pool is opened with ``async with``; leaving it kills every worker. A worker
whose call is cancelled or times out is killed, not reused: its state is unknown.

Error handling: a worker that dies mid-call raises :class:`WorkerDiedError`; the next call starts a
fresh worker. A worker that exits on its own before it is ready (most often because the script
that opened the pool has no ``if __name__ == "__main__":`` guard, so spawn re-ran it in the worker)
raises :class:`WorkerStartError`: trying again would fail the same way.
"""

from __future__ import annotations

import ast
import importlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Protocol

import anyio
import structlog

from ..errors import EsperError

__all__ = ("CompileExecutor", "ProcessPool", "WorkerDiedError", "WorkerError", "WorkerStartError")

log = structlog.get_logger(__name__)

#: Niceness of worker processes where SCHED_IDLE is not allowed: when training and a compile
#: compete for a core, the kernel scheduler then still favours training.
WORKER_NICENESS = 10
#: Seconds to wait for a worker whose pipe closed to be reaped: the pipe closes as the process
#: exits, a moment before its exit code can be read.
_REAP_TIMEOUT = 5.0
#: Names whose use in the main script counts as a ``__main__`` guard (see
#: :func:`_unguarded_main`), and the most of a script read to look for them.
_GUARD_NAMES = frozenset({"__name__", "parent_process", "current_process"})
_GUARD_READ_MAX = 16 << 20
#: Seconds a closing pool gives its idle workers to exit on their own before killing them. Short: a
#: worker holds nothing that needs a clean exit, and a run's end must not wait on a slow
#: interpreter teardown (measured: 2 s per worker on a loaded 2-core machine, the old grace).
CLOSE_GRACE_S = 0.2


class WorkerDiedError(RuntimeError):
    """A worker process exited (or was killed) while running a call."""


class WorkerError(RuntimeError):
    """A call raised inside the worker; the message carries the worker-side traceback."""


class WorkerStartError(EsperError):
    """Compile workers cannot start: one exited on its own before it was ready to take a call,
    or the main script has no ``if __name__ == "__main__":`` guard (found before any worker is
    spawned, when the first one is about to be).

    A worker is a fresh interpreter (spawn) that first re-imports the script that started it;
    a script without the guard would run its training again there. Retrying cannot help, so
    this ends the run, at the first compile, however short the run.

    :ivar exit_code: the worker's exit code (``None`` when it reported a failure and exited, or
        was never spawned).
    :ivar main_path: the main script that spawn re-imported (``None`` when there is none).
    """

    def __init__(self, message: str, *, exit_code: int | None, main_path: str | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.main_path = main_path


class CompileExecutor(Protocol):
    """Where compile jobs run. The process pool is one; a distributed executor (e.g. Ray actors)
    could be another, behind the same two calls."""

    async def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn(*args)`` (picklable, module-level) and return its result."""
        ...

    async def __aenter__(self) -> CompileExecutor: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def _worker_main(
    conn: Connection,
    threads: int,
    imports: Sequence[str],
    niceness: int,
    warm_up: WarmUp | None = None,
) -> None:
    """The loop of one worker process: receive ``(fn, args)``, send back the outcome."""
    try:
        _set_up_worker(threads, imports, niceness)
    except BaseException as exc:  # tell the parent why, rather than only dying
        conn.send(("failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    if warm_up is not None:
        fn, args = warm_up
        try:
            fn(*args)
        except Exception:  # a warm-up only saves time: the first real job reports any fault
            pass
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        fn, args = message
        try:
            result = fn(*args)
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        else:
            conn.send(("ok", result))


#: A job each worker runs once after its imports and before it reports ready: ``(fn, args)``,
#: picklable (a module-level function). It pays a worker's one-time costs (lazy imports, a
#: device's context, first-call caches) during the pool's start-up instead of in the first job.
WarmUp = tuple[Callable[..., Any], tuple[Any, ...]]


def _set_up_worker(threads: int, imports: Sequence[str], niceness: int) -> None:
    try:
        # SCHED_IDLE: the worker runs only on a core that training leaves idle, so compiles
        # never slow a training step that wants both cores; plain niceness is the fallback.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(niceness)
        except OSError:
            pass
    import torch

    torch.set_num_threads(threads)
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = threads
    except ImportError:
        pass
    for name in imports:
        importlib.import_module(name)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "did not exit (it closed its pipe)"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _main_path() -> str | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path if isinstance(path, str) else None


def _unguarded_main() -> str | None:
    """The main script's path when spawn will re-run it in every worker and nothing in it tests
    ``__name__`` (``None``: it has a guard, there is no script, spawn does not re-run it, or it
    cannot be read or parsed: then nothing is claimed about it).

    Spawn re-imports the main module in a worker unless it was run as ``python -m pkg`` (a
    package's ``__main__``) or ``python dir/`` (:mod:`multiprocessing.spawn` skips those).
    Any mention of ``__name__`` (either order, any comparison) or of
    ``multiprocessing.parent_process``/``current_process`` counts as a guard.
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if isinstance(name, str) and (name == "__main__" or name.endswith(".__main__")):
        return None
    path = _main_path()
    if path is None or not path.endswith(".py"):
        return None
    try:
        with open(path, "rb") as file:
            source = file.read(_GUARD_READ_MAX + 1)
        if len(source) > _GUARD_READ_MAX:
            return None
        tree = ast.parse(source, filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in _GUARD_NAMES:
            return None
        if isinstance(node, ast.Attribute) and node.attr in _GUARD_NAMES:
            return None
    return path


def _guard_fix(path: str) -> str:
    return (
        f'{path} has no `if __name__ == "__main__":` guard. Each compile worker is a spawned '
        f"interpreter that first re-imports that script, so the script's training would run "
        f"again in every worker. Put the code that trains under the guard, e.g.\n\n"
        f'    if __name__ == "__main__":\n        anyio.run(main)\n'
    )


def _unguarded_error(path: str) -> WorkerStartError:
    """The error raised before any worker is spawned for a main script without the guard."""
    return WorkerStartError(
        f"compile workers not started: {_guard_fix(path)}", exit_code=None, main_path=path
    )


def _start_failure(pid: int | None, code: int | None) -> WorkerStartError:
    """The error for a worker that exited on its own before it was ready: say why and the fix.
    (A script without the guard never gets here: :meth:`ProcessPool._start` refuses it first.)"""
    path = _main_path()
    where = "the main script" if path is None else path
    message = (
        f"compile worker process {pid} {_exit_text(code)} while starting, before it ran any "
        f"esper_async code: spawn re-imports {where} in each worker, and its top-level code "
        f"failed there (its traceback is on stderr). Keep the code that trains under "
        f'`if __name__ == "__main__":`, and the script\'s top level free of anything that '
        f"cannot run twice."
    )
    return WorkerStartError(message, exit_code=code, main_path=path)


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pid: int | None = process.pid

    async def receive(self) -> Any:
        await anyio.wait_readable(self.conn.fileno())
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            error = exc
        # The pipe closes as the process exits, before it is reaped: wait for its exit code.
        await anyio.to_thread.run_sync(self.process.join, _REAP_TIMEOUT)
        raise WorkerDiedError(
            f"worker process {self.pid} {_exit_text(self.process.exitcode)}"
        ) from error

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class ProcessPool:
    """A bounded pool of worker processes.

    :param size: most workers alive, and most calls in flight, at once.
    :param threads: torch (and Inductor compile) threads in each worker.
    :param imports: modules each worker imports before its first call (e.g. modules that register
        user blueprint families).
    :param start_timeout: seconds a worker may take to start, import torch and warm up.
    :param prestart: start ``size`` workers as soon as the pool opens, in the background;
        ``False``: at the first :meth:`run` (or :meth:`start_workers`, :meth:`wait_ready`), so a
        run that never compiles never starts one.
    :param warm_up: a job (:data:`WarmUp`) each worker runs once before it reports ready; its
        failure is ignored (the first real job meets the same fault and reports it).
    :ivar start_seconds: wall seconds each worker took to start (spawn, import torch, warm up,
        report ready), in order: what the pool's start-up costs, spent off the event loop.
    """

    def __init__(
        self,
        size: int = 1,
        *,
        threads: int = 1,
        imports: Sequence[str] = (),
        start_timeout: float = 60.0,
        prestart: bool = True,
        warm_up: WarmUp | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one worker, got size={size}")
        self.size = size
        self.threads = threads
        self.imports = tuple(imports)
        self.start_timeout = start_timeout
        self.prestart = prestart
        self.warm_up = warm_up
        self._unguarded: list[str | None] | None = None  # [the unguarded main script], once read
        self._context = multiprocessing.get_context("spawn")
        self._limiter = anyio.CapacityLimiter(size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = anyio.Event()
        self._starting = False
        self.start_seconds: list[float] = []

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers, idle and busy."""
        return [w.pid for w in [*self._idle, *self._busy] if w.pid is not None]

    async def __aenter__(self) -> ProcessPool:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._started = anyio.Event()
        self._starting = False
        if self.prestart:
            self.start_workers()
        return self

    def start_workers(self) -> None:
        """Start ``size`` workers in the background now, unless they were started already.

        :raises RuntimeError: the pool is not open.
        """
        if self._tg is None:
            raise RuntimeError("the pool is not open; use `async with ProcessPool(...)` first")
        if not self._starting:
            self._starting = True
            self._tg.start_soon(self._prestart_all)

    async def wait_ready(self) -> None:
        """Start the workers if they are not started yet, and wait until they are ready (or
        failed to start)."""
        self.start_workers()
        await self._started.wait()

    async def _prestart_all(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.size):
                    tg.start_soon(self._prestart_one)
        finally:
            self._started.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            # Only the background start-up tasks live in this group; an exception from the body
            # of the caller's `async with` propagates on its own, unwrapped.
            await self._tg.__aexit__(None, None, None)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self._close_all()

    async def _close_all(self) -> None:
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + CLOSE_GRACE_S  # one grace for all, not one each
        for worker in workers:
            await anyio.to_thread.run_sync(
                worker.process.join, max(0.0, deadline - time.monotonic())
            )
            worker.kill()
            await anyio.to_thread.run_sync(worker.process.join, 2.0)

    async def _prestart_one(self) -> None:
        async with self._limiter:
            if len(self._idle) + len(self._busy) >= self.size:
                return  # a call already started the worker this task was meant to start
            try:
                self._idle.append(await self._start_timed())
            except (WorkerDiedError, WorkerStartError) as exc:
                log.warning("worker failed to start", error=str(exc))

    async def _start_timed(self) -> _Worker:
        started = time.perf_counter()
        worker = await self._start()
        self.start_seconds.append(time.perf_counter() - started)
        return worker

    async def _start(self) -> _Worker:
        if self._unguarded is None:  # read the main script once per pool, off the loop
            self._unguarded = [await anyio.to_thread.run_sync(_unguarded_main)]
        [unguarded] = self._unguarded
        if unguarded is not None:  # known before spawning: say so at once, start nothing
            raise _unguarded_error(unguarded)
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child, self.threads, self.imports, WORKER_NICENESS, self.warm_up),
            daemon=True,
            name="esper-compile-worker",
        )
        await anyio.to_thread.run_sync(process.start)
        child.close()
        worker = _Worker(process, parent)
        try:
            with anyio.fail_after(self.start_timeout):
                status, payload = await worker.receive()
        except TimeoutError as exc:
            worker.kill()
            raise WorkerDiedError(f"worker did not start within {self.start_timeout} s") from exc
        except WorkerDiedError as exc:
            worker.kill()
            code = worker.process.exitcode
            if code is not None and code >= 0:  # it exited on its own: no retry can help
                raise _start_failure(worker.pid, code) from exc
            raise
        except BaseException:
            worker.kill()
            raise
        if status == "failed":  # it sent why and is exiting
            await anyio.to_thread.run_sync(worker.process.join, _REAP_TIMEOUT)
            worker.kill()
            raise WorkerStartError(
                f"compile worker process {worker.pid} could not set itself up (check the "
                f"modules given as imports=, {list(self.imports)}): {payload}",
                exit_code=worker.process.exitcode,
                main_path=_main_path(),
            )
        log.debug("worker started", pid=payload, status=status)
        return worker

    async def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run ``fn(*args)`` in a worker and return its result.

        :param fn: a picklable, module-level function.
        :param timeout: seconds the call may take (worker start excluded); on expiry the worker is
            killed and ``TimeoutError`` raised.
        :raises WorkerDiedError: if the worker exits during the call.
        :raises WorkerStartError: if a worker started for the call exits on its own before it
            is ready (a script without the ``__main__`` guard, a failing import).
        :raises WorkerError: if ``fn`` raised in the worker.
        :raises TimeoutError: if the call ran past ``timeout``.
        """
        self.start_workers()  # a lazy pool starts its workers at its first call
        async with self._limiter:
            worker = self._idle.pop() if self._idle else await self._start_timed()
            self._busy.add(worker)
            healthy = False
            try:
                with anyio.fail_after(timeout):
                    worker.conn.send((fn, args))
                    status, value = await worker.receive()
                healthy = True
            finally:
                self._busy.discard(worker)
                if healthy:
                    self._idle.append(worker)
                else:  # cancelled, timed out or died: its state is unknown, never reuse it
                    worker.kill()
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(worker.process.join, 2.0)
        if status == "error":
            raise WorkerError(value)
        return value
