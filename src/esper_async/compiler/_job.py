"""The compile job: what a worker process runs for one blueprint.

Requests and outcomes are plain data (strings, bytes, dicts) so they cross the process boundary
without pickling project classes; the parent maps an outcome to a kernel or to a typed error.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..blueprints import Blueprint, SlotContract, SlotKind
from ..errors import BlueprintError, CompileError
from ..kernels import export_kernel
from ..telemetry import SPAN_COMPILE_WORKER, Telemetry, WorkerTelemetrySpec
from ._optimizer import KernelOptimizer, OptimizerOptions
from ._validator import KernelValidator

__all__ = ("CompileOutcome", "CompileRequest", "compile_job", "warm_up_worker")


@dataclass(frozen=True)
class CompileRequest:
    """One compile: a blueprint for a contract, with the options that shape the result."""

    blueprint_json: str
    contract_json: dict[str, Any]
    seed: int
    device: str
    options: OptimizerOptions
    validate: bool = True
    trace_carrier: dict[str, str] = field(default_factory=dict)
    telemetry: WorkerTelemetrySpec | None = None


@dataclass(frozen=True)
class CompileOutcome:
    """What came back: an artifact and its metadata, or the kind of failure and its reason.

    :ivar error_kind: ``""`` on success, else ``"blueprint"``, ``"compile"`` or ``"validation"``.
    """

    artifact: bytes = b""
    metadata_json: dict[str, Any] = field(default_factory=dict)
    error_kind: str = ""
    message: str = ""
    report_json: dict[str, Any] | None = None


def compile_job(request: CompileRequest) -> CompileOutcome:
    """Build, export, optimise and validate one blueprint. Runs in a worker process.

    With a telemetry spec, the work is traced as a child of the caller's compile span (from
    ``trace_carrier``), so one trace spans both processes.
    """
    if request.telemetry is None:
        return _compile(request)
    with Telemetry.for_worker(request.telemetry) as telemetry:
        with telemetry.span(
            SPAN_COMPILE_WORKER,
            parent=request.trace_carrier,
            pid=os.getpid(),
        ) as span:
            outcome = _compile(request)
            span.set_attribute("esper.compile.outcome", outcome.error_kind or "ok")
            return outcome


def _compile(request: CompileRequest) -> CompileOutcome:
    started = time.perf_counter()
    try:
        blueprint = Blueprint.from_json(request.blueprint_json)
        contract = SlotContract.from_json(request.contract_json)
        kernel = export_kernel(
            blueprint, contract, seed=request.seed, device_kind=request.device.split(":")[0]
        )
    except BlueprintError as exc:
        return CompileOutcome(error_kind="blueprint", message=str(exc))
    except CompileError as exc:
        return CompileOutcome(error_kind="compile", message=str(exc))
    except Exception as exc:
        return CompileOutcome(
            error_kind="compile", message=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        )
    export_s = time.perf_counter() - started

    choice = KernelOptimizer(request.options, device=request.device).optimize(kernel)
    validator = KernelValidator(seed=request.seed)
    form = choice.form
    report = validator.validate(kernel, form=form) if request.validate else None
    if report is not None and not report.passed and form != "export":
        # The fastest form disagrees with the reference; the plain graph may still be right.
        form = "export"
        report = validator.validate(kernel, form=form)
    extra = {
        "export_s": round(export_s, 4),
        "form_timings_ms": choice.timings_ms,
        "form_errors": choice.errors,
        "optimizer": request.options.to_json(),
        "validation": None if report is None else report.to_json(),
    }
    metadata = dataclasses.replace(
        kernel.metadata,
        execution_form=form,
        compile_s=round(time.perf_counter() - started, 4),
        extra=extra,
    )
    if report is not None and not report.passed:
        failed = ", ".join(f"{c.name} ({c.detail})" for c in report.failures)
        return CompileOutcome(
            metadata_json=metadata.to_json(),
            error_kind="validation",
            message=f"{blueprint.name} failed validation: {failed}",
            report_json=report.to_json(),
        )
    return CompileOutcome(artifact=kernel.artifact, metadata_json=metadata.to_json())


def warm_up_worker(device: str, options: OptimizerOptions) -> None:
    """Compile a tiny blueprint once, in a worker before its first job (the pool's warm-up).

    A worker's first compile pays one-time costs: torch.export's lazy imports and first-trace
    caches, and on a GPU the CUDA context and the first kernels' loading. Measured on an H100,
    they made a worker's first compile the slowest. Paying them while the pool starts (in the
    background, beside training) keeps them out of every later kernel's latency (with a lazy
    pool, the first compile waits for the worker's start, warm-up included). Nothing is kept:
    the kernel is thrown away.

    :param device: the device kernels are compiled for (``"cuda"``, ``"cpu"``).
    :param options: the compiler's optimizer options (the forms it will time).
    """
    request = CompileRequest(
        blueprint_json=Blueprint("mlp", {"hidden_mult": 2}).to_json(),
        contract_json=SlotContract(SlotKind.LINEAR, (8,)).to_json(),
        seed=0,
        device=device,
        options=options,
    )
    _compile(request)
