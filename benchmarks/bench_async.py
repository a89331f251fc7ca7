"""Cost of the async step loop, loop lag, CUDA completion bridges, and seeds on side streams.

    python benchmarks/bench_async.py [--quick] [--out DIR]
        → benchmarks/results/async.json (CPU) or async_cuda.json (GPU)

* ``async_overhead_ratio``: median step time of the async loop (``await runner.run(step)`` with
  :class:`StepRunner`, a :class:`LoopLagMonitor` heartbeat running) over that of a plain
  synchronous loop (``step()``), same model, data and process, in alternating blocks. Both loops
  read the loss every step (``float(loss)``). Goal: under 1.02.
  ``extra_us_per_step`` is the difference of the medians. ``async_overhead_ratio_gpu_bound``: the
  same on a step the GPU dominates (width-128 host, batch 256), where that fixed cost is a smaller
  share. ``trainer``: the whole ``Trainer.fit`` (guarded steps, telemetry, epoch boundaries)
  against a plain loop doing the same work, alternating epoch by epoch.
* ``loop_lag_p99_ms``: the heartbeat's p99 lateness during the async blocks (goal: under 5 ms on a
  GPU, 20 ms on a CPU).
* ``bridge_latency_us`` (GPU): time from launching a tiny kernel to resuming after awaiting its
  completion, per bridge kind, beside ``stream.synchronize()`` (the floor); and the process CPU
  time spent per wait on a 2 ms kernel (a spinning poll costs a core).
* ``side_streams`` (GPU): step time with every conv slot's seed in TRAINING, inline vs on side
  streams, at batch 32 and 256; ``speedup`` = inline / side streams.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, interleaved_medians, machine

from esper_async.blueprints import build, library
from esper_async.runtime import BridgeKind, CompletionBridge
from esper_async.runtime._execution import LagStats, LoopLagMonitor, StepRunner
from esper_async.seeds import enable_side_streams, find_slots, wrap

#: GPU cycles of the kernel each CPU-cost wait waits for (~2 ms on an H100 at ~1.8 GHz).
CPU_COST_CYCLES = 3_500_000


def conv_host(width: int = 32) -> nn.Module:
    """The CIFAR-sized conv host of ``bench_dormant``: six Conv2d, two Linear (``width`` channels
    in the first block, doubling per block; 32 is ``bench_dormant``'s, 128 makes a GPU-bound step
    at batch 256)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width), nn.Flatten(),
        nn.Linear(4 * width * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def make_step(model: nn.Module, batch: int, device: torch.device) -> Callable[[], torch.Tensor]:
    """One training step (zero_grad, forward, backward, SGD step) on a fixed batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def seeded_host(device: torch.device) -> nn.Module:
    """The conv host wrapped at every Conv2d, each slot with a seed in TRAINING."""
    torch.manual_seed(0)
    model = conv_host()
    wrap(model, [nn.Conv2d], example_input=torch.randn(2, 3, 32, 32))
    for slot in find_slots(model).values():
        assert slot.contract is not None
        blueprint = library(slot.contract.kind)[0]
        slot.germinate(blueprint)
        seed = build(blueprint, slot.contract, seed=0)
        with torch.no_grad():
            for p in seed.parameters():
                p.normal_(0, 0.05)
        slot.graft(seed, "bench")
    return model.to(device)


# --- async loop vs plain loop ---


async def overhead(
    device: torch.device, batch: int, rounds: int, steps: int, bridge: BridgeKind | None,
    *, heartbeat: bool = True, width: int = 32,
) -> dict[str, Any]:
    """Alternating blocks of plain and awaited steps; per-step medians, their ratio and
    difference, loop lag (``heartbeat=False``: no monitor runs, to show what the heartbeat itself
    costs; ``width``: see :func:`conv_host`)."""
    torch.manual_seed(0)
    step = make_step(conv_host(width).to(device), batch, device)
    runner = StepRunner.for_device(device, **({"bridge": bridge} if bridge else {}))
    plain: list[float] = []
    awaited: list[float] = []
    lag: list[float] = []
    for _ in range(3):  # warm-up: allocator, cuDNN heuristics, thread pool
        float(step())
        float(await runner.run(step))
    for r in range(rounds):
        order = ("plain", "async") if r % 2 == 0 else ("async", "plain")
        for mode in order:
            if mode == "plain":
                start = time.perf_counter()
                for _ in range(steps):
                    float(step())
                plain.append((time.perf_counter() - start) / steps)
            else:
                async with AsyncExitStack() as stack:
                    if heartbeat:
                        monitor = await stack.enter_async_context(LoopLagMonitor())
                    start = time.perf_counter()
                    for _ in range(steps):
                        float(await runner.run(step))
                    awaited.append((time.perf_counter() - start) / steps)
                if heartbeat:
                    lag.extend(monitor.samples)
    stats = LagStats.from_seconds(lag)
    p_med, a_med = statistics.median(plain), statistics.median(awaited)
    return {
        "batch": batch,
        "width": width,
        "bridge": None if bridge is None else bridge.value,
        "heartbeat": heartbeat,
        "median_step_ms": {"plain": round(p_med * 1e3, 4), "async": round(a_med * 1e3, 4)},
        "ratio": round(a_med / p_med, 4),
        "extra_us_per_step": round((a_med - p_med) * 1e6, 1),
        "loop_lag_ms": {"p50": round(stats.p50_ms, 4), "p99": round(stats.p99_ms, 4),
                        "max": round(stats.max_ms, 4), "samples": stats.samples},
        "rounds": rounds, "steps_per_block": steps,
    }


async def trainer_overhead(
    device: torch.device, batch: int, epochs: int, steps: int, *, width: int = 32,
) -> dict[str, Any]:
    """The whole :class:`~esper_async.Trainer` (guarded steps, telemetry, epoch boundaries) vs a
    plain loop doing the same work. Each epoch is ``steps`` training batches and one validation
    batch; after every trainer epoch (``on_epoch``) the plain loop runs one block of the same
    size on its own copy of the model, so the two alternate. The plain step reads the loss
    before ``backward()`` as the trainer's guard does."""
    from esper_async import Trainer

    gen = torch.Generator().manual_seed(0)
    train = [(torch.randn(batch, 3, 32, 32, generator=gen),
              torch.randint(0, 10, (batch,), generator=gen)) for _ in range(steps)]
    val = [train[0]]
    torch.manual_seed(0)
    model = conv_host(width)
    plain_model = copy.deepcopy(model).to(device)
    trainer = Trainer(model, grow=False, device=device, seed=0)
    opt = type(trainer.optimizer)(plain_model.parameters(), **trainer.optimizer.defaults)
    loss_fn = trainer.loss_fn

    def plain_block() -> None:
        plain_model.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(plain_model(x), y)
            float(loss.detach())
            loss.backward()
            opt.step()
        plain_model.eval()
        with torch.no_grad():
            for x, y in val:
                float(loss_fn(plain_model(x.to(device)), y.to(device)))

    fitted: list[float] = []
    plain: list[float] = []
    last = time.perf_counter()

    def on_epoch(report: Any, result: Any) -> None:
        nonlocal last
        fitted.append((time.perf_counter() - last) / steps)
        start = time.perf_counter()
        plain_block()
        plain.append((time.perf_counter() - start) / steps)
        last = time.perf_counter()

    await trainer.fit(train, val, epochs=epochs, on_epoch=on_epoch)
    warm = 2  # the first epochs warm the allocator, cuDNN and the worker thread
    p_med, t_med = statistics.median(plain[warm:]), statistics.median(fitted[warm:])
    return {
        "batch": batch, "width": width, "epochs_measured": epochs - warm, "steps_per_epoch": steps,
        "median_step_ms": {"plain": round(p_med * 1e3, 4), "trainer": round(t_med * 1e3, 4)},
        "ratio": round(t_med / p_med, 4),
        "extra_us_per_step": round((t_med - p_med) * 1e6, 1),
    }


# --- bridges ---


async def bridge_latency(repeats: int) -> dict[str, Any]:
    """Launch-to-resume time of each bridge after a tiny kernel, and CPU cost per long wait."""
    stream = torch.cuda.Stream()
    tiny = torch.zeros(1, device="cuda")
    kinds: dict[str, CompletionBridge] = {
        "host_func": CompletionBridge(BridgeKind.HOST_FUNC),
        "event_thread": CompletionBridge(BridgeKind.EVENT_THREAD),
        "query_poll": CompletionBridge(BridgeKind.QUERY_POLL),
        "query_poll_spin": CompletionBridge(BridgeKind.QUERY_POLL, poll_interval=0.0),
    }
    latency: dict[str, list[float]] = {name: [] for name in [*kinds, "synchronize"]}
    cpu: dict[str, list[float]] = {name: [] for name in [*kinds, "synchronize"]}
    for _ in range(20):  # warm-up
        for bridge in kinds.values():
            with torch.cuda.stream(stream):
                tiny.add_(1)
            await bridge.wait(stream)
    for _ in range(repeats):
        for name in latency:
            bridge = kinds.get(name)
            start = time.perf_counter()
            with torch.cuda.stream(stream):
                tiny.add_(1)
            if bridge is None:
                stream.synchronize()
            else:
                await bridge.wait(stream)
            latency[name].append(time.perf_counter() - start)
    for _ in range(max(5, repeats // 10)):
        for name in cpu:
            bridge = kinds.get(name)
            with torch.cuda.stream(stream):
                torch.cuda._sleep(CPU_COST_CYCLES)
            start = time.process_time()
            if bridge is None:
                stream.synchronize()
            else:
                await bridge.wait(stream)
            cpu[name].append(time.process_time() - start)
    return {
        "bridge_latency_us": {n: round(statistics.median(v) * 1e6, 2) for n, v in latency.items()},
        "cpu_ms_per_2ms_wait": {n: round(statistics.median(v) * 1e3, 3) for n, v in cpu.items()},
        "host_func_api": kinds["host_func"].api,
        "repeats": repeats,
    }


# --- seeds on side streams ---


def side_streams(batch: int, repeats: int, steps: int) -> dict[str, Any]:
    """Step time with every conv seed in TRAINING: inline vs each on its own side stream."""
    device = torch.device("cuda")
    inline = seeded_host(device)
    beside = copy.deepcopy(inline)
    lent = enable_side_streams(beside)
    step_inline, step_beside = make_step(inline, batch, device), make_step(beside, batch, device)

    def block(step: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        return run

    times = interleaved_medians(
        {"inline": block(step_inline), "side_streams": block(step_beside)}, repeats=repeats
    )
    lent.close()
    return {
        "batch": batch, "seeds_training": len(lent.slots), "streams": len(lent.streams),
        "median_step_ms": {k: round(v / steps * 1e3, 4) for k, v in times.items()},
        "speedup": round(times["inline"] / times["side_streams"], 4),
        "repeats": repeats, "steps_per_block": steps,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick
    result: dict[str, Any] = {"device": str(device), "quick": quick, "machine": machine()}
    if cuda:
        result["device_name"] = torch.cuda.get_device_name()
        rounds, steps = (6, 20) if quick else (20, 50)
        runs = [await overhead(device, b, rounds, steps, BridgeKind.HOST_FUNC) for b in (32, 256)]
        runs.append(await overhead(device, 256, rounds, steps, BridgeKind.HOST_FUNC,
                                   heartbeat=False))
        runs.append(await overhead(device, 32, rounds, steps, BridgeKind.EVENT_THREAD))
        runs.append(await overhead(device, 256, rounds, steps, BridgeKind.EVENT_THREAD))
        # A GPU-bound step (width 128, batch 256): the same fixed cost per step, a smaller share.
        wide = await overhead(device, 256, rounds, max(10, steps // 5), BridgeKind.HOST_FUNC,
                              width=128)
        runs.append(wide)
        result["overhead"] = runs
        result["async_overhead_ratio_gpu_bound"] = wide["ratio"]
        result["trainer"] = [
            await trainer_overhead(device, 32, 8 if quick else 22, 20 if quick else 40),
            await trainer_overhead(device, 256, 8 if quick else 22, 10 if quick else 20, width=128),
        ]
        result.update(await bridge_latency(200 if quick else 2000))
        result["side_streams"] = [
            side_streams(b, 5 if quick else 20, 10 if quick else 20) for b in (32, 256)
        ]
        result["goals"] = {"async_overhead_ratio": 1.02, "loop_lag_p99_ms": 5.0}
    else:
        result["device_name"] = result["machine"]["cpu"]
        rounds, steps = (4, 5) if quick else (12, 10)
        result["overhead"] = [await overhead(device, 32, rounds, steps, None)]
        result["trainer"] = [await trainer_overhead(device, 32, 6 if quick else 14, 10)]
        result["bridge_latency_us"] = None
        result["side_streams"] = None
        result["note"] = "CPU: steps run in a worker thread; bridges and side streams need CUDA"
        result["goals"] = {"async_overhead_ratio": 1.02, "loop_lag_p99_ms": 20.0}
    headline = result["overhead"][0]
    result["async_overhead_ratio"] = headline["ratio"]
    result["loop_lag_p99_ms"] = max(
        r["loop_lag_ms"]["p99"] for r in result["overhead"] if r["heartbeat"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, seconds not minutes")
    parser.add_argument("--cpu", action="store_true", help="measure the CPU path on a GPU machine")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = anyio.run(run, args)
    name = "async_cuda" if result["device"] == "cuda" else "async"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"async_overhead_ratio {result['async_overhead_ratio']:.4f}, "
          f"loop_lag_p99_ms {result['loop_lag_p99_ms']:.3f} → {path}")


if __name__ == "__main__":
    main()
