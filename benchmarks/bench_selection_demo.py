"""Selection end to end: on the digits demo, how often does the selector pick the blueprint that
turns out best for a slot, compared with uniform random choice?

    python benchmarks/bench_selection_demo.py [--quick] [--seeds N] [--epochs E]
        → benchmarks/results/selection_demo.json

Each seed trains the demo's growth run twice: once choosing with the controller's default
selector, Gaussian Thompson sampling (its statistics carried from one seed to the next, as a
lab's selector would be), once choosing
uniformly at random (ε-greedy with ε = 1). Every seed that reaches probation is measured by its
counterfactual contribution (validation loss without it minus with it). The best blueprint of a
slot is the one with the highest mean contribution over all runs of both arms; a pick is "best"
when it chose that blueprint for that slot. The two arms run in two processes (Thompson's seeds
in order, since its statistics carry over). Per run the final test accuracy is recorded too, so
the two arms' final quality can be compared (paired by seed, mean and 95 % t-interval).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import anyio
import structlog
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write

from esper_async import (
    Blueprint,
    BlueprintCompiler,
    HeuristicController,
    Trainer,
    wrap,
)
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost, evaluate_accuracy
from esper_async.control._controller import ControllerConfig
from esper_async.selection import IntelligentSeedSelector, make_strategy

CANDIDATES = (
    Blueprint("residual_conv", {"kernel_size": 3, "expansion": 2}),
    Blueprint("bottleneck", {"reduction": 2}),
    Blueprint("squeeze_excitation", {"reduction": 4}),
    Blueprint("mlp", {"hidden_mult": 4}),
    Blueprint("low_rank", {"rank": 4}),
    Blueprint("linear_norm"),
)


async def grow(seed: int, selector: IntelligentSeedSelector, epochs: int, compiler) -> list:
    torch.manual_seed(seed)
    data = digits_loaders(seed=seed)
    model = DigitsHost()
    wrap(model, ["conv1", "conv2", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    config = ControllerConfig(horizon_epochs=epochs)
    controller = HeuristicController(config, selector=selector, blueprints=CANDIDATES)
    trainer = Trainer(model, seed=seed, controller=controller, compiler=compiler)
    await trainer.fit(data.train, data.val, epochs=epochs)
    picks = [
        (e.slot, e.reason.rsplit(" chose ", 1)[1])
        for e in trainer.result.events
        if e.target == "germinated"
    ]
    summary = controller.tracker.summary()
    contributions = {
        (slot, bp): s.window_contribution
        for (slot, bp), s in summary.items()
        if s.window_contribution is not None
    }
    return picks, contributions, evaluate_accuracy(model, data.test)


async def _arm(label: str, seeds: list[int], epochs: int) -> list[tuple]:
    live = ControllerConfig().max_live_seeds
    # The selector the controller builds by default (its variances scaled to the rewards).
    thompson = HeuristicController(seed=0).selector
    out = []
    async with BlueprintCompiler() as compiler:
        for seed in seeds:
            selector = thompson if label == "thompson_gaussian" else IntelligentSeedSelector(
                make_strategy("epsilon_greedy", epsilon=1.0, seed=seed), max_live=live
            )
            got, contributions, acc = await grow(seed, selector, epochs, compiler)
            print(f"seed {seed} {label:<18} acc {acc:.4f} picks {got}", flush=True)
            out.append((seed, got, contributions, acc))
    return out


def run_arm(label: str, seeds: list[int], epochs: int) -> list[tuple]:
    """One arm over every seed, in its own process (one torch thread)."""
    torch.set_num_threads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return anyio.run(_arm, label, seeds, epochs)


def _ci95(values: list[float]) -> dict:
    from scipy import stats

    n, mean = len(values), statistics.fmean(values)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": round(mean, 5), "ci95": round(half, 5), "n": n}


def run(args: argparse.Namespace) -> dict:
    seeds = list(range(args.seeds))
    epochs = args.epochs
    names = {bp.id: bp.name for bp in CANDIDATES}
    labels = ("thompson_gaussian", "uniform_random")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = {label: pool.submit(run_arm, label, seeds, epochs) for label in labels}
        results = {label: f.result() for label, f in futures.items()}
    picks: dict[str, list] = {label: [] for label in labels}
    accuracy: dict[str, dict[int, float]] = {label: {} for label in labels}
    measured: dict[tuple[str, str], list[float]] = defaultdict(list)
    for label, rows in results.items():
        for seed, got, contributions, acc in rows:
            picks[label].extend(got)
            accuracy[label][seed] = acc
            for (slot, bp_id), value in contributions.items():
                measured[(slot, names[bp_id])].append(value)
    means = {k: statistics.mean(v) for k, v in measured.items()}
    best = {}
    for (slot, bp), value in means.items():
        if slot not in best or value > means[(slot, best[slot])]:
            best[slot] = bp
    rates = {
        label: round(sum(best.get(slot) == bp for slot, bp in got) / max(1, len(got)), 4)
        for label, got in picks.items()
    }
    # Over the last half of the seeds (Thompson has learnt from the first half by then).
    late = set(seeds[len(seeds) // 2:])
    late_picks = {label: [] for label in labels}
    for label, rows in results.items():
        for seed, got, _c, _a in rows:
            if seed in late:
                late_picks[label].extend(got)
    late_rates = {
        label: round(sum(best.get(slot) == bp for slot, bp in got) / max(1, len(got)), 4)
        for label, got in late_picks.items()
    }
    diff = [accuracy["thompson_gaussian"][s] - accuracy["uniform_random"][s] for s in seeds]
    return {
        "best_pick_rate": rates,
        "best_pick_rate_second_half": late_rates,
        "test_acc": {label: _ci95(list(accuracy[label].values())) for label in labels},
        "test_acc_thompson_minus_random": _ci95(diff),
        "test_acc_per_seed": {label: accuracy[label] for label in labels},
        "best_blueprint_per_slot": best,
        "mean_contribution": {f"{s}/{b}": round(v, 5) for (s, b), v in sorted(means.items())},
        "picks": {label: len(got) for label, got in picks.items()},
        "seeds": len(seeds),
        "epochs": epochs,
        "candidates": [bp.name for bp in CANDIDATES],
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 20 epochs")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = 2, 20
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = run(args)
    path = write("selection_demo", result)
    print(f"best-pick rate {result['best_pick_rate']} → {path}")


if __name__ == "__main__":
    main()
