"""The compile pool starts at the first compile, and slow forms are timed only where they pay."""

from __future__ import annotations

import anyio
import pytest

from esper_async import Blueprint, SlotContract, SlotKind
from esper_async.compiler import BlueprintCompiler, KernelOptimizer, OptimizerOptions
from esper_async.kernels import export_kernel

LINEAR = SlotContract(SlotKind.LINEAR, (8,))
FAST = OptimizerOptions(repeats=3, batch=8)


@pytest.mark.asyncio
async def test_a_lazy_compiler_starts_its_workers_at_the_first_compile() -> None:
    async with BlueprintCompiler(workers=1, options=FAST) as c:
        await anyio.sleep(0.5)  # an eager pool would be spawning its worker by now
        assert c.executor.pids == []  # type: ignore[attr-defined]
        kernel = await c.compile(Blueprint("low_rank", {"rank": 2}), LINEAR)
        assert kernel.metadata.execution_form == "export"
        assert len(c.executor.pids) == 1  # type: ignore[attr-defined]
        [start] = c.executor.start_seconds  # type: ignore[attr-defined]
        assert start > 0


@pytest.mark.asyncio
async def test_a_compiler_opened_eagerly_starts_its_workers_at_once() -> None:
    async with BlueprintCompiler(workers=1, options=FAST, lazy=False) as c:
        await c.wait_ready()
        assert len(c.executor.pids) == 1  # type: ignore[attr-defined]


def test_inductor_is_not_compiled_where_it_cannot_pay() -> None:
    # A rank-2 adapter on 8 features takes well under the default 5 ms floor to run.
    kernel = export_kernel(Blueprint("low_rank", {"rank": 2}), LINEAR, seed=0)
    options = OptimizerOptions(forms=("export", "inductor"), repeats=3, batch=8)
    result = KernelOptimizer(options).optimize(kernel)
    assert result.form == "export"
    assert "inductor" not in result.timings_ms
    assert result.errors["inductor"].startswith("skipped: export takes")
