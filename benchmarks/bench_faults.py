"""Fault drill: compile-and-graft operations with faults of every kind injected at random.

    python benchmarks/bench_faults.py [--quick] [--operations N] [--seed S]
        → benchmarks/results/faults.json

A tiny MLP host with four linear slots runs operations back to back (germinate, obtain the
kernel, graft, blend, cull); a seeded plan gives a fraction of them a fault: a compile worker
killed with SIGKILL mid-compile, a compile past its timeout, a corrupted store blob, a kernel
that raises, returns NaN/Inf or runs out of memory, a blended seed that makes the loss spike, a
host parameter gone NaN. Compile faults are real compiles in real worker processes; the other
operations are served from the kernel store. See ``esper_async.apps.drill``.

Figures: ``operations``, ``faults_injected`` (by kind), ``training_crashes`` (must be 0),
``committed_data_lost`` (must be 0), ``success_rate`` (every injected fault is recoverable; goal
>= 0.999), ``recovered`` per kind, incidents, rollbacks, compiles, wall time, CPU and torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write

from esper_async.apps.drill import DrillConfig, run_drill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 operations")
    parser.add_argument("--operations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.08)
    args = parser.parse_args()
    torch.set_num_threads(1)
    operations = 100 if args.quick else args.operations
    config = DrillConfig(operations=operations, seed=args.seed, fault_rate=args.fault_rate)
    report = anyio.run(run_drill, config)
    data = {
        "machine": machine(),
        "config": {
            "operations": operations, "seed": args.seed, "fault_rate": args.fault_rate,
            "slots": config.slots, "compile_timeout_s": config.compile_timeout_s,
        },
        **report.to_json(),
    }
    path = write("faults", data)
    print(
        f"{report.operations} operations, faults {report.faults_injected}, "
        f"crashes {report.training_crashes}, data lost {report.committed_data_lost}, "
        f"success rate {report.success_rate:.4f} ({report.wall_s:.0f} s) -> {path}"
    )
    for failure in report.failures:
        print("  failed:", failure)
    return 0 if report.training_crashes == 0 and report.committed_data_lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
