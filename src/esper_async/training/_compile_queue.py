"""``CompileQueue``: the grower's compiles in flight, and what gates them.

It owns the task group compiles run in (opened by ``async with grower:``), the compiles pending
per slot, admission control (compiles in flight, bytes loaded) and the per-blueprint breakers,
and the one retry policy of a compile (transient failures: its workers died). A finished compile
is a :class:`Compiled` message on the queue's stream; the grower takes them at step or epoch
boundaries (:meth:`CompileQueue.ready`, :meth:`CompileQueue.receive`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any

import anyio
import structlog
import torch
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from torch import nn

from ..blueprints import Blueprint
from ..compiler import BlueprintCompiler, WorkerDiedError, WorkerStartError
from ..errors import CompileError, EsperError
from ..kernels import Kernel, load_kernel
from ..reliability import Admission, BreakerBoard, ReliabilityConfig, retry
from ..seeds import EagerSeed, SeedSlot, SeedState

__all__ = ("CompileQueue", "Compiled")

log = structlog.get_logger(__name__)

#: Finished compiles waiting for a step boundary. Small: at most a few seeds germinate at once.
_READY_BUFFER = 16


@dataclass(frozen=True)
class Compiled:
    """A compile that finished: its kernel and module, or the error it ended with."""

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


class CompileQueue:
    """Compiles in flight, their admission and their breakers.

    :param compiler: turns blueprints into kernels.
    :param reliability: breakers, limits, compile attempts and backoff.
    :param device: where finished kernels are loaded.
    :param seed: RNG seed of the kernels' initial weights.
    :param on_retry: ``on_retry(slot, blueprint, detail)`` when a compile is tried again.
    """

    def __init__(
        self,
        compiler: BlueprintCompiler,
        reliability: ReliabilityConfig,
        *,
        device: torch.device,
        seed: int,
        on_retry: Callable[[str, Blueprint, str], None],
    ) -> None:
        self.compiler = compiler
        self.reliability = reliability
        self.device = device
        self.seed = seed
        self.breakers = BreakerBoard(reliability.breaker, clock=reliability.clock)
        self.admission = Admission(reliability.limits)
        self._on_retry = on_retry
        self._pending: dict[str, Blueprint] = {}
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[Compiled] | None = None
        self._ready: MemoryObjectReceiveStream[Compiled] | None = None
        self._stack: AsyncExitStack | None = None
        self._compiling = False  # whether the compiler was opened (a grower that grows)

    @property
    def open(self) -> bool:
        """Whether the queue's task group is running (inside ``async with grower:``)."""
        return self._tg is not None

    @property
    def pending(self) -> Mapping[str, Blueprint]:
        """The blueprint compiling for each slot that has a compile in flight (read-only)."""
        return MappingProxyType(self._pending)

    async def start(self, *, compiler: bool) -> None:
        """Open the task group (and the compiler, if ``compiler``); nothing is pending."""
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if compiler:
                await stack.enter_async_context(self.compiler)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            send, ready = anyio.create_memory_object_stream[Compiled](_READY_BUFFER)
            self._send = await stack.enter_async_context(send)
            self._ready = await stack.enter_async_context(ready)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._compiling = compiler
        self._pending.clear()
        self.admission.in_flight = 0

    async def stop(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Cancel the compiles still running and close the task group."""
        stack, self._stack = self._stack, None
        self._compiling = False
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
        """Start ``fn`` in the task group (see :meth:`Grower.start_background`).

        :raises RuntimeError: the queue is not open.
        """
        if self._tg is None:
            raise RuntimeError("Grower.start_background works only inside `async with grower:`")
        await self._tg.start(fn)

    def refusal(self, blueprint: Blueprint) -> str | None:
        """Why a compile of ``blueprint`` may not start now (limits, its breaker), or ``None``
        (then one is admitted)."""
        reason = self.admission.refusal()
        if reason is not None:
            return reason
        breaker = self.breakers[blueprint.id]
        if not breaker.allow():
            return f"{blueprint.name} paused by its breaker for {breaker.retry_after():.1f} s more"
        return self.admission.try_start()

    def submit(self, slot: SeedSlot) -> None:
        """Compile ``slot``'s blueprint for its contract (admitted already).

        :raises RuntimeError: the queue is not open.
        """
        if self._tg is None or self._send is None:
            raise RuntimeError("a Grower compiles only inside `async with grower:`")
        assert slot.blueprint is not None and slot.contract is not None  # germinate() checked
        self._pending[slot.slot_name] = slot.blueprint
        self._tg.start_soon(self._compile, slot, slot.blueprint, self._send.clone())

    def resume(self, slots: dict[str, SeedSlot]) -> None:
        """Start the compile of every slot that waits for a kernel and has none in flight: a
        germinated slot, or one running its blueprint's eager module (``graft="eager"``: after a
        resume from a checkpoint or a rollback to a snapshot taken before its kernel arrived),
        unless its blueprint's breaker is open (its compiles failed again and again). Nothing
        starts in a queue opened without its compiler (a grower that does not grow)."""
        if not self._compiling:
            return
        for name, slot in slots.items():
            eager = isinstance(slot.seed, EagerSeed)
            waiting = slot.state is SeedState.GERMINATED or eager
            if eager and slot.blueprint is not None and not self.breakers.allow(slot.blueprint.id):
                continue  # its compiles keep failing: the slot keeps its eager module
            if waiting and self._pending.get(name) != slot.blueprint:
                self.admission.reserve()
                self.submit(slot)

    def ready(self) -> Iterator[Compiled]:
        """The compiles finished so far (without waiting)."""
        while self._ready is not None:
            try:
                done = self._ready.receive_nowait()
            except anyio.WouldBlock:
                return
            yield self._received(done)

    async def receive(self) -> Compiled | None:
        """Wait for the next finished compile (``None``: the queue is closed)."""
        if self._ready is None:
            return None
        return self._received(await self._ready.receive())

    def _received(self, done: Compiled) -> Compiled:
        self.admission.finished()
        if self._pending.get(done.slot) == done.blueprint:
            del self._pending[done.slot]
        return done

    async def _compile(
        self, slot: SeedSlot, blueprint: Blueprint, send: MemoryObjectSendStream[Compiled]
    ) -> None:
        contract = slot.contract
        assert contract is not None
        rel = self.reliability

        def retried(exc: BaseException, attempt: int, delay: float) -> None:
            self._on_retry(
                slot.slot_name,
                blueprint,
                f"attempt {attempt} failed ({exc}); retrying in {delay:.2f} s",
            )

        async with send:
            error: EsperError
            try:
                kernel = await retry(
                    lambda: self.compiler.compile(blueprint, contract, seed=self.seed),
                    attempts=rel.compile_attempts,
                    backoff=rel.backoff,
                    retry_on=_transient,
                    what=f"compile {blueprint.name}",
                    on_retry=retried,
                )
                module = await anyio.to_thread.run_sync(
                    lambda: load_kernel(kernel, device=self.device)
                )
            except WorkerStartError:
                raise  # no compile can run (a script without the __main__ guard): end the run
            except EsperError as exc:
                error = exc
            except Exception as exc:  # an unmapped dependency error must not end the run
                error = CompileError(
                    f"compiling {blueprint.name}: {exc!r}", blueprint=blueprint.name
                )
                error.__cause__ = exc
            else:
                await send.send(Compiled(slot.slot_name, blueprint, kernel, module, None))
                return
            log.warning(
                "compile failed", slot=slot.slot_name, blueprint=blueprint.name, error=str(error)
            )
            await send.send(Compiled(slot.slot_name, blueprint, None, None, error))
