"""Grow a narrow GPT on bundled Shakespeare and compare it with the same host trained statically.

    python examples/shakespeare_growth.py --epochs 10 --steps 100 --seed 0

``esper-async demo --task shakespeare`` in a few lines of the public API (it also trains the
``static_final`` arm and counts FLOPs; see ``esper_async/apps/lm_demo.py``).
"""

from __future__ import annotations

import argparse
import math

import anyio
import torch

import esper_async as ea
from esper_async.apps.gpt import GPT, GPTConfig
from esper_async.apps.shakespeare import load_shakespeare

T, B = 64, 32


async def train(grow: bool, epochs: int, steps: int, seed: int) -> tuple[GPT, ea.FitResult]:
    data = load_shakespeare()
    torch.manual_seed(seed)
    model = GPT(GPTConfig.narrow(data.vocab.size))
    if grow:  # token slots on each block's MLP output and on each block's output
        slots = [f"blocks.{i}.{m}" for i in range(2) for m in ("mlp.proj", "out")]
        ea.wrap(model, slots, example_input=torch.zeros(2, T, dtype=torch.long))
    trainer = ea.Trainer(
        model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        task=ea.LanguageModelTask(),
        grow=grow,
        seed=seed,
        controller=ea.HeuristicController(ea.ControllerConfig.eager(), seed=seed),
    )
    fit = await trainer.fit(
        data.train_batches(batch_size=B, block_size=T, batches_per_epoch=steps, seed=seed),
        data.eval_batches("val", batch_size=B, block_size=T, max_batches=8),
        epochs=epochs,
        settle="judge",
    )
    return model, fit


async def main(epochs: int, steps: int, seed: int) -> None:
    _, static = await train(False, epochs, steps, seed)
    grown, fit = await train(True, epochs, steps, seed)
    for label, run in (("static", static), ("growth", fit)):
        loss = run.history[-1].val_loss
        print(f"{label}: val loss {loss:.4f} ({loss / math.log(2):.3f} bits/char)")
    for event in fit.events:
        print(f"  epoch {event.epoch} {event.slot} {event.source} -> {event.target}")
    vocab = load_shakespeare().vocab
    ids = grown.generate(vocab.encode("\n").view(1, -1), 200,
                         generator=torch.Generator().manual_seed(seed))
    print(vocab.decode(ids[0, 1:]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    anyio.run(main, args.epochs, args.steps, args.seed)
