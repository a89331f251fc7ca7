"""Grow the host itself (issue 27): growth against the target shape trained from scratch.

    python benchmarks/bench_grow_host.py --workload cnn --seeds 5 --seed 10    (CPU, digits)
    python benchmarks/bench_grow_host.py --workload lm --quick --seeds 2       (CPU pilot)

On one GPU, the Shakespeare GPT, 2 seeds (8 runs at once) per command, then merged:

    python benchmarks/bench_grow_host.py --workload lm --device cuda --steps 3000 --dropout 0.2 \
        --seeds 2 --seed 0 --jobs 8 --out grow_host_lm_cuda_s0      (likewise --seed 2, --seed 4)
    python benchmarks/bench_grow_host.py --out grow_host_lm_cuda \
        --merge benchmarks/results/grow_host_lm_cuda_s{0,2,4}.json

Arms, per seed (same data order, same recipe, same budget):

* ``static``: the start shape, trained for the whole budget.
* ``growth``: the start shape, grown to the target by a :class:`~esper_async.surgery.GrowthSchedule`
  at ``--grow-at`` (a fraction of the budget), then trained to the end of the budget.
* ``static_target``: the target shape from scratch ("No Train No Gain": the same recipe and budget,
  its learning rate decaying fully within the budget).
* ``static_target_eqflops``: the target shape from scratch for the steps that cost what growth's
  cost (equal FLOPs), its learning rate decaying fully within them.

Workloads: ``lm``, the Shakespeare GPT (:mod:`esper_async.apps.gpt`), start ``--start`` (layers x
width, default 2x384) → target ``--target`` (6x384, nanoGPT's ``shakespeare_char``), AdamW with
nanoGPT's recipe (lr 1e-3 → 1e-4 cosine, warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0), bf16
autocast on CUDA; depth grows by G_stack stacking (Du et al. 2024, :class:`StackBlocks`): the
trained blocks are copied whole (``--stack-mode``), optimizer state with them, to the target depth;
a wider target widens the residual stream first (:class:`WidenResidual`). ``cnn``: a plain conv
net on sklearn's digits, width
``--cnn-start`` → ``--cnn-target`` channels per conv, widened by :class:`~esper_async.surgery.Widen`
(Net2Wider, function-preserving, optimizer moments carried).

FLOPs are counted with ``torch.utils.flop_counter`` (3x a forward per training batch, per model
structure), plus the growth's own validation forwards. Wall seconds are training time (steps and
the growth transaction) without the evaluations. With ``--jobs J`` the (seed, arm) runs go to J
processes at once (on one GPU they share it: every arm's wall time stretches, roughly alike).

Per workload, the JSON has each run's validation curve (tokens, FLOPs, wall), and for growth and
static: tokens, FLOPs and wall to reach static_target's final validation loss, as shares of
static_target's totals (``flops_to_target`` / ``wall_to_target`` per seed, ``null`` if never
reached), the loss at equal FLOPs (static_target's curve interpolated at growth's total FLOPs),
paired 95 % intervals, and the issue's goal (FLOPs share <= 0.70 and wall share <= 0.80 in every
seed, and equal-FLOPs loss no worse) checked. Equal FLOPs is a fourth arm,
``static_target_eqflops``: the target from scratch for the steps that cost what growth's cost, its
learning rate decaying fully within them (static_target's own curve at growth's FLOPs is
mid-schedule, not yet annealed, which flatters growth; it is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, ci95, machine

# longest first, so that a pool of jobs stays full
ARMS = ("static_target", "growth", "static_target_eqflops", "static")
GOAL_FLOPS_SHARE = 0.70
GOAL_WALL_SHARE = 0.80


def parse_shape(text: str) -> tuple[int, int]:
    """``"2x384"`` → ``(2, 384)``."""
    layers, _, width = text.lower().partition("x")
    return int(layers), int(width)


# --- FLOPs and evaluation ---------------------------------------------------------------------


class FlopCache:
    """Training FLOPs per batch (3x a measured forward), cached per model structure."""

    def __init__(self) -> None:
        self._cache: dict[Any, float] = {}

    def train_flops(self, model: Any, x: Any) -> float:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        key = (tuple((n, tuple(p.shape)) for n, p in model.named_parameters()), tuple(x.shape))
        if key not in self._cache:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model(x)
            self._cache[key] = 3.0 * counter.get_total_flops()
        return self._cache[key]


def first_reach(xs: list[float], losses: list[float], target: float) -> float | None:
    from esper_async.apps.lm_demo import first_reach as reach

    return reach(xs, losses, target)


def interpolate(xs: list[float], ys: list[float], at: float) -> float | None:
    """``ys`` linearly interpolated at ``at`` (``None`` outside ``xs``'s range)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True),
                                  strict=False):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return None


