"""``BlueprintCompiler``: blueprints become validated kernels in worker processes.

Resource handling: open it with ``async with`` (the trainer does this for you); it owns a
:class:`~esper_async.compiler.ProcessPool` whose workers start at the first compile (a run's
first germination), in the background of training, or as it opens with ``lazy=False``.
Leaving the block cancels compiles in flight and stops the workers.

Error handling: every failure maps to one typed error carrying the blueprint:
:class:`~esper_async.BlueprintError` (malformed, or does not fit the slot; raised before any work),
:class:`~esper_async.CompileError` (export failed, or the worker died twice),
:class:`~esper_async.CompileTimeoutError`, :class:`~esper_async.KernelValidationError` (with the
report). Nothing is persisted for a failed compile, and the pool stays usable.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
import torch
from opentelemetry.trace import INVALID_SPAN, Span

from ..blueprints import Blueprint, SlotContract
from ..errors import (
    BlueprintError,
    CompileError,
    CompileTimeoutError,
    KernelIntegrityError,
    KernelValidationError,
)
from ..kernels import Kernel, KernelMetadata
from ..telemetry import SPAN_COMPILE, SPAN_STORE_GET, Telemetry, inject_context
from ._job import CompileOutcome, CompileRequest, compile_job, warm_up_worker
from ._optimizer import OptimizerOptions
from ._pool import CompileExecutor, ProcessPool, WorkerDiedError, WorkerError

if TYPE_CHECKING:  # the store (and SQLite) load only when a store is used
    from ..store import KernelRequest, KernelStore

__all__ = ("BlueprintCompiler", "default_workers")

log = structlog.get_logger(__name__)


def default_workers() -> int:
    """One worker per two cores, at least one: training keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


