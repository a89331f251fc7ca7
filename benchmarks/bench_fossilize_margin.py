"""How large a validation-loss gain can noise give a seed? The measurement behind the default
``ControllerConfig.fossilize_margin``.

    python benchmarks/bench_fossilize_margin.py [--quick] [--seeds N] [--out NAME]
        → benchmarks/results/fossilize_margin.json

A seed is kept when its counterfactual gain (validation loss with α = 0 minus with the seed)
exceeds ``fossilize_margin``. The gain is a mean over a finite validation set, so it is noisy even
for a seed whose true effect is nil. For every seed that reaches judgement (growth runs with
``fossilize_margin=0``, so nothing is filtered before it is measured), at the moment it is judged
this records, on the same validation batches the controller used:

* ``gain``: the mean per-example loss difference ``d_i = loss_without_i - loss_with_i``;
* ``se``: its standard error, ``std(d_i) / sqrt(n)``: the spread of the gain the same seed
  would show on another validation draw of the same size, i.e. what a seed that does nothing
  reaches by chance (one-sided: ``2·se`` is passed by such a seed about 2.3 % of the time);
* ``split_half``: ``(gain on one half - gain on the other) / 2``, a second, model-free
  estimate of the same spread (its standard deviation over seeds estimates ``se``).

Two hosts and data sets: the digits demo host (conv, bundled 8×8 digits) and an MLP on a
synthetic 4-class problem (scikit-learn ``make_classification``, 2,000 examples). Both train
with the Trainer's defaults (Adam, lr 3e-3) and the default controller (``horizon_epochs`` set).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.seeds import SeedSlot, SeedState


class MeasuringController(ea.HeuristicController):
    """The default controller, which first measures every seed it is about to judge."""

    def __init__(self, config: ea.ControllerConfig, model: nn.Module, val: Any, seed: int):
        super().__init__(config, seed=seed)
        self.model = model
        self.val = val
        self.judged: list[dict[str, float]] = []

    def decide(
        self, report: Any, history: Sequence[Any], slots: Mapping[str, SeedSlot]
    ) -> list[Any]:
        for name in report.counterfactual:
            life = slots[name].lifecycle
            if life.state is SeedState.PROBATION and (
                life.epochs_in_state >= self.config.probation_epochs
            ):
                self.judged.append(self._measure(slots[name], report.counterfactual[name]))
        return super().decide(report, history, slots)

    @torch.no_grad()
    def _measure(self, slot: SeedSlot, cf: Any) -> dict[str, float]:
        training = self.model.training
        self.model.eval()
        try:
            with_, without = [], []
            for x, y in self.val:
                with_.append(F.cross_entropy(self.model(x), y, reduction="none"))
                with slot.ablated():
                    without.append(F.cross_entropy(self.model(x), y, reduction="none"))
        finally:
            self.model.train(training)
        d = torch.cat(without) - torch.cat(with_)
        n = d.numel()
        half = n // 2
        return {
            "gain": float(d.mean()),
            "controller_gain": cf.loss_gain,
            "se": float(d.std() / math.sqrt(n)),
            "split_half": float((d[:half].mean() - d[half:].mean()) / 2),
            "n": n,
        }


def _mlp_data(seed: int) -> tuple[list[Any], list[Any]]:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=2000, n_features=20, n_informative=8, n_classes=4, random_state=0
    )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(2000, generator=gen)
    xt, yt = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]
    train = [(xt[i : i + 64], yt[i : i + 64]) for i in range(0, 1400, 64)]
    val = [(xt[i : i + 200], yt[i : i + 200]) for i in range(1400, 2000, 200)]
    return train, val


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)
    )


async def _run(workload: str, seed: int, epochs: int) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    if workload == "digits":
        data = digits_loaders(seed=seed)
        train, val = data.train, data.val
        model: nn.Module = DigitsHost()
        ea.wrap(model, ["conv1", "conv2", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    else:
        train, val = _mlp_data(seed)
        model = _mlp()
        ea.wrap(model, ["0", "2"], example_input=torch.zeros(2, 20))
    config = ea.ControllerConfig(fossilize_margin=0.0, horizon_epochs=epochs)
    controller = MeasuringController(config, model, val, seed)
    await ea.Trainer(model, seed=seed, controller=controller).fit(train, val, epochs=epochs)
    return controller.judged


def _summary(judged: list[dict[str, float]]) -> dict[str, Any]:
    if not judged:
        return {"judged": 0}
    se = [j["se"] for j in judged]
    halves = [j["split_half"] for j in judged]
    return {
        "judged": len(judged),
        "se_median": statistics.median(se),
        "se_max": max(se),
        "split_half_sd": statistics.stdev(halves) if len(halves) > 1 else None,
        "gains": sorted(j["gain"] for j in judged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 12 epochs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="fossilize_margin")
    args = parser.parse_args()
    seeds = 2 if args.quick else args.seeds
    epochs = {"digits": 12 if args.quick else 40, "mlp": 12 if args.quick else 30}
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for workload in ("digits", "mlp"):
        judged: list[dict[str, float]] = []
        for seed in range(seeds):
            found = anyio.run(_run, workload, seed, epochs[workload])
            print(f"{workload} seed {seed}: {len(found)} judged", flush=True)
            judged += found
        results[workload] = {"epochs": epochs[workload], **_summary(judged), "seeds": judged}
    noise = max(r.get("se_median", 0.0) for r in results.values())
    out = {
        "machine": machine(),
        "seeds": seeds,
        "wall_s": time.perf_counter() - started,
        "workloads": results,
        "noise_se": noise,
        "two_se": 2 * noise,
    }
    path = write(args.out, out)
    for name, r in results.items():
        print(name, {k: v for k, v in r.items() if k not in ("seeds", "gains")})
    print(f"2·se (the larger median): {2 * noise:.4f} → {path}")


if __name__ == "__main__":
    main()