# --- workloads --------------------------------------------------------------------------------


def lm_setup(
    args: argparse.Namespace, seed: int, shape: tuple[int, int], steps: int
) -> dict[str, Any]:
    import torch

    from esper_async.apps.gpt import GPT, GPTConfig
    from esper_async.apps.shakespeare import load_shakespeare

    data = load_shakespeare()
    layers, width = shape
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=data.vocab.size, block_size=args.block, n_layer=layers,
                       n_head=max(1, width // 64), n_embd=width, dropout=args.dropout)
    model = GPT(config).to(args.device)
    train = data.train_batches(batch_size=args.batch, block_size=args.block,
                               batches_per_epoch=steps, seed=seed)
    val = list(data.eval_batches("val", batch_size=args.batch, block_size=args.block,
                                 max_batches=args.eval_batches))
    return {"model": model, "train": train, "val": val, "tokens_per_batch": args.batch * args.block}


def lm_grow(model: Any, start: tuple[int, int], target: tuple[int, int], mode: str) -> list[Any]:
    """The operations growing the GPT from ``start`` to ``target``: the residual width first
    (:class:`WidenResidual`, then each MLP's hidden layer by :class:`Widen`; function-preserving),
    then G_stack depth (:class:`StackBlocks`, ``target`` layers / ``start`` layers copies of the
    trained stack)."""
    from esper_async.apps.gpt import MLP_RATIO
    from esper_async.surgery import StackBlocks, Widen, WidenResidual

    ops: list[Any] = []
    if target[1] != start[1]:
        ops.append(WidenResidual(target[1], seed=0))
        # the MLP's hidden width is the host's own (4·d), not the stream's: widen it to 4·d'
        ops += [Widen(f"blocks.{i}.mlp.fc", MLP_RATIO * target[1], seed=1 + i)
                for i in range(start[0])]
    if target[0] != start[0]:
        if target[0] % start[0]:
            raise SystemExit(f"--target depth {target[0]} is not a multiple of --start's "
                             f"{start[0]}")
        ops.append(StackBlocks("blocks", factor=target[0] // start[0], mode=mode))
    return ops


def cnn_setup(args: argparse.Namespace, seed: int, width: int, steps: int) -> dict[str, Any]:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    test, train = order[:360], order[360:]
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    ).to(args.device)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            perm = train[torch.randperm(len(train), generator=gen)]
            for i in range(0, len(perm) - args.cnn_batch + 1, args.cnn_batch):
                idx = perm[i:i + args.cnn_batch]
                yield x[idx], y[idx]

    stream = batches()
    val = [(x[test], y[test])]
    return {"model": model, "train": (next(stream) for _ in range(steps)), "val": val,
            "tokens_per_batch": args.cnn_batch}


def cnn_widen(model: Any, width: int) -> list[Any]:
    from torch import nn

    from esper_async.surgery import Widen

    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    # the last conv reaches the head through the pooling, which fx's walk does not pass: its
    # consumer and norm are named (indices of cnn_setup's Sequential)
    return [Widen(name, width, seed=i) for i, name in enumerate(convs[:-1])] + [
        Widen(convs[-1], width, consumers=("11",), norms=("7",), seed=len(convs))]


def equal_flops_steps(args: argparse.Namespace, start: tuple[int, int], target: tuple[int, int],
                      budget: int, grow_step: int) -> int:
    """The steps of the target shape that cost what growth's training steps cost:
    ``grow_step`` steps at the start shape and ``budget - grow_step`` at the target."""
    flops = FlopCache()
    per = {}
    for shape in (start, target):
        if args.workload == "lm":
            setup = lm_setup(args, 0, shape, 1)
        else:
            setup = cnn_setup(args, 0, shape[1], 1)
        x, _ = next(iter(setup["train"]))
        per[shape] = flops.train_flops(setup["model"], x.to(args.device))
    spent = grow_step * per[start] + (budget - grow_step) * per[target]
    return max(1, round(spent / per[target]))


# --- one run ----------------------------------------------------------------------------------


def run_arm(args: argparse.Namespace, seed: int, arm: str) -> dict[str, Any]:
    """Train one arm of one seed; return its curve and totals."""
    import torch
    import torch.nn.functional as F

    from esper_async.surgery import GrowthLR, GrowthSchedule, GrowthStage

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = args.workload == "lm"
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    if lm:
        start, target = parse_shape(args.start), parse_shape(args.target)
        budget, make = args.steps, (lambda shape, n: lm_setup(args, seed, shape, n))
    else:
        start, target = (1, args.cnn_start), (1, args.cnn_target)
        budget, make = args.cnn_steps, (lambda shape, n: cnn_setup(args, seed, shape[1], n))
    grow_step = round(args.grow_at * budget)
    steps = budget
    if arm == "static_target_eqflops":
        steps = equal_flops_steps(args, start, target, budget, grow_step)
    setup = make(start if arm in ("static", "growth") else target, steps)
    if lm:
        lr = GrowthLR(peak=args.lr, total_steps=steps, warmup_steps=args.warmup,
                      min_lr=args.lr / 10, after_growth=args.after_growth,
                      rewarm_steps=args.rewarm_steps or max(1, steps // 50))
    else:
        lr = GrowthLR(peak=args.cnn_lr, total_steps=steps, warmup_steps=steps // 50,
                      min_lr=args.cnn_lr / 100, after_growth=args.after_growth,
                      rewarm_steps=max(1, steps // 50))
    model = setup["model"]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1 if lm else 0.0},
         {"params": rest, "weight_decay": 0.0}],
        lr=lr.peak, betas=(0.9, 0.99 if lm else 0.999), fused=cuda,
    )
    val = [(x.to(args.device), y.to(args.device)) for x, y in setup["val"]]
    probe = val[0][0][:2]
    if arm == "growth":
        grow = ((lambda m: lm_grow(m, start, target, args.stack_mode)) if lm
                else (lambda m: cnn_widen(m, target[1])))
        stages = [GrowthStage(grow, at_step=grow_step, name=f"grow to {target}")]
        schedule = GrowthSchedule(model, optimizer, stages=stages, probe=probe, lr=lr)
    else:
        schedule = None
    flops = FlopCache()
    dtype = torch.bfloat16 if cuda and lm else None

    def loss_of(m: Any, x: Any, y: Any) -> Any:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = m(x)
        return F.cross_entropy(out.float().flatten(0, -2) if lm else out.float(), y.flatten()
                               if lm else y)

    def evaluate(m: Any) -> float:
        m.eval()
        with torch.no_grad():
            total = sum(float(loss_of(m, x, y)) * len(x) for x, y in val)
        m.train()
        return total / sum(len(x) for x, _ in val)

    eval_every = max(1, steps // args.evals)
    curve: list[dict[str, float]] = []
    tokens = 0
    spent_flops = 0.0
    wall = 0.0
    last_loss: float | None = None
    events: list[dict[str, Any]] = []
    model.train()
    tick = time.perf_counter()
    for step, (x, y) in enumerate(setup["train"]):
        if schedule is not None:
            fired = schedule.maybe_grow(step=step, tokens=tokens, loss=last_loss)
            if fired:
                model = schedule.model
                for event in fired:
                    # the transaction's probe forwards (about 3 per operation), at 1/3 of a step
                    per_probe = flops.train_flops(model, probe) / 3
                    spent_flops += 3 * len(event.operations) * per_probe
                    events.append({"step": event.step, "tokens": event.tokens,
                                   "operations": len(event.operations),
                                   "parameters": [event.parameters_before,
                                                  event.parameters_after],
                                   "seconds": event.seconds})
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr.at(step, None)
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        spent_flops += flops.train_flops(model, x)
        loss = loss_of(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if lm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += setup["tokens_per_batch"]
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            last_loss = float(loss.detach())  # syncs the device: the wall clock below is honest
            wall += time.perf_counter() - tick
            curve.append({"step": step + 1, "tokens": tokens, "flops": spent_flops,
                          "wall_s": wall, "val_loss": evaluate(model)})
            tick = time.perf_counter()
    return {
        "seed": seed, "arm": arm, "val_loss": curve[-1]["val_loss"], "tokens": tokens,
        "flops": spent_flops, "wall_s": wall, "curve": curve, "growth_events": events,
        "params": sum(p.numel() for p in model.parameters()),
        "shape": list(target if events or arm.startswith("static_target") else start),
        "steps": steps,
    }


# --- summary ----------------------------------------------------------------------------------


def per_seed(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparisons of one seed's arms against its static_target."""
    ref = runs["static_target"]
    goal = ref["val_loss"]
    eq = runs["static_target_eqflops"]
    out: dict[str, Any] = {
        "target_val_loss": goal,
        "growth_minus_static_target_eqflops": runs["growth"]["val_loss"] - eq["val_loss"],
        "eqflops_flops_over_growth": eq["flops"] / runs["growth"]["flops"],
        "growth_reached_target_shape": runs["growth"]["params"] == ref["params"],
    }
    for arm in ("growth", "static"):
        r = runs[arm]
        losses = [p["val_loss"] for p in r["curve"]]
        reach = {k: first_reach([p[k] for p in r["curve"]], losses, goal)
                 for k in ("tokens", "flops", "wall_s")}
        share = {k: None if v is None else v / ref[k if k != "wall_s" else "wall_s"]
                 for k, v in reach.items()}
        ref_curve = ref["curve"]
        at_equal = interpolate([p["flops"] for p in ref_curve],
                               [p["val_loss"] for p in ref_curve], r["flops"])
        out[arm] = {
            "tokens_to_target": share["tokens"], "flops_to_target": share["flops"],
            "wall_to_target": share["wall_s"],
            "final_minus_static_target": r["val_loss"] - goal,
            "equal_flops": {"own_final": r["val_loss"], "static_target_at_same_flops": at_equal,
                            "diff": None if at_equal is None else r["val_loss"] - at_equal},
            "flops_share_total": r["flops"] / ref["flops"],
            "wall_share_total": r["wall_s"] / ref["wall_s"],
        }
    return out


def summarise(seeds: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["seed"], r["arm"]): r for r in runs}
    pairs = {s: per_seed({a: by[(s, a)] for a in ARMS}) for s in seeds}
    growth = [pairs[s]["growth"] for s in seeds]
    flops_to = [g["flops_to_target"] for g in growth]
    wall_to = [g["wall_to_target"] for g in growth]
    eq_ci = ci95([pairs[s]["growth_minus_static_target_eqflops"] for s in seeds])
    curve_eq = [g["equal_flops"]["diff"] for g in growth if g["equal_flops"]["diff"] is not None]
    goal = {
        "flops_share_at_most": GOAL_FLOPS_SHARE, "wall_share_at_most": GOAL_WALL_SHARE,
        "flops_every_seed": all(v is not None and v <= GOAL_FLOPS_SHARE for v in flops_to),
        "wall_every_seed": all(v is not None and v <= GOAL_WALL_SHARE for v in wall_to),
        "equal_flops_no_worse": eq_ci["mean"] is not None and eq_ci["mean"] <= 0,
    }
    goal["met"] = all(goal[k] for k in ("flops_every_seed", "wall_every_seed",
                                        "equal_flops_no_worse"))
    return {
        "arms": {a: {"val_loss": ci95([by[(s, a)]["val_loss"] for s in seeds]),
                     "flops": ci95([by[(s, a)]["flops"] for s in seeds]),
                     "wall_s": ci95([by[(s, a)]["wall_s"] for s in seeds]),
                     "params": by[(seeds[0], a)]["params"]} for a in ARMS},
        "paired": {
            f"{a}_minus_static_target_val_loss": ci95(
                [by[(s, a)]["val_loss"] - by[(s, "static_target")]["val_loss"] for s in seeds])
            for a in ("growth", "static_target_eqflops", "static")
        } | {"growth_minus_static_target_eqflops_val_loss": eq_ci,
             "growth_minus_static_target_curve_at_growth_flops": ci95(curve_eq),
             "growth_flops_share_total": ci95([g["flops_share_total"] for g in growth]),
             "growth_wall_share_total": ci95([g["wall_share_total"] for g in growth])},
        "flops_to_target": {str(s): v for s, v in zip(seeds, flops_to, strict=True)},
        "wall_to_target": {str(s): v for s, v in zip(seeds, wall_to, strict=True)},
        "per_seed": {str(s): pairs[s] for s in seeds},
        "goal": goal,
    }


def _task(args: argparse.Namespace, seed: int, arm: str) -> dict[str, Any]:
    return run_arm(args, seed, arm)


def collect(args: argparse.Namespace, seeds: list[int], path: Path) -> list[dict[str, Any]]:
    """Run every (seed, arm), ``--jobs`` at once; each finished run is written to ``path`` at once
    (``"partial": true``), so a run cut short keeps what it finished."""
    tasks = [(s, a) for a in ARMS for s in seeds]
    jobs = max(1, min(args.jobs, len(tasks)))
    if jobs > 1 and not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // jobs)
    runs: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        runs.append(r)
        print(f"seed {r['seed']} {r['arm']:<13} val {r['val_loss']:.4f} FLOPs {r['flops']:.3e} "
              f"wall {r['wall_s']:.1f} s params {r['params']}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "partial": True, "workload": args.workload, "device": args.device, "jobs": jobs,
            "command": "python benchmarks/bench_grow_host.py " + " ".join(sys.argv[1:]),
            "options": vars(args), "runs": runs, "machine": machine(),
        }, indent=2, sort_keys=True) + "\n")

    if jobs == 1:
        for s, a in tasks:
            done(run_arm(args, s, a))
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_task, args, s, a) for s, a in tasks]
            for future in as_completed(futures):
                done(future.result())
    return sorted(runs, key=lambda r: (r["seed"], ARMS.index(r["arm"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--workload", choices=("lm", "cnn"), default="cnn")
    add("--device", default="cpu")
    add("--seeds", type=int, default=5)
    add("--seed", type=int, default=0, help="first seed")
    add("--jobs", type=int, default=1, help="(seed, arm) runs at once, one process each")
    add("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    add("--quick", action="store_true", help="a tiny LM for CPU pilots (1x64 → 3x64, T=64)")
    add("--start", default="2x384", help="LM start shape, layers x width")
    add("--target", default="6x384", help="LM target shape")
    add("--steps", type=int, default=5000, help="LM optimizer steps (budget)")
    add("--batch", type=int, default=64)
    add("--block", type=int, default=256)
    add("--dropout", type=float, default=0.0)
    add("--lr", type=float, default=1e-3)
    add("--warmup", type=int, default=100)
    add("--eval-batches", type=int, default=8, help="LM validation batches per evaluation")
    add("--evals", type=int, default=40, help="evaluations per run")
    add("--cnn-start", type=int, default=8)
    add("--cnn-target", type=int, default=32)
    add("--cnn-steps", type=int, default=800)
    add("--cnn-batch", type=int, default=64)
    add("--cnn-lr", type=float, default=3e-3)
    add("--grow-at", type=float, default=0.25,
        help="growth at this fraction of the budget (default: the recipe chosen on the CNN pilot)")
    add("--after-growth", choices=("keep", "rewarm", "restart"), default="restart",
        help="the learning rate after growth (GrowthLR.after_growth)")
    add("--rewarm-steps", type=int, default=0, help="re-warm-up steps (0: 2 %% of the budget)")
    add("--stack-mode", choices=("whole", "interleave"), default="whole",
        help="G_stack copies: the whole stack appended, or each block followed by its copies")
    add("--note", default=None)
    add("--merge", nargs="+", default=None, metavar="JSON",
        help="summarise the runs of these result files together (seeds run by separate commands)")
    add("--out", default=None, help="results name or path (default grow_host_<workload>)")
    args = parser.parse_args()
    if args.quick:
        args.start, args.target = args.start if args.start != "2x384" else "1x64", (
            args.target if args.target != "6x384" else "3x64")
        args.steps = args.steps if args.steps != 5000 else 300
        args.batch, args.block, args.eval_batches = 16, 64, 4
        args.warmup = min(args.warmup, 20)
    name = args.out or f"grow_host_{args.workload}"
    path = Path(name) if name.endswith(".json") or "/" in name else RESULTS / f"{name}.json"
    started = time.perf_counter()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        seeds = sorted({r["seed"] for r in runs})
        jobs = parts[0]["jobs"]
        args.workload = parts[0]["workload"]
        args.device = parts[0]["device"]
    else:
        seeds = list(range(args.seed, args.seed + args.seeds))
        runs = collect(args, seeds, path)
        jobs = args.jobs
    result = {
        "command": "python benchmarks/bench_grow_host.py " + " ".join(sys.argv[1:]),
        "workload": args.workload, "device": args.device, "jobs": jobs,
        "options": parts[0]["options"] if args.merge else vars(args), "seeds": seeds,
        "total_wall_s": time.perf_counter() - started,
        **summarise(seeds, runs), "runs": runs,
        "machine": parts[0]["machine"] if args.merge else machine(),
    }
    if args.merge:
        result["merged_commands"] = [part["command"] for part in parts]
    if args.note:
        result["note"] = args.note
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for arm, s in result["arms"].items():
        print(f"{arm:<13} val {s['val_loss']['mean']:.4f} ± {s['val_loss']['ci95'] or 0:.4f} "
              f"FLOPs {s['flops']['mean']:.3e} wall {s['wall_s']['mean']:.1f} s")
    print("flops_to_target", result["flops_to_target"])
    print("wall_to_target", result["wall_to_target"])
    eq = result["paired"]["growth_minus_static_target_eqflops_val_loss"]
    print(f"growth - static_target_eqflops (equal FLOPs): {eq['mean']} ± {eq['ci95']}")
    print("goal", result["goal"])
    print(f"→ {path} ({result['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
