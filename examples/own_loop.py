"""Grow the digits host from a hand-written PyTorch loop, with :class:`esper_async.Grower`.

    python examples/own_loop.py --epochs 12

The loop is plain PyTorch: zero the gradients, forward, loss, backward, optimizer step. The grower
is told after every step (``after_step``) and at the end of every epoch (``end_epoch``), where it
measures the model on the validation set, asks the controller, and grafts or culls seeds. Seeds'
parameters join (and leave) the optimizer's parameter groups as they are grafted (and culled).
"""

from __future__ import annotations

import argparse

import anyio
import torch
from torch import nn

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost


async def train(epochs: int, seed: int = 0, limit: int | None = None) -> ea.FitResult:
    """Train and grow the digits host for ``epochs`` epochs; returns the grower's record."""
    torch.manual_seed(seed)
    data = digits_loaders(seed=seed, limit=limit)
    model = DigitsHost()
    ea.wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    controller = ea.HeuristicController(ea.ControllerConfig.eager(), seed=seed)
    async with ea.Grower(model, optimizer, controller=controller, seed=seed) as grower:
        for _ in range(epochs):
            model.train()
            for x, y in data.train:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                grower.after_step(loss.item())
            await grower.end_epoch(data.val)
    return grower.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = anyio.run(train, args.epochs, args.seed)
    for report in result.history:
        print(f"epoch {report.epoch:>3}  val loss {report.val_loss:.4f}  "
              f"accuracy {report.metrics['accuracy']:.3f}")
    for event in result.events:
        print(f"  epoch {event.epoch} step {event.step}: {event.slot} "
              f"{event.source} -> {event.target} ({event.reason})")


if __name__ == "__main__":
    main()
