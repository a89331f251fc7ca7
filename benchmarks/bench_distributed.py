"""Growth under DDP: per-rank step time, scaling efficiency, germination → graft live on all ranks.

    python benchmarks/bench_distributed.py                    # NCCL, 1 then 2 GPUs
    python benchmarks/bench_distributed.py --backend gloo --quick   # CPU, 1 then 2 processes

The driver launches the demo model's growth run (``esper_async.distributed.run_ddp_demo``) with
torchrun, once per world size, in turn, each with a fresh kernel store (so every kernel is really
compiled, on rank 0). Each rank records the wall time of every training step and when each
kernel arrived and each DDP rebuild happened; rank 0 gathers them. Figures:

* per-rank step time: median (and mean, p90) of every step, steps right after a DDP rebuild
  included (the median is robust to them);
* scaling efficiency (weak scaling, the same batch per rank): throughput with N ranks over N
  times the throughput with one, ``(N * batch / slowest rank's median step) / (N * batch / T1)``;
* germination → live on all ranks: from the moment rank 0's decision to germinate was
  broadcast to the latest rank's first step with the seed's parameters in DDP. With
  ``graft="epoch"`` (what keeps ranks in step) it is at least the rest of an epoch; the compile
  and the kernel's arrival on each rank are reported beside it.

NCCL runs keep ``NCCL_NVLS_ENABLE=0``. Results: ``benchmarks/results/distributed.json`` (NCCL);
gloo results are printed (or written to ``--output``).

**Host growth** (``--host-growth``; ``_ddp_host_growth.py``)::

    python benchmarks/bench_distributed.py --host-growth      # NCCL, 1 then 2 GPUs
    python benchmarks/bench_distributed.py --host-growth --backend gloo --quick \
        --output benchmarks/results/distributed_host_growth_gloo_cpu.json

A Shakespeare char GPT (3 blocks x 128, 2 heads of 64; ``--quick``: 1 x 32 at T=32, B=8) trains
under DDP, then at one step boundary grows to its target (6 x 384 with 6 heads and MLP 1536, the
state-dict shapes of nanoGPT's ``shakespeare_char``; ``--quick``: 2 x 64) by rank 0's plan —
``WidenResidual``, a ``Widen`` of each MLP, ``StackBlocks`` — broadcast as operation records and
applied on every rank; DDP is rebuilt and training goes on. Figures, per world size: each rank's
step time before and after growth (median, mean, p90 of ``--steps`` timed steps after
``--warmup``), weak-scaling efficiency against one rank for both phases, the seconds each
operation took on each rank (and its ``check_ranks_in_sync``), the DDP rebuild, and whether the
ranks were identical after every operation and at the end (different data per rank, so only DDP
keeps them equal). NCCL results: ``benchmarks/results/distributed_host_growth.json``; gloo ones
only where ``--output`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, machine, write
from _ddp_host_growth import HOST_SIZES, host_plan, host_rank_program, host_summary, step_stats

#: Per launch, seconds before the driver gives up on it.
LAUNCH_TIMEOUT_S = 240


def _rank_program(args: argparse.Namespace) -> None:
    import anyio
    import torch

    from esper_async.apps.ddp_demo import DDPDemoConfig, run_ddp_demo
    from esper_async.control._controller import ControllerConfig
    from esper_async.distributed import init_distributed

    torch.set_num_threads(args.threads)
    ctx = init_distributed(backend=args.backend)
    try:
        cfg = DDPDemoConfig(
            epochs=args.epochs,
            seed=args.seed,
            batch_size=args.batch_size,
            limit=args.limit,
            controller=ControllerConfig.eager(max_live_seeds=args.max_live),
            store=str(Path(args.workdir) / f"store-world{ctx.world_size}"),
            forms=tuple(args.forms.split(",")) if args.forms else None,
        )
        result = anyio.run(run_ddp_demo, cfg, ctx)
        ranks = ctx.channel.all_gather_object(result.to_json())
        if ctx.is_leader:
            out = Path(args.workdir) / f"world{ctx.world_size}.json"
            out.write_text(json.dumps({"machine": machine(), "ranks": ranks}))
    finally:
        ctx.close()


def _torchrun(
    world: int, args: argparse.Namespace, workdir: Path, tail: list[str]
) -> dict[str, Any] | str:
    """Rank 0's gathered results of one torchrun launch of this file's rank program with
    ``tail`` as its options, or the launch's error output. NVLink multicast stays off."""
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": str(args.threads)}
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(src)) if p)
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}", str(Path(__file__).resolve()), "--rank-program",
        "--workdir", str(workdir), "--backend", args.backend, "--seed", str(args.seed),
        "--threads", str(args.threads), *tail,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=args.launch_timeout
        )
    except subprocess.TimeoutExpired as exc:
        return f"timed out after {args.launch_timeout} s: {str(exc.stderr)[-2000:]}"
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr[-4000:]}"
    if args.raw:
        Path(args.raw).mkdir(parents=True, exist_ok=True)
        (Path(args.raw) / f"world{world}.json").write_bytes(
            (workdir / f"world{world}.json").read_bytes()
        )
    return json.loads((workdir / f"world{world}.json").read_text())  # type: ignore[no-any-return]


