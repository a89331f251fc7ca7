from __future__ import annotations

import os
import signal

import anyio
import faulty_families  # noqa: F401  (registers the test families in this process too)
import pytest

from esper_async import Blueprint, SlotContract, SlotKind
from esper_async.compiler import BlueprintCompiler, OptimizerOptions
from esper_async.errors import (
    BlueprintError,
    CompileError,
    CompileTimeoutError,
    KernelValidationError,
)
from esper_async.kernels import load_kernel

LINEAR = SlotContract(SlotKind.LINEAR, (8,))
CONV = SlotContract(SlotKind.CONV, (4, 6, 6))
FAST = OptimizerOptions(repeats=3, batch=8)


def compiler(**kwargs: object) -> BlueprintCompiler:
    return BlueprintCompiler(
        workers=1,
        imports=["faulty_families"],
        options=FAST,
        **kwargs,  # type: ignore[arg-type]
    )


async def assert_pool_usable(c: BlueprintCompiler) -> None:
    kernel = await c.compile(Blueprint("low_rank", {"rank": 2}), LINEAR)
    assert load_kernel(kernel)(__import__("torch").randn(2, 8)).shape == (2, 8)


@pytest.mark.asyncio
async def test_compiles_validates_and_describes_a_kernel() -> None:
    async with compiler() as c:
        kernel = await c.compile(Blueprint("residual_conv"), CONV, seed=3)
    meta = kernel.metadata
    assert meta.execution_form in meta.extra["form_timings_ms"]
    assert set(meta.extra["form_timings_ms"]) >= {"export", "channels_last"}
    report = meta.extra["validation"]
    assert report["passed"] and report["form"] == meta.execution_form
    names = {c["name"] for c in report["checks"]}
    assert {"forward[b=3]", "gradients[b=3]", "input_unchanged[b=1]", "deterministic[b=1]"} <= names
    assert meta.init_seed == 3 and meta.input_shape == CONV.shape


@pytest.mark.asyncio
async def test_contract_mismatch_fails_before_any_work() -> None:
    async with compiler() as c:
        with pytest.raises(BlueprintError, match="fits conv slots"):
            await c.compile(Blueprint("residual_conv"), LINEAR)
        await assert_pool_usable(c)


@pytest.mark.asyncio
async def test_a_blueprint_whose_module_raises_gives_a_blueprint_error() -> None:
    async with compiler() as c:
        with pytest.raises(BlueprintError, match="boom") as info:
            await c.compile(Blueprint("test_raises"), LINEAR)
        assert info.value.blueprint == "test_raises()"
        await assert_pool_usable(c)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("family", "check"),
    [
        pytest.param("test_noisy", "deterministic", id="nondeterministic"),
        pytest.param("test_reshaping", "shape", id="breaks-shape-contract"),
    ],
)
async def test_a_kernel_that_fails_validation_is_refused_with_its_report(
    family: str, check: str
) -> None:
    async with compiler() as c:
        with pytest.raises((KernelValidationError, CompileError)) as info:
            await c.compile(Blueprint(family), LINEAR)
        error = info.value
        if isinstance(error, KernelValidationError):
            failed = [x["name"] for x in error.report["checks"] if not x["passed"]]
            assert any(name.startswith(check) for name in failed), failed
        await assert_pool_usable(c)


@pytest.mark.asyncio
async def test_a_worker_that_dies_on_every_attempt_gives_a_compile_error() -> None:
    async with compiler(retries=1) as c:
        with pytest.raises(CompileError, match="worker died on all 2 attempts"):
            await c.compile(Blueprint("test_kills_worker"), LINEAR)
        await assert_pool_usable(c)


@pytest.mark.asyncio
async def test_a_worker_killed_mid_compile_is_replaced_and_the_compile_retried() -> None:
    async with compiler(retries=1) as c:
        await c.wait_ready()
        [pid] = c.executor.pids  # type: ignore[attr-defined]
        kernel = None

        async def run() -> None:
            nonlocal kernel
            kernel = await c.compile(Blueprint("test_sleeps", {"seconds": 2}), LINEAR)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
        assert kernel is not None
        assert pid not in c.executor.pids  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_a_compile_past_its_timeout_is_cancelled() -> None:
    async with compiler() as c:
        await c.wait_ready()
        with pytest.raises(CompileTimeoutError, match="longer than 1"):
            await c.compile(Blueprint("test_sleeps", {"seconds": 60}), LINEAR, timeout=1)
        assert c.executor.pids == []  # type: ignore[attr-defined]  # the stuck worker was killed
        await assert_pool_usable(c)


@pytest.mark.asyncio
async def test_cancelling_the_caller_cancels_the_compile() -> None:
    async with compiler() as c:
        await c.wait_ready()
        with anyio.move_on_after(1) as scope:
            await c.compile(Blueprint("test_sleeps", {"seconds": 60}), LINEAR)
        assert scope.cancelled_caught
        assert c.executor.pids == []  # type: ignore[attr-defined]
        await assert_pool_usable(c)


@pytest.mark.asyncio
async def test_many_compiles_in_flight() -> None:
    results: dict[int, str] = {}
    async with BlueprintCompiler(workers=2, options=FAST) as c:

        async def one(rank: int) -> None:
            kernel = await c.compile(Blueprint("low_rank", {"rank": rank}), LINEAR)
            results[rank] = kernel.kernel_id

        async with anyio.create_task_group() as tg:
            for rank in (1, 2, 3, 4):
                tg.start_soon(one, rank)
    assert len(set(results.values())) == 4


@pytest.mark.asyncio
async def test_compile_needs_an_open_compiler() -> None:
    with pytest.raises(CompileError, match="not open"):
        await compiler().compile(Blueprint("mlp"), LINEAR)
