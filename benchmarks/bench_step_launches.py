"""Kernel launches per training step: plain PyTorch against the Trainer and a plain loop with
``Grower.after_step`` (issue 28, "launch-bound steps": measure first, then cut).

    python benchmarks/bench_step_launches.py --device cuda [--precision fp32,bf16]
        → benchmarks/results/step_launches_cuda.json
    python benchmarks/bench_step_launches.py --quick          → step_launches_cpu.json

A short GPU step is launch-bound, so the count of what each step launches says where the
Trainer's extra milliseconds come from before any timing does. Arms (``bench_gpu.py``'s
workloads and loops): ``plain``; ``static`` (``Trainer(grow=False)``); ``dormant`` (a slot on
every candidate layer, all dormant); ``seeds`` (two seeds training); ``plain_after_step`` (the
plain loop on the dormant-slot model plus ``Grower.after_step(loss)`` each step). Each arm runs
``N`` and ``2N`` steps under ``torch.profiler``; per step = (count at 2N − count at N) / N, so
the epoch boundary of a Trainer's fit cancels. On CUDA the count is the device kernels and
memory copies/sets the step ran, and the host-to-device launches (``cudaLaunchKernel`` and
kin); on CPU, the ATen operators dispatched at the top level in the calling thread (so only the
plain arms: a Trainer runs its CPU steps in a worker thread). ``over_plain`` = arm − plain.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write
from bench_gpu import InTrainer, Plain, PlainAfterStep, _grow_two, _optimizer, _workloads

from esper_async.seeds import wrap

_LAUNCH_NAMES = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
)


def _count(fn: Any, device: torch.device) -> dict[str, int]:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type.name == "CUDA")
        launches = sum(1 for e in events if e.name in _LAUNCH_NAMES)
        return {"device_ops": kernels, "launches": launches}
    top = sum(
        1
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    return {"aten_ops": top}


def per_step(
    name: str, spec: dict[str, Any], device: torch.device, precision: str, steps: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    base = spec["model"]()
    batches = [tuple(t.to(device) for t in spec["batch"]()) for _ in range(2 * steps)]

    def wrapped() -> torch.nn.Module:
        model = copy.deepcopy(base)
        wrap(model, spec["slots"], example_input=spec["example"])
        return model.to(device)

    def arms(n: int) -> dict[str, Any]:
        few = batches[:n]
        seeded = wrapped()
        _grow_two(seeded, _optimizer(seeded, device), device)
        return {
            "plain": Plain(copy.deepcopy(base).to(device), spec["task"], few, device, precision),
            "static": InTrainer(copy.deepcopy(base), spec["task"], few, device, precision, False),
            "dormant": InTrainer(wrapped(), spec["task"], few, device, precision, False),
            "seeds": InTrainer(wrapped(), spec["task"], few, device, precision, True),
            "plain_seeds": Plain(seeded, spec["task"], few, device, precision),
            "plain_after_step": PlainAfterStep(wrapped(), spec["task"], few, device, precision),
        }

    short, long = arms(steps), arms(2 * steps)
    if device.type == "cpu":  # a Trainer's CPU steps run in a worker thread: not counted
        for table in (short, long):
            for arm in ("static", "dormant", "seeds"):
                del table[arm]
    counts: dict[str, dict[str, float]] = {}
    for arm in short:
        short[arm].block()  # warm-up: autotuning, allocator, caches
        long[arm].block()
        a = _count(short[arm].block, device)
        b = _count(long[arm].block, device)
        counts[arm] = {k: (b[k] - a[k]) / steps for k in a}
    plain = counts["plain"]
    out = {
        "per_step": counts,
        "over_plain": {
            arm: {k: v - plain[k] for k, v in c.items()}
            for arm, c in counts.items()
            if arm != "plain"
        },
    }
    if "seeds" in counts:  # a Trainer's arms are not counted on CPU (see the module doc)
        out["seeds_over_plain_seeds"] = {
            k: counts["seeds"][k] - counts["plain_seeds"][k] for k in plain
        }
    print(f"{name} {precision}: {out['per_step']}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16")
    parser.add_argument("--workloads", default="resnet_small,gpt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    specs = _workloads(args.quick)
    results: dict[str, Any] = {}
    for precision in args.precision.split(","):
        for name in args.workloads.split(","):
            results[f"{name}_{precision}"] = per_step(
                name, specs[name], device, precision, 4 if args.quick else args.steps
            )
    path = write(
        args.out or f"step_launches_{device.type}",
        {
            "device": str(device),
            "machine": machine(),
            "torch": torch.__version__,
            "results": results,
        },
    )
    print(path)


if __name__ == "__main__":
    main()