def _launch(world: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any] | str:
    """Rank 0's gathered results of one launch of the demo's growth run, or its error output."""
    tail = [
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
        "--max-live", str(args.max_live),
    ]  # fmt: skip
    if args.limit is not None:
        tail += ["--limit", str(args.limit)]
    if args.forms:
        tail += ["--forms", args.forms]
    return _torchrun(world, args, workdir, tail)


def _growth_latency(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per germination: when its kernel reached each rank, and when it was live on all."""
    lead = ranks[0]
    out = []
    for when, slot, blueprint in lead["germinated"]:
        live, arrived = [], []
        for rank in ranks:
            build = next(
                (
                    t
                    for t, seeds in rank["ddp_builds"]
                    if t >= when and any(s.startswith(f"{slot}:") for s in seeds)
                ),
                None,
            )
            live.append(None if build is None else build - when)
            arrival = next(
                (t for t, bp, _ in rank["arrivals"] if t >= when and bp == blueprint), None
            )
            arrived.append(None if arrival is None else arrival - when)
        done = None not in live
        out.append(
            {
                "slot": slot,
                "blueprint": blueprint,
                "kernel_ready_s_per_rank": [None if a is None else round(a, 4) for a in arrived],
                "live_s_per_rank": [None if x is None else round(x, 4) for x in live],
                "live_on_all_ranks_s": round(max(live), 4) if done else None,  # type: ignore[type-var]
            }
        )
    return out


def _summarise(world: int, data: dict[str, Any], batch: int) -> dict[str, Any]:
    ranks = data["ranks"]
    per_rank = [step_stats(r["step_s"]) for r in ranks]
    slowest = max(s["median_ms"] for s in per_rank)
    return {
        "world_size": world,
        "per_rank_step": per_rank,
        "samples_per_s": round(world * batch / (slowest / 1e3), 1),
        "ranks_equal": len({r["final"]["digest"] for r in ranks}) == 1
        and all(r["final"]["slots"] == ranks[0]["final"]["slots"] for r in ranks),
        "final_digest": ranks[0]["final"]["digest"][:16],
        "kernels_compiled_rank0": ranks[0]["compiles"],
        "kernels_received": [r["received"] for r in ranks],
        "ddp_builds": len(ranks[0]["ddp_builds"]),
        "ddp_params_per_build": ranks[0]["ddp_params"],
        "bare_host_params": ranks[0]["host_params"],
        "lifecycle_events": len(ranks[0]["events"]),
        "germination_to_live": _growth_latency(ranks),
        "test_acc": ranks[0]["test_acc"],
    }


def _host_growth_main(args: argparse.Namespace) -> None:
    mode = "quick" if args.quick else "full"
    runs: dict[int, dict[str, Any]] = {}
    device_info: dict[str, Any] = {}
    tail = [
        "--host-growth",
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
    ]
    tail += ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-host-") as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            data = _torchrun(world, args, Path(tmp), tail)
            if isinstance(data, str):
                print(f"world {world} failed: {data}", file=sys.stderr)
                runs[world] = {"world_size": world, "error": data[-1500:]}
                continue
            runs[world] = host_summary(world, data)
            device_info = data["machine"]
    base = runs.get(1)
    for world, run in runs.items():
        if world > 1 and base is not None and "error" not in base and "error" not in run:
            for when in ("before", "after"):  # weak scaling: N x the samples in the slowest step
                run[f"scaling_efficiency_vs_1_{when}"] = round(
                    base[f"slowest_median_ms_{when}"] / run[f"slowest_median_ms_{when}"], 4
                )
    sizes = HOST_SIZES[mode]
    result = {
        "benchmark": "distributed_host_growth",
        "backend": args.backend,
        "machine": device_info,
        "nccl_nvls_enable": "0" if args.backend == "nccl" else None,
        "baseline": "the same script at world size 1 (DDP over one rank)",
        "config": {
            "mode": mode,
            "model": "Shakespeare char GPT (esper_async.apps.gpt), dropout 0, no biases",
            "start_layers_width_heads": list(sizes["start"]),
            "target_layers_width": list(sizes["target"]),
            "block_size": sizes["block_size"],
            "batch_per_rank": sizes["batch"],
            "plan": [r["op"] for r in host_plan(mode)],
            "warmup_steps": args.warmup,
            "timed_steps_per_phase": args.steps,
            "optimizer": f"AdamW lr {args.lr}, weight decay 0.1",
            "matmul": "TF32 on CUDA (growth itself in FP32)",
            "threads_per_rank": args.threads,
        },
        "runs": {f"world{w}": r for w, r in runs.items()},
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.output is not None:
        Path(args.output).write_text(text + "\n")
    elif args.backend == "nccl":
        path = write("distributed_host_growth", result)
        print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank-program", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--worlds", default="1,2", help="world sizes to run, in turn")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-live", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--forms", default=None, help="kernel forms to measure, e.g. export")
    parser.add_argument("--quick", action="store_true", help="6 epochs on 600 images")
    parser.add_argument("--output", default=None, help="results file (NCCL default: results)")
    parser.add_argument("--raw", default=None, help="copy each launch's per-rank data here")
    parser.add_argument("--launch-timeout", type=float, default=LAUNCH_TIMEOUT_S)
    parser.add_argument(
        "--host-growth",
        action="store_true",
        help="the host-growth run: a Shakespeare GPT grown to its target under DDP",
    )
    parser.add_argument("--warmup", type=int, default=None, help="host growth: untimed steps")
    parser.add_argument("--steps", type=int, default=None, help="host growth: timed steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="host growth: AdamW rate")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.limit = 6, args.limit or 600
    if args.warmup is None:
        args.warmup = 2 if args.quick else 10
    if args.steps is None:
        args.steps = 10 if args.quick else 100
    if args.rank_program:
        (host_rank_program if args.host_growth else _rank_program)(args)
        return
    if args.host_growth:
        _host_growth_main(args)
        return
    runs: dict[int, dict[str, Any]] = {}
    device_info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            data = _launch(world, args, Path(tmp))
            if isinstance(data, str):
                print(f"world {world} failed: {data}", file=sys.stderr)
                runs[world] = {"world_size": world, "error": data[-1500:]}
                continue
            runs[world] = _summarise(world, data, args.batch_size)
            device_info = data["machine"]
    base = runs.get(1)
    for world, run in runs.items():
        if base is not None and "error" not in base and "error" not in run and world > 1:
            run["scaling_efficiency_vs_1"] = round(
                run["samples_per_s"] / (world * base["samples_per_s"]), 4
            )
    result = {
        "benchmark": "distributed",
        "backend": args.backend,
        "machine": device_info,
        "nccl_nvls_enable": "0" if args.backend == "nccl" else None,
        "baseline": "the same script at world size 1 (DDP over one rank)",
        "config": {
            "model": "DigitsHost (demo), slots conv1, conv2, fc1",
            "epochs": args.epochs,
            "batch_per_rank": args.batch_size,
            "limit": args.limit,
            "max_live_seeds": args.max_live,
            "forms": args.forms or "device defaults",
            "graft": "epoch",
            "threads_per_rank": args.threads,
        },
        "runs": {f"world{w}": r for w, r in runs.items()},
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.output is not None:
        Path(args.output).write_text(text + "\n")
    elif args.backend == "nccl":
        path = write("distributed", result)
        print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    print(text)


if __name__ == "__main__":
    main()
