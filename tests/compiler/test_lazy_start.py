"""The compile pool starts at the first compile, and slow forms are timed only where they pay."""

from __future__ import annotations

import anyio
import pytest
import torch

from esper_async import Blueprint, SlotContract, SlotKind
from esper_async.compiler import BlueprintCompiler, KernelOptimizer, OptimizerOptions, ProcessPool
from esper_async.kernels import export_kernel, load_kernel

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


def _mark(path: str) -> None:
    """A warm-up job: leave a file named for the worker's pid."""
    import os
    from pathlib import Path

    Path(path, str(os.getpid())).touch()


def _fail(path: str) -> None:
    """A warm-up that runs (it leaves its file) and then fails."""
    _mark(path)
    raise RuntimeError("a warm-up that fails")


@pytest.mark.asyncio
async def test_each_worker_runs_the_warm_up_once_before_it_is_ready(tmp_path) -> None:
    async with ProcessPool(2, warm_up=(_mark, (str(tmp_path),))) as pool:
        await pool.wait_ready()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(map(str, pool.pids))


@pytest.mark.asyncio
async def test_a_failing_warm_up_leaves_the_worker_ready_to_work(tmp_path) -> None:
    async with ProcessPool(1, warm_up=(_fail, (str(tmp_path),))) as pool:
        assert await pool.run(abs, -3) == 3
        assert [p.name for p in tmp_path.iterdir()] == [str(pool.pids[0])]  # it did run


@pytest.mark.asyncio
async def test_a_warmed_compiler_compiles_as_a_cold_one_does() -> None:
    bp = Blueprint("low_rank", {"rank": 2})
    async with BlueprintCompiler(workers=1, options=FAST, warm_up=True) as warm:
        warmed = await warm.compile(bp, LINEAR, seed=3)
    async with BlueprintCompiler(workers=1, options=FAST) as cold:
        plain = await cold.compile(bp, LINEAR, seed=3)
    # Artifacts differ byte for byte (torch.export writes a serialization id); the kernels do not.
    a, b = load_kernel(warmed), load_kernel(plain)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    x = torch.randn(4, 8)
    assert torch.equal(a(x), b(x))
    assert (
        warmed.metadata.extra["validation"]["checks"]
        == plain.metadata.extra["validation"]["checks"]
    )
