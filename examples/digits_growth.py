"""Grow the impaired digits host and compare it with the same host trained statically.

    python examples/digits_growth.py --epochs 40 --seed 0

The same as ``esper-async demo``, written out with the public API so it can be copied.
"""

from __future__ import annotations

import argparse

import anyio
import torch

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost, evaluate_accuracy


async def train(grow: bool, epochs: int, seed: int) -> tuple[float, int, ea.FitResult]:
    torch.manual_seed(seed)
    data = digits_loaders(seed=seed)
    model = DigitsHost()
    if grow:
        ea.wrap(model, ["conv1", "conv2", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    trainer = ea.Trainer(model, grow=grow, seed=seed)
    fit = await trainer.fit(data.train, data.val, epochs=epochs)
    return evaluate_accuracy(model, data.test), trainer.param_count(), fit


async def main(epochs: int, seed: int) -> None:
    static_acc, static_params, _ = await train(False, epochs, seed)
    grown_acc, grown_params, fit = await train(True, epochs, seed)
    print(f"static: test acc {static_acc:.4f}, {static_params} parameters")
    print(
        f"growth: test acc {grown_acc:.4f}, {grown_params} parameters, "
        f"{fit.count(ea.SeedState.FOSSILIZED)} fossilized, {fit.count(ea.SeedState.CULLED)} culled"
    )
    for event in fit.events:
        move = f"{event.source} -> {event.target}"
        print(f"  epoch {event.epoch:>3} {event.slot:<6} {move}: {event.reason}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    anyio.run(main, args.epochs, args.seed)
