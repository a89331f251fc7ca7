from __future__ import annotations

import itertools
import math
import threading
import time

import anyio
import anyio.lowlevel
import pytest
import torch
from torch import nn

from esper_async.errors import StreamError
from esper_async.runtime import BridgeKind
from esper_async.runtime._execution import (
    CudaStepRunner,
    LagStats,
    LoopLagMonitor,
    StepRunner,
    ThreadStepRunner,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class StepFailed(Exception):
    pass


def make_step(device: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen).to(device),
                torch.randint(0, 10, (16,), generator=gen).to(device)) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return model, step


# --- StepRunner on a CPU ---


def test_for_device_cpu_gives_a_thread_runner() -> None:
    runner = StepRunner.for_device("cpu")
    assert isinstance(runner, ThreadStepRunner)
    assert runner.device == torch.device("cpu")


@pytest.mark.parametrize(
    "device",
    [pytest.param("meta", id="meta"), pytest.param("cpu", id="cuda-runner-on-cpu")],
)
def test_unsupported_devices_are_rejected(device: str) -> None:
    with pytest.raises(ValueError):
        if device == "cpu":
            CudaStepRunner(device)
        else:
            StepRunner.for_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_runner_without_cuda_raises() -> None:
    with pytest.raises(StreamError, match="CUDA is not available"):
        StepRunner.for_device("cuda")


@pytest.mark.asyncio
async def test_cpu_step_runs_in_a_worker_thread_and_returns_its_result() -> None:
    runner = StepRunner.for_device("cpu")
    loop_thread = threading.get_ident()
    result = await runner.run(lambda a, b: (threading.get_ident(), a + b), 2, 3)
    assert result[0] != loop_thread
    assert result[1] == 5


@pytest.mark.asyncio
async def test_cpu_step_errors_propagate() -> None:
    def failing() -> None:
        raise StepFailed("boom")

    with pytest.raises(StepFailed, match="boom"):
        await StepRunner.for_device("cpu").run(failing)


@pytest.mark.asyncio
async def test_loop_stays_free_while_a_cpu_step_blocks() -> None:
    # The step can only finish if a task on the loop runs while the step is blocked.
    release = threading.Event()

    async def releaser() -> None:
        await anyio.lowlevel.checkpoint()
        release.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(releaser)
            assert await StepRunner.for_device("cpu").run(release.wait, 10) is True


@pytest.mark.asyncio
async def test_steps_of_one_runner_run_one_at_a_time() -> None:
    runner = StepRunner.for_device("cpu")
    lock = threading.Lock()
    active, most = 0, 0

    def step() -> None:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.01)
        with lock:
            active -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(runner.run, step)
    assert most == 1


@pytest.mark.asyncio
async def test_cpu_runner_trains_exactly_like_a_plain_loop() -> None:
    model_a, step_a = make_step("cpu")
    model_b, step_b = make_step("cpu")
    runner = StepRunner.for_device("cpu")
    plain = [float(step_a(i)) for i in range(6)]
    awaited = [float(await runner.run(step_b, i)) for i in range(6)]
    assert plain == awaited
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# --- loop lag ---


@pytest.mark.parametrize(
    ("samples", "p50", "p99", "most"),
    [
        pytest.param([0.001] * 10, 1.0, 1.0, 1.0, id="constant"),
        pytest.param([i / 1000 for i in range(1, 101)], 50.0, 99.0, 100.0, id="ramp-1-to-100ms"),
        pytest.param([0.0] * 99 + [0.5], 0.0, 0.0, 500.0, id="one-stall-in-100"),
        pytest.param([0.0] * 98 + [0.5, 0.5], 0.0, 500.0, 500.0, id="two-stalls-in-100"),
    ],
)
def test_lag_stats(samples: list[float], p50: float, p99: float, most: float) -> None:
    stats = LagStats.from_seconds(samples)
    assert stats.samples == len(samples)
    assert stats.p50_ms == pytest.approx(p50)
    assert stats.p99_ms == pytest.approx(p99)
    assert stats.max_ms == pytest.approx(most)


