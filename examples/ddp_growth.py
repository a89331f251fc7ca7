"""Grow the digits host under DDP: rank 0 decides and compiles, every rank grafts the same kernels.

    torchrun --nproc_per_node 2 examples/ddp_growth.py --epochs 20
    torchrun --nproc_per_node 2 examples/ddp_growth.py --epochs 10 --checkpoints ckpt
    torchrun --nproc_per_node 2 examples/ddp_growth.py --epochs 10 --checkpoints ckpt --resume

On GPUs the ranks use NCCL for gradients (keep ``NCCL_NVLS_ENABLE=0`` set); on a CPU, gloo.
Control traffic (decisions, checks, checkpoint paths) always goes over a separate gloo group.
``--out DIR`` writes each rank's summary to ``DIR/rank<N>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import anyio
import torch

from esper_async.apps.ddp_demo import DDPDemoConfig, run_ddp_demo
from esper_async.control._controller import ControllerConfig
from esper_async.distributed import init_distributed
from esper_async.surgery import SurgeryPolicyConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--eager", action="store_true", help="grow at once (quick runs, tests)")
    parser.add_argument("--max-live", type=int, default=None, help="at most this many live seeds")
    parser.add_argument("--store", default=None, help="rank 0's kernel store directory")
    parser.add_argument("--checkpoints", default=None, help="checkpoint directory")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--surgery", action="store_true",
        help="widen each slot whose seed fossilizes (x1.5, at most x2)",
    )
    parser.add_argument("--backend", default=None, choices=["gloo", "nccl"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=None, help="write rank<N>.json here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    controller = ControllerConfig.eager(max_live_seeds=2) if args.eager else ControllerConfig()
    if args.max_live is not None:
        controller = dataclasses.replace(controller, max_live_seeds=args.max_live)
    ctx = init_distributed(backend=args.backend)
    try:
        cfg = DDPDemoConfig(
            epochs=args.epochs,
            seed=args.seed,
            batch_size=args.batch_size,
            limit=args.limit,
            controller=controller,
            store=args.store,
            checkpoints=args.checkpoints,
            resume=args.resume,
            surgery=SurgeryPolicyConfig(fossil_threshold=1, cooldown_steps=0)
            if args.surgery else None,
        )
        result = anyio.run(run_ddp_demo, cfg, ctx)
        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{ctx.rank}.json").write_text(json.dumps(result.to_json(), indent=1))
        if ctx.is_leader:
            fit = result.fit
            print(
                f"{ctx.world_size} ranks ({ctx.backend}), pid {os.getpid()}: test acc "
                f"{result.test_acc:.4f}, {result.params} parameters, {len(fit.events)} lifecycle "
                f"events, {result.compiles} kernels compiled; ranks equal, digest "
                f"{result.final.digest[:12]}"
            )
            for e in fit.events:
                print(f"  epoch {e.epoch:>3} {e.slot:<6} {e.source} -> {e.target}: {e.reason}")
            for op in result.surgeries:
                print(f"  surgery: {op}")
    finally:
        ctx.close()  # shuts down the control channel and the process group


if __name__ == "__main__":
    main()
