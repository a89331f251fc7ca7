"""The Shakespeare GPT demo's three arms: static, growth, static_final, on one token budget.

    python benchmarks/bench_lm.py                      → benchmarks/results/lm.json (CPU quick)
    python benchmarks/bench_lm.py --device cuda --out benchmarks/results/lm_cuda.json

The CPU run is :meth:`LMDemoConfig.quick` (the narrow host, 2×64, T=64, B=32, 1000 steps per
arm); the CUDA run is :meth:`LMDemoConfig.full` (nanoGPT's ``shakespeare_char`` host, 6×384,
T=256, B=64, dropout 0.2, 600 steps per arm, TF32 matmuls), sized to finish all three arms in
about 4 minutes on one H200. Per arm: final validation loss (nats/char) and bits per char,
parameters, training tokens, training FLOPs (``FlopLedger``: steps, validation and
counterfactual passes, kernel compiles), tokens/s and wall seconds. nanoGPT's published
anchors (``shakespeare_char``: val loss 1.4697 after 5000 iterations of 64×256 tokens; its
CPU "baby GPT": ≈1.88) are for comparison of scale only: the arms here are compared with the
static host measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

NANOGPT_ANCHORS = {
    "shakespeare_char_val_loss_5000_iters": 1.4697,
    "baby_gpt_cpu_val_loss": 1.88,
    "note": "nanoGPT's README; a different split (the 1 MB tinyshakespeare, 90/10) and budget",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three arms and return the JSON-ready figures."""
    import anyio
    import torch

    from esper_async.apps.lm_demo import LMDemoConfig, run_lm_demo

    overrides: dict[str, Any] = {"seed": args.seed, "use_store": False}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.steps is not None:
        overrides["steps_per_epoch"] = args.steps
    if args.forms:
        overrides["kernel_forms"] = tuple(args.forms.split(","))
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        cfg = LMDemoConfig.full(device=args.device, **overrides)
    else:
        cfg = LMDemoConfig.quick(device=args.device, **overrides)
    started = time.perf_counter()
    result = anyio.run(run_lm_demo, cfg)
    out = result.summary()
    arms = out["arms"]
    out.update({
        "command": "python benchmarks/bench_lm.py " + " ".join(sys.argv[1:]),
        "total_wall_s": time.perf_counter() - started,
        "growth_minus_static_val_loss": arms["growth"]["val_loss"] - arms["static"]["val_loss"],
        "growth_minus_static_final_val_loss":
            arms["growth"]["val_loss"] - arms["static_final"]["val_loss"],
        "flops_ratio_growth_over_static_final":
            arms["growth"]["flops"]["total"] / arms["static_final"]["flops"]["total"],
        "nanogpt_anchors": NANOGPT_ANCHORS,
        "machine": machine(),
    })
    if cuda:
        out["machine"]["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs per arm")
    parser.add_argument("--steps", type=int, default=None, help="override steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forms", default=None,
                        help="kernel execution forms to measure, comma-separated (default: the "
                        "optimizer's for the device; 'export' skips Inductor compiles)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm.json"))
    args = parser.parse_args()
    result = run(args)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for label, arm in result["arms"].items():
        print(f"{label:<12} val {arm['val_loss']:.4f} ({arm['bits_per_char']:.3f} bits/char) "
              f"params {arm['params']} FLOPs {arm['flops']['total']:.3e} {arm['wall_s']:.1f} s")
    print(f"→ {path} ({result['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