def test_lag_stats_of_nothing_are_nan() -> None:
    stats = LagStats.from_seconds([])
    assert stats.samples == 0
    assert math.isnan(stats.p99_ms)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"interval": 0}, id="zero-interval"),
        pytest.param({"interval": math.inf}, id="infinite-interval"),
        pytest.param({"max_samples": 0}, id="no-samples"),
    ],
)
def test_monitor_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LoopLagMonitor(**kwargs)  # type: ignore[arg-type]


def test_monitor_keeps_the_latest_samples() -> None:
    monitor = LoopLagMonitor(max_samples=3)
    for lateness in (1.0, 2.0, 3.0, 4.0, 5.0):
        monitor.record(lateness)
    assert monitor.stats().samples == 3
    assert monitor.stats().max_ms == pytest.approx(5000.0)
    assert monitor.stats().p50_ms == pytest.approx(4000.0)
    monitor.reset()
    assert monitor.stats().samples == 0


@pytest.mark.asyncio
async def test_monitor_measures_lateness_with_the_injected_clock() -> None:
    interval = 0.001
    ticks = itertools.count()
    # Every reading advances the clock by interval + 2 ms: each heartbeat is 2 ms late.
    monitor = LoopLagMonitor(interval=interval, clock=lambda: next(ticks) * (interval + 0.002))
    async with monitor:
        while monitor.stats().samples < 5:  # noqa: ASYNC110
            await anyio.sleep(interval)
    stats = monitor.stats()
    assert stats.p50_ms == pytest.approx(2.0)
    assert stats.max_ms == pytest.approx(2.0)


@pytest.mark.asyncio
async def test_monitor_sees_a_blocked_loop() -> None:
    async with LoopLagMonitor(interval=0.001) as monitor:
        await anyio.sleep(0.01)
        time.sleep(0.05)  # noqa: ASYNC251 -- blocking the loop on purpose
        await anyio.sleep(0.01)
    assert monitor.stats().max_ms >= 40.0


@pytest.mark.asyncio
async def test_monitor_cannot_be_entered_twice() -> None:
    monitor = LoopLagMonitor()
    async with monitor:
        with pytest.raises(RuntimeError, match="already running"):
            await monitor.__aenter__()


# --- StepRunner on a GPU ---


@CUDA
@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bridge", [pytest.param(k, id=k.value) for k in BridgeKind],
)
@pytest.mark.usefixtures("deterministic_cudnn")
async def test_cuda_runner_trains_like_a_plain_loop(bridge: BridgeKind) -> None:
    model_a, step_a = make_step("cuda")
    model_b, step_b = make_step("cuda")
    runner = StepRunner.for_device("cuda", bridge=bridge)
    assert isinstance(runner, CudaStepRunner)
    plain = [float(step_a(i)) for i in range(6)]
    awaited = []
    for i in range(6):
        loss = await runner.run(step_b, i)
        awaited.append(float(loss))
    assert plain == awaited
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@CUDA
@pytest.mark.asyncio
async def test_cuda_runner_returns_after_the_gpu_finished_and_the_loop_stays_free() -> None:
    runner = StepRunner.for_device("cuda")
    done = torch.cuda.Event()

    def long_step() -> torch.cuda.Event:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, launched in microseconds
        done.record()
        return done

    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        event = await runner.run(long_step)
        tg.cancel_scope.cancel()
    assert event.query(), "run() returned before the step's GPU work had finished"
    assert ticks >= 5, "the loop was blocked while the GPU step ran"


def test_monitor_samples_are_oldest_first_after_wrapping() -> None:
    monitor = LoopLagMonitor(max_samples=3)
    for lateness in (1.0, 2.0, 3.0, 4.0, 5.0):
        monitor.record(lateness)
    assert monitor.samples == (3.0, 4.0, 5.0)
