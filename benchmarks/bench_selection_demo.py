"""Selection end to end: on the digits demo, how often does the selector pick the blueprint that
turns out best for a slot, compared with uniform random choice?

    python benchmarks/bench_selection_demo.py [--quick] → benchmarks/results/selection_demo.json

Each seed trains the demo's growth run twice: once choosing with the controller's default
selector, Gaussian Thompson sampling (its statistics carried from one seed to the next, as a
lab's selector would be), once choosing
uniformly at random (ε-greedy with ε = 1). Every seed that reaches probation is measured by its
counterfactual contribution (validation loss without it minus with it). The best blueprint of a
slot is the one with the highest mean contribution over all runs of both arms; a pick is "best"
when it chose that blueprint for that slot.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections import defaultdict
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
from esper_async.apps.demo import DigitsHost
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
    config = ControllerConfig()
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
    return picks, contributions


async def run(args: argparse.Namespace) -> dict:
    seeds = range(2 if args.quick else 6)
    epochs = 20 if args.quick else 40
    names = {bp.id: bp.name for bp in CANDIDATES}
    live = ControllerConfig().max_live_seeds
    # The selector the controller builds by default (its variances scaled to the rewards).
    thompson = HeuristicController(seed=0).selector
    picks: dict[str, list] = {"thompson_gaussian": [], "uniform_random": []}
    measured: dict[tuple[str, str], list[float]] = defaultdict(list)
    async with BlueprintCompiler() as compiler:
        for seed in seeds:
            random = IntelligentSeedSelector(
                make_strategy("epsilon_greedy", epsilon=1.0, seed=seed), max_live=live
            )
            for label, selector in (("thompson_gaussian", thompson), ("uniform_random", random)):
                got, contributions = await grow(seed, selector, epochs, compiler)
                picks[label].extend(got)
                for (slot, bp_id), value in contributions.items():
                    measured[(slot, names[bp_id])].append(value)
                print(f"seed {seed} {label:<18} picks {got}", flush=True)
    means = {k: statistics.mean(v) for k, v in measured.items()}
    best = {}
    for (slot, bp), value in means.items():
        if slot not in best or value > means[(slot, best[slot])]:
            best[slot] = bp
    rates = {
        label: round(sum(best.get(slot) == bp for slot, bp in got) / max(1, len(got)), 4)
        for label, got in picks.items()
    }
    return {
        "best_pick_rate": rates,
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
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = anyio.run(run, args)
    path = write("selection_demo", result)
    print(f"best-pick rate {result['best_pick_rate']} → {path}")


if __name__ == "__main__":
    main()
