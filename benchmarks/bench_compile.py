"""The compilation pipeline: compile latency, load latency, execution overhead of grafted kernels,
and training throughput while compiles run.

    python benchmarks/bench_compile.py [--quick] [--device cuda]
        → benchmarks/results/compile.json (CPU) or compile_cuda.json (CUDA)

* ``compile_p50_s`` / ``compile_p95_s``: every blueprint of the library, cold (not in any store),
  worker already started; export, optimizer measurements and validation included.
* ``load_p50_ms``: sha256 check plus deserialisation of a kernel in the training process.
* ``exec_overhead_ratio_max``: forward+backward of the grafted kernel (in its chosen form) over the
  same blueprint as a plain eager module, median of interleaved runs; the worst blueprint.
* ``throughput_during_compile_ratio``: training steps per second of a conv host while compiles run
  back to back in the pool, over steps per second with no compile, in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import anyio
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, write

from esper_async import Blueprint, SlotContract, SlotKind, library, load_kernel
from esper_async.blueprints import build
from esper_async.compiler import BlueprintCompiler, OptimizerOptions


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def contract_for(bp: Blueprint, size: str) -> SlotContract:
    conv, linear = {
        "small": ((16, 16, 16), (128,)),
        "big": ((64, 32, 32), (1024,)),
        "large": ((64, 64, 64), (4096,)),
    }[size]
    if bp.slot_kind is SlotKind.CONV:
        return SlotContract(SlotKind.CONV, conv)
    return SlotContract(bp.slot_kind, linear)  # linear or token slots: the feature width


def exec_ratio(
    kernel, bp: Blueprint, contract: SlotContract, device: str, batch: int, repeats: int
) -> tuple[float, dict[str, float]]:
    grafted = load_kernel(kernel, device=device)
    eager = build(bp, contract, seed=kernel.metadata.init_seed).to(device)
    x = torch.randn(contract.batch_shape(batch, tokens=16), device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(module: nn.Module) -> None:
        module(x).sum().backward()
        sync()

    times = interleaved_medians(
        {"grafted": lambda: step(grafted), "eager": lambda: step(eager)}, repeats=repeats, warmup=5
    )
    return times["grafted"] / times["eager"], {k: v * 1e3 for k, v in times.items()}


def conv_host(device: str) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).to(device)


def train_steps_per_s(model: nn.Module, seconds: float, device: str) -> float:
    """Train for ``seconds`` in this thread; steps per second."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        steps += 1
    sync()
    return steps / (time.perf_counter() - start)


async def throughput_ratio(compiler: BlueprintCompiler, device: str, seconds: float) -> dict:
    model = conv_host(device)
    baseline = await anyio.to_thread.run_sync(train_steps_per_s, model, seconds, device)
    stop = threading.Event()
    compiled = 0

    async def keep_compiling() -> None:
        nonlocal compiled
        contract = SlotContract(SlotKind.CONV, (16, 16, 16))
        seed = 1000
        while not stop.is_set():
            seed += 1  # a new seed each time: nothing is cached, every compile is real work
            await compiler.compile(Blueprint("residual_conv"), contract, seed=seed)
            compiled += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_compiling)
        await anyio.sleep(0.5)  # let the first compile get going
        during = await anyio.to_thread.run_sync(train_steps_per_s, model, seconds, device)
        stop.set()
        tg.cancel_scope.cancel()
    after = await anyio.to_thread.run_sync(train_steps_per_s, model, seconds, device)
    base = (baseline + after) / 2  # before and after, to cancel drift
    return {
        "throughput_during_compile_ratio": round(during / base, 4),
        "steps_per_s_no_compile": round(base, 2),
        "steps_per_s_during_compile": round(during, 2),
        "compiles_during_window": compiled,
        "training_threads": torch.get_num_threads(),
    }


async def run(args: argparse.Namespace) -> dict:
    device = args.device
    big = device.startswith("cuda")
    size = args.size or ("big" if big else "small")
    blueprints = library()
    if args.families:
        blueprints = tuple(bp for bp in blueprints if bp.family in args.families.split(","))
    blueprints = blueprints[: 4 if args.quick else None]
    options = OptimizerOptions(repeats=5 if args.quick else 10, batch=256 if big else 32)
    workers = args.workers or (4 if big else 1)
    compile_s, loads_ms, ratios, rows = [], [], {}, []
    async with BlueprintCompiler(device=device, workers=workers, options=options) as compiler:
        await compiler.wait_ready()
        for bp in blueprints:
            contract = contract_for(bp, size)
            start = time.perf_counter()
            kernel = await compiler.compile(bp, contract, seed=0)
            compile_s.append(time.perf_counter() - start)
            load_times = []
            for _ in range(5):
                t = time.perf_counter()
                load_kernel(kernel, device=device)
                load_times.append((time.perf_counter() - t) * 1e3)
            loads_ms.append(statistics.median(load_times))
            ratio, times = exec_ratio(
                kernel, bp, contract, device, options.batch, repeats=10 if args.quick else 30
            )
            ratios[bp.name] = round(ratio, 4)
            meta = kernel.metadata
            rows.append(
                {
                    "blueprint": bp.name,
                    "contract": list(contract.shape),
                    "compile_s": round(compile_s[-1], 3),
                    "export_s": meta.extra["export_s"],
                    "form": meta.execution_form,
                    "form_timings_ms": meta.extra["form_timings_ms"],
                    "form_errors": meta.extra["form_errors"],
                    "load_ms": round(loads_ms[-1], 2),
                    "exec_ms": {k: round(v, 4) for k, v in times.items()},
                    "exec_overhead_ratio": round(ratio, 4),
                }
            )
            print(
                f"{bp.name:<42} compile {compile_s[-1]:6.2f}s  form {meta.execution_form:<13}"
                f" ratio {ratio:.3f}",
                flush=True,
            )
        throughput = await throughput_ratio(compiler, device, 3.0 if args.quick else 10.0)
    worst = max(ratios, key=ratios.__getitem__)
    return {
        "device": torch.cuda.get_device_name() if big else machine()["cpu"],
        "compile_p50_s": round(statistics.median(compile_s), 3),
        "compile_p95_s": round(percentile(compile_s, 0.95), 3),
        "load_p50_ms": round(statistics.median(loads_ms), 2),
        "exec_overhead_ratio_max": ratios[worst],
        "exec_overhead_worst_blueprint": worst,
        **throughput,
        "workers": workers,
        "size": size,
        "batch": options.batch,
        "blueprints": rows,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 blueprints, fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--families", default=None, help="comma-separated blueprint families")
    parser.add_argument(
        "--size",
        choices=("small", "big", "large"),
        default=None,
        help="slot shapes (default: small on CPU, big on CUDA)",
    )
    parser.add_argument("--out", default=None, help="result name (default compile[_cuda])")
    args = parser.parse_args()
    result = anyio.run(run, args)
    name = args.out or ("compile_cuda" if args.device.startswith("cuda") else "compile")
    path = write(name, result)
    print(
        f"compile p50 {result['compile_p50_s']} s, p95 {result['compile_p95_s']} s, load p50 "
        f"{result['load_p50_ms']} ms, exec ratio max {result['exec_overhead_ratio_max']}, "
        f"throughput during compile {result['throughput_during_compile_ratio']} → {path}"
    )


if __name__ == "__main__":
    main()
