"""``KernelOptimizer``: measure the forms a kernel can run in, and keep the fastest."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..blueprints import SlotKind
from ..kernels import Kernel, load_kernel

__all__ = ("SLOW_FORMS", "KernelOptimizer", "OptimizerOptions", "default_forms")

#: A form must beat the plain exported graph by this fraction to be kept: timing noise must not
#: flip the choice to a form that is really no faster.
_MIN_GAIN = 0.03


def default_forms(device_kind: str) -> tuple[str, ...]:
    """The forms measured by default on a device kind.

    On CPU, Inductor is left out: compiling took 12–20 s on this project's 2-core machines, far
    above the compile budget, and small blocks ran slower than the plain graph. On CUDA it is
    measured, and usually wins for larger blueprints.
    """
    if device_kind == "cuda":
        return ("export", "channels_last", "inductor")
    return ("export", "channels_last")


#: Sequence length token-slot kernels are timed at (their batch is ``OptimizerOptions.batch``).
_TIMING_TOKENS = 16

#: Forms whose preparation is itself a compile that costs far more than timing: Inductor took
#: 3–59 s per kernel on an H100/H200 (``benchmarks/results/compile_cuda*.json``), the whole of a
#: compile's p95, where the export form's timing takes milliseconds.
SLOW_FORMS = frozenset({"inductor"})


@dataclass(frozen=True)
class OptimizerOptions:
    """What the optimizer may try; part of a kernel's store key.

    :ivar forms: forms to measure (``None``: :func:`default_forms` for the device).
    :ivar allow_bf16: whether reduced precision is acceptable to the caller.
    :ivar batch: batch size the forms are timed at.
    :ivar repeats: timed forward+backward runs per form (the median is kept).
    :ivar slow_forms_min_ms: a slow form (:data:`SLOW_FORMS`: Inductor) is compiled and timed
        only when the export form's forward+backward at the timing batch takes at least this
        long: only there can its seconds of compile pay back. Below it (every library blueprint
        measured on an H200 took 0.8–2.0 ms, and Inductor beat none of them) the kernel is
        served in its export form at once. ``0``: always time them.
    """

    forms: tuple[str, ...] | None = None
    allow_bf16: bool = False
    batch: int = 32
    repeats: int = 10
    slow_forms_min_ms: float = 5.0

    def to_json(self) -> dict[str, object]:
        return {
            "forms": self.forms,
            "allow_bf16": self.allow_bf16,
            "batch": self.batch,
            "repeats": self.repeats,
            "slow_forms_min_ms": self.slow_forms_min_ms,
        }


@dataclass(frozen=True)
class OptimizerResult:
    """The chosen form and every measured median, in milliseconds per forward+backward."""

    form: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class KernelOptimizer:
    """Time each candidate form of a kernel on the target device; keep the fastest.

    The plain exported graph (``export``) is always measured first and is the baseline: another
    form is kept only if its median is at least 3 % faster. A slow form (Inductor) is measured
    only where the export form is slow enough for it to pay
    (:attr:`OptimizerOptions.slow_forms_min_ms`); a form skipped so is recorded in ``errors``
    with the reason. A form that fails to run is recorded with its error and skipped.

    :param options: what to try.
    :param device: the device to time on.
    """

    def __init__(self, options: OptimizerOptions | None = None, *, device: str = "cpu") -> None:
        self.options = options or OptimizerOptions()
        self.device = torch.device(device)

    def candidates(self, kind: SlotKind) -> Sequence[str]:
        """The forms worth measuring for a slot kind."""
        forms = list(self.options.forms or default_forms(self.device.type))
        if "export" not in forms:
            forms.insert(0, "export")
        if kind is not SlotKind.CONV and "channels_last" in forms:
            forms.remove("channels_last")
        if self.options.allow_bf16 and "bf16" not in forms:
            forms.append("bf16")
        return forms

    def _time(self, kernel: Kernel, form: str) -> float:
        module = load_kernel(kernel, device=self.device, form=form)
        contract = kernel.contract
        x = torch.randn(
            contract.batch_shape(self.options.batch, tokens=_TIMING_TOKENS),
            dtype=getattr(torch, contract.dtype),
            device=self.device,
            requires_grad=True,
        )
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def step() -> None:
            module(x).sum().backward()

        for _ in range(3):  # warm-up: first calls compile, allocate, fill caches
            step()
        sync()
        samples = []
        for _ in range(self.options.repeats):
            start = time.perf_counter()
            step()
            sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    def optimize(self, kernel: Kernel) -> OptimizerResult:
        """Measure every candidate form of ``kernel`` and return the choice with the figures."""
        timings: dict[str, float] = {}
        errors: dict[str, str] = {}
        floor = self.options.slow_forms_min_ms
        for form in self.candidates(kernel.contract.kind):  # "export" comes first
            base = timings.get("export")
            if form in SLOW_FORMS and base is not None and base < floor:
                errors[form] = (
                    f"skipped: export takes {base:.3f} ms < {floor} ms, too little to pay"
                )
                continue
            try:
                timings[form] = round(self._time(kernel, form), 4)
            except Exception as exc:  # a form that cannot run is simply not chosen
                errors[form] = f"{type(exc).__name__}: {exc}"[:500]
        if "export" not in timings:
            return OptimizerResult("export", timings, errors)
        best = min(timings, key=timings.__getitem__)
        if timings[best] > timings["export"] * (1.0 - _MIN_GAIN):
            best = "export"
        return OptimizerResult(best, timings, errors)
