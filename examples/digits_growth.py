"""Grow the impaired digits host and compare it with the same host trained statically, and with
the architecture growth ended with trained from scratch (``static_final``).

    python examples/digits_growth.py --epochs 40 --seed 0

The three runs of ``esper-async demo``, written out with the public API so they can be copied:
the same host, data split and order, recipe, slots and controller, from the same seed. With
``--epochs 40 --seed 0`` both end at the same figures (measured: static 0.9111 test accuracy,
798 parameters; growth 0.9611, 2246; static_final 0.9611, 1946). The demo reuses kernels from
its store across runs; run it with ``--no-store`` to compare like with like.
"""

from __future__ import annotations

import argparse

import anyio
import torch

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost, evaluate_accuracy
from esper_async.apps.static_final import fossils_of, graft_fossils

SLOTS = ["conv1", "conv2", "fc1"]


async def train(
    grow: bool, epochs: int, seed: int, fossils: tuple[tuple[str, str], ...] = ()
) -> tuple[float, int, ea.FitResult, tuple[tuple[str, str], ...]]:
    """One run: ``grow`` with seeds, or static (with ``fossils``: growth's fossilized seeds,
    built fresh and part of the host from step 0)."""
    torch.manual_seed(seed)
    data = digits_loaders(seed=seed)
    model = DigitsHost()
    if grow or fossils:
        ea.wrap(model, SLOTS, example_input=torch.zeros(2, 1, 8, 8))
        graft_fossils(model, fossils, seed=seed)
    trainer = ea.Trainer(model, grow=grow, seed=seed)
    fit = await trainer.fit(data.train, data.val, epochs=epochs)
    acc = evaluate_accuracy(model, data.test)
    return acc, trainer.param_count(), fit, fossils_of(trainer.slots)


async def main(epochs: int, seed: int) -> None:
    static_acc, static_params, _, _ = await train(False, epochs, seed)
    grown_acc, grown_params, fit, fossils = await train(True, epochs, seed)
    final_acc, final_params, _, _ = await train(False, epochs, seed, fossils)
    print(f"static:       test acc {static_acc:.4f}, {static_params} parameters")
    print(
        f"growth:       test acc {grown_acc:.4f}, {grown_params} parameters, "
        f"{fit.count(ea.SeedState.FOSSILIZED)} fossilized, {fit.count(ea.SeedState.CULLED)} culled"
    )
    print(f"static_final: test acc {final_acc:.4f}, {final_params} parameters")
    for event in fit.events:
        move = f"{event.source} -> {event.target}"
        print(f"  epoch {event.epoch:>3} {event.slot:<6} {move}: {event.reason}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    anyio.run(main, args.epochs, args.seed)