class BlueprintCompiler:
    """Compile blueprints into validated kernels without blocking the event loop.

    Example::

        async with BlueprintCompiler() as compiler:
            kernel = await compiler.compile(Blueprint("mlp"), SlotContract("linear", (64,)))

    :param device: the device kernels are optimised for (``"cpu"``, ``"cuda"``).
    :param workers: size of the worker pool (default: :func:`default_workers`).
    :param threads_per_worker: torch threads in each worker.
    :param timeout: seconds one compile may take before it is cancelled.
    :param retries: fresh-worker retries after a worker dies mid-compile.
    :param options: what the kernel optimizer may try.
    :param imports: modules workers import first (where user blueprint families are registered).
    :param executor: run jobs here instead of a new process pool.
    :param store: an open :class:`~esper_async.store.KernelStore` asked first: a kernel it holds
        for the same blueprint, contract, seed, torch version, device kind and optimizer options
        is returned without compiling; a new kernel is put there once validated.
    :param telemetry: the run's telemetry: compiles and store lookups are traced, and workers
        continue the trace.
    :param lazy: start the default pool's workers at the first compile (default), not as the
        compiler opens: a run that never germinates never starts one, and none competes with
        the first steps. :meth:`wait_ready` starts them at once. Ignored with ``executor``.
    :param warm_up: each worker compiles a tiny blueprint while the pool starts, so that its
        one-time costs (torch.export's first trace; on a GPU the CUDA context) are paid in the
        background rather than by the first kernel. ``None`` (default): on for a CUDA device,
        where they made the first compile the slowest, off on CPU. Ignored with ``executor``.
    """

    def __init__(
        self,
        *,
        device: str = "cpu",
        workers: int | None = None,
        threads_per_worker: int = 1,
        timeout: float = 120.0,
        retries: int = 1,
        options: OptimizerOptions | None = None,
        imports: Sequence[str] = (),
        executor: CompileExecutor | None = None,
        store: KernelStore | None = None,
        telemetry: Telemetry | None = None,
        lazy: bool = True,
        warm_up: bool | None = None,
    ) -> None:
        self.device = device
        self.timeout = timeout
        self.retries = retries
        self.options = options or OptimizerOptions()
        if warm_up is None:
            warm_up = self.device_kind == "cuda"
        self.executor: CompileExecutor = executor or ProcessPool(
            workers or default_workers(),
            threads=threads_per_worker,
            imports=imports,
            prestart=not lazy,
            warm_up=(warm_up_worker, (device, self.options)) if warm_up else None,
        )
        self.store = store
        self.telemetry = telemetry
        self.compiles = 0
        self.compile_seconds = 0.0
        self._depth = 0

    @property
    def device_kind(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self.device.split(":")[0]

    async def __aenter__(self) -> BlueprintCompiler:
        # Re-entrant: a trainer enters the compiler it was given, and a user may hold it open
        # across several fits to keep warm workers.
        if self._depth == 0:
            await self.executor.__aenter__()
        self._depth += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            await self.executor.__aexit__(exc_type, exc, tb)

    async def wait_ready(self) -> None:
        """Start the worker processes if they are not started yet (a lazy compiler's), and wait
        until they are ready to compile."""
        wait = getattr(self.executor, "wait_ready", None)
        if wait is not None:
            await wait()

    def store_request(
        self, blueprint: Blueprint, contract: SlotContract, seed: int
    ) -> KernelRequest:
        """The kernel-store request of a compile: everything that decides the kernel's bytes —
        the blueprint, the contract, the init seed, the torch version, the device kind and the
        optimizer's options. The store checks the kernel it serves against it."""
        from ..store import KernelRequest  # not at import: the store package loads SQLite

        return KernelRequest(
            blueprint,
            contract,
            torch_version=torch.__version__,
            device_kind=self.device_kind,
            optimizer_options=self.options.to_json(),
            init_seed=seed,
        )

    def store_key(self, blueprint: Blueprint, contract: SlotContract, seed: int) -> str:
        """The kernel-store key of a compile (:meth:`store_request`'s key)."""
        return self.store_request(blueprint, contract, seed).key

    async def compile(
        self,
        blueprint: Blueprint,
        contract: SlotContract,
        *,
        seed: int = 0,
        timeout: float | None = None,
        trace_carrier: dict[str, str] | None = None,
    ) -> Kernel:
        """Compile ``blueprint`` for a slot with ``contract`` in a worker process.

        :param seed: RNG seed of the kernel's initial weights.
        :param timeout: override of the compiler's timeout for this call.
        :param trace_carrier: W3C trace context to continue inside the worker.
        :raises BlueprintError: if the blueprint does not fit the contract.
        :raises CompileError: if export fails or the worker dies on every retry.
        :raises CompileTimeoutError: if the compile runs past its timeout.
        :raises KernelValidationError: if the kernel disagrees with its eager reference.
        """
        if self._depth == 0:
            raise CompileError(
                "the compiler is not open; use `async with BlueprintCompiler() as compiler:`",
                blueprint=blueprint.name,
            )
        blueprint.check_fits(contract)
        if self.store is None:
            return await self._compile(blueprint, contract, seed, timeout, trace_carrier)
        request = self.store_request(blueprint, contract, seed)
        compiles_before = self.compiles
        with self._span(
            SPAN_STORE_GET, blueprint=blueprint.name, store_key=request.key[:16]
        ) as span:
            kernel = await self.store.get_or_compile(
                request,
                lambda: self._compile(blueprint, contract, seed, timeout, trace_carrier),
                tags=(blueprint.family,),
            )
            hit = self.compiles == compiles_before
            span.set_attribute("esper.store.hit", hit)
        if self.telemetry is not None:
            self.telemetry.metrics.store_lookup(hit=hit)
        return kernel

    def _span(self, name: str, **attrs: Any) -> AbstractContextManager[Span]:
        if self.telemetry is None:
            return nullcontext(INVALID_SPAN)
        return self.telemetry.span(name, **attrs)

    async def _compile(
        self,
        blueprint: Blueprint,
        contract: SlotContract,
        seed: int,
        timeout: float | None,
        trace_carrier: dict[str, str] | None,
    ) -> Kernel:
        self.compiles += 1  # attempted compiles; `compile_seconds` sums the successful ones
        with self._span(SPAN_COMPILE, blueprint=blueprint.name, device=self.device) as span:
            request = CompileRequest(
                blueprint_json=blueprint.to_json(),
                contract_json=contract.to_json(),
                seed=seed,
                device=self.device,
                options=self.options,
                trace_carrier=dict(trace_carrier or inject_context()),
                telemetry=None if self.telemetry is None else self.telemetry.worker_spec(),
            )
            started = time.perf_counter()
            kernel = await self._run(blueprint, request, timeout)
            span.set_attribute("esper.kernel_id", kernel.kernel_id)
            span.set_attribute("esper.compile.form", kernel.metadata.execution_form)
        elapsed = time.perf_counter() - started
        self.compile_seconds += elapsed
        if self.telemetry is not None:
            self.telemetry.metrics.compile_finished(elapsed, blueprint=blueprint.name)
        return kernel

    async def _run(
        self, blueprint: Blueprint, request: CompileRequest, timeout: float | None
    ) -> Kernel:
        limit = self.timeout if timeout is None else timeout
        for attempt in range(self.retries + 1):
            try:
                outcome = await self.executor.run(compile_job, request, timeout=limit)
                break
            except TimeoutError as exc:
                raise CompileTimeoutError(
                    f"compiling {blueprint.name} took longer than {limit} s; it was cancelled",
                    blueprint=blueprint.name,
                ) from exc
            except WorkerDiedError as exc:
                log.warning(
                    "compile worker died",
                    blueprint=blueprint.name,
                    attempt=attempt + 1,
                    error=str(exc),
                )
                if attempt == self.retries:
                    raise CompileError(
                        f"compiling {blueprint.name}: the worker died on all {attempt + 1} "
                        f"attempts ({exc})",
                        blueprint=blueprint.name,
                    ) from exc
            except WorkerError as exc:
                raise CompileError(
                    f"compiling {blueprint.name} failed in the worker: {exc}",
                    blueprint=blueprint.name,
                ) from exc
        return self._to_kernel(blueprint, outcome)

    @staticmethod
    def _to_kernel(blueprint: Blueprint, outcome: CompileOutcome) -> Kernel:
        name = blueprint.name
        if outcome.error_kind == "blueprint":
            raise BlueprintError(outcome.message, blueprint=name)
        if outcome.error_kind == "validation":
            raise KernelValidationError(
                outcome.message,
                blueprint=name,
                kernel_id=outcome.metadata_json.get("sha256"),
                report=outcome.report_json,
            )
        if outcome.error_kind:
            raise CompileError(outcome.message, blueprint=name)
        metadata = KernelMetadata.from_json(outcome.metadata_json)
        if hashlib.sha256(outcome.artifact).hexdigest() != metadata.sha256:
            raise KernelIntegrityError(
                f"kernel for {name} arrived with bytes that do not match its id",
                blueprint=name,
                kernel_id=metadata.sha256,
            )
        log.info(
            "kernel compiled",
            blueprint=name,
            kernel_id=metadata.sha256[:12],
            form=metadata.execution_form,
            compile_s=metadata.compile_s,
        )
        return Kernel(artifact=outcome.artifact, metadata=metadata)
