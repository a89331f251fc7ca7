"""``RankCompiler``: kernels are compiled once, on rank 0, and reach every rank as the same bytes.

Rank 0 compiles through the real :class:`~esper_async.compiler.BlueprintCompiler` (its worker
pool, and its kernel store if one is given: a kernel compiled before, by this job or another, is
not compiled again). It then publishes the validated artifact and its metadata (or the failure)
in the job's key-value store under the kernel's store key. The other ranks start no compile
workers: they wait for that entry, check that the bytes hash to the kernel id, and return the
same :class:`~esper_async.kernels.Kernel`. The trainer then loads and grafts it as usual, on every
rank at the same epoch boundary (``graft="epoch"``).

A failure on rank 0 is published too, and raised on every rank as a
:class:`~esper_async.CompileError`, so every rank culls the seed the same way.

The key-value store carries the bytes, not a shared file system: it works across hosts. Each
entry stays in the store (held by the launcher's ``TCPStore``) until the job ends; kernels are
small (tens of kilobytes for the standard library).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections import Counter
from typing import Any

import anyio
import structlog
import torch.distributed as dist

from ..blueprints import Blueprint, SlotContract
from ..compiler import BlueprintCompiler
from ..errors import (
    CompileError,
    CompileTimeoutError,
    EsperError,
    KernelIntegrityError,
)
from ..kernels import Kernel, KernelMetadata
from ._context import RankContext

__all__ = ("RankCompiler",)

log = structlog.get_logger(__name__)

#: First and last pause between looks for rank 0's kernel: short at first (a store hit on rank 0
#: publishes within milliseconds), then backing off so a long compile costs few round trips.
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.25
#: Slack on top of rank 0's own compile deadline before a waiting rank gives up.
WAIT_SLACK_S = 60.0
_HEADER = struct.Struct("!Q")


def _encode(header: dict[str, Any], artifact: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    return _HEADER.pack(len(head)) + head + artifact


def _decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = _HEADER.unpack_from(data)
    start = _HEADER.size
    return json.loads(data[start : start + size]), data[start + size :]


def _publish(store: dist.Store, key: str, data: bytes) -> None:
    store.set(key, data)  # type: ignore[arg-type]  # the stub says str; bytes are kept as is


class RankCompiler(BlueprintCompiler):
    """A :class:`~esper_async.compiler.BlueprintCompiler` for one rank of a job.

    Give every rank's trainer one (``Trainer(compiler=RankCompiler(ctx, ...))``); only rank 0's
    starts compile workers or opens ``store``.

    :param ctx: this rank's context.
    :param wait_timeout: seconds a rank other than 0 waits for a kernel (default: the compile
        timeout times the attempts, plus a minute).
    :param compiler_options: the :class:`~esper_async.compiler.BlueprintCompiler` keyword
        arguments (``device``, ``workers``, ``store``, ``timeout``, ``telemetry`` ...); used on
        rank 0. Every rank must pass the same ``device`` kind and optimizer options.
    :ivar kernels: every kernel this rank has handed out, by id (checkpoints need the bytes).
    :ivar received: kernels this rank received from rank 0.
    :ivar wait_seconds: seconds this rank spent waiting for rank 0's kernels.
    :ivar arrivals: ``(time.time(), blueprint name, kernel id)`` when each kernel was ready on
        this rank (compiled or found on rank 0, received on the others).
    """

    def __init__(
        self, ctx: RankContext, *, wait_timeout: float | None = None, **compiler_options: Any
    ) -> None:
        super().__init__(**compiler_options)
        self.ctx = ctx
        self.wait_timeout = (
            wait_timeout
            if wait_timeout is not None
            else self.timeout * (self.retries + 1) + WAIT_SLACK_S
        )
        self.kernels: dict[str, Kernel] = {}
        self.received = 0
        self.wait_seconds = 0.0
        self.arrivals: list[tuple[float, str, str]] = []
        self._requests: Counter[str] = Counter()

    async def __aenter__(self) -> RankCompiler:
        if self.ctx.is_leader:
            await super().__aenter__()
        else:
            self._depth += 1  # no workers on the other ranks
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self.ctx.is_leader:
            await super().__aexit__(*exc_info)
        else:
            self._depth -= 1

    async def wait_ready(self) -> None:
        """Wait for rank 0's compile workers (other ranks have none)."""
        if self.ctx.is_leader:
            await super().wait_ready()

    def channel_key(self, blueprint: Blueprint, contract: SlotContract, seed: int) -> str:
        """The store key of this request: what every rank asks for, computed the same way."""
        return self.store_key(blueprint, contract, seed)

    async def compile(
        self,
        blueprint: Blueprint,
        contract: SlotContract,
        *,
        seed: int = 0,
        timeout: float | None = None,
        trace_carrier: dict[str, str] | None = None,
    ) -> Kernel:
        """Rank 0: compile (or find in the store) and publish. Other ranks: wait for rank 0's.

        :raises BlueprintError: if the blueprint does not fit the contract (on every rank).
        :raises CompileError: on every rank, if rank 0's compile failed.
        :raises CompileTimeoutError: if rank 0's kernel did not arrive within ``wait_timeout``.
        :raises KernelIntegrityError: if the bytes received do not hash to their kernel id.
        """
        if self._depth == 0:
            raise CompileError(
                "the compiler is not open; use `async with RankCompiler(ctx) as compiler:`",
                blueprint=blueprint.name,
            )
        blueprint.check_fits(contract)
        key = self.channel_key(blueprint, contract, seed)
        # The n-th request for a key on one rank matches the n-th on every other: ranks make the
        # same requests, since they apply the same decisions.
        entry = f"kernel/{key}/{self._requests[key]}"
        self._requests[key] += 1
        if self.ctx.is_leader:
            kernel = await self._lead(blueprint, contract, seed, timeout, trace_carrier, entry)
        else:
            kernel = await self._follow(blueprint, entry)
        self.kernels[kernel.kernel_id] = kernel
        self.arrivals.append((time.time(), blueprint.name, kernel.kernel_id))
        return kernel

    async def _lead(
        self,
        blueprint: Blueprint,
        contract: SlotContract,
        seed: int,
        timeout: float | None,
        trace_carrier: dict[str, str] | None,
        entry: str,
    ) -> Kernel:
        try:
            kernel = await super().compile(
                blueprint, contract, seed=seed, timeout=timeout, trace_carrier=trace_carrier
            )
        except EsperError as exc:
            message = _encode({"ok": False, "error": type(exc).__name__, "message": str(exc)})
            await anyio.to_thread.run_sync(_publish, self.ctx.store, entry, message)
            raise
        message = _encode({"ok": True, "metadata": kernel.metadata.to_json()}, kernel.artifact)
        await anyio.to_thread.run_sync(_publish, self.ctx.store, entry, message)
        log.info(
            "distributed.kernel_published",
            blueprint=blueprint.name,
            kernel_id=kernel.kernel_id[:12],
            bytes=len(message),
        )
        return kernel

    async def _follow(self, blueprint: Blueprint, entry: str) -> Kernel:
        started = time.perf_counter()
        pause = POLL_FIRST_S
        try:
            with anyio.fail_after(self.wait_timeout):
                while not await anyio.to_thread.run_sync(self.ctx.store.check, [entry]):
                    await anyio.sleep(pause)
                    pause = min(POLL_MAX_S, pause * 2)
        except TimeoutError as exc:
            raise CompileTimeoutError(
                f"rank {self.ctx.rank}: rank 0's kernel for {blueprint.name} did not arrive "
                f"within {self.wait_timeout:.0f} s; is rank 0 alive?",
                blueprint=blueprint.name,
            ) from exc
        data = await anyio.to_thread.run_sync(self.ctx.store.get, entry)
        self.wait_seconds += time.perf_counter() - started
        header, artifact = _decode(bytes(data))
        if not header["ok"]:
            raise CompileError(
                f"rank 0 could not compile {blueprint.name} ({header['error']}): "
                f"{header['message']}",
                blueprint=blueprint.name,
            )
        metadata = KernelMetadata.from_json(header["metadata"])
        digest = hashlib.sha256(artifact).hexdigest()
        if digest != metadata.sha256:
            raise KernelIntegrityError(
                f"rank {self.ctx.rank}: the kernel for {blueprint.name} arrived with bytes that "
                f"hash to {digest[:12]}, not {metadata.sha256[:12]}; it was not loaded",
                blueprint=blueprint.name,
                kernel_id=metadata.sha256,
            )
        self.received += 1
        log.info(
            "distributed.kernel_received",
            rank=self.ctx.rank,
            blueprint=blueprint.name,
            kernel_id=digest[:12],
        )
        return Kernel(artifact=artifact, metadata=metadata)
