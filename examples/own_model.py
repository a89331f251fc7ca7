"""Train a model of your own with the Trainer, into a run directory you can look at afterwards.

    python examples/own_model.py --epochs 8 --run-dir runs/own
    esper-async trace runs/own --html          # writes runs/own/trace.html, the growth dashboard

The model is any ``nn.Module``; :func:`esper_async.wrap` puts a seed slot after each layer named.
``run_dir=`` makes every ``fit`` write its trace there, ``store=`` keeps compiled kernels for the
next run (a second run with the same seed compiles nothing), and ``loggers=`` get each epoch's
figures: here a CSV file, written by a logger of a few lines (TensorBoard: ``TensorBoardLogger``).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping
from pathlib import Path

import anyio
import torch
from torch import nn

import esper_async as ea
from esper_async.apps.data import digits_loaders


class CsvLogger:
    """An experiment logger (the ``MetricLogger`` protocol): one CSV row per epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.rows.append({"step": step, **scalars})

    def close(self) -> None:
        names = sorted({name for row in self.rows for name in row})
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(self.rows)


async def train(
    epochs: int, run_dir: Path, seed: int = 0, limit: int | None = None
) -> ea.FitResult:
    """Train and grow a small MLP on the digits, writing ``run_dir``; returns the record."""
    torch.manual_seed(seed)
    data = digits_loaders(seed=seed, limit=limit)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    ea.wrap(model, ["1"], example_input=torch.zeros(2, 1, 8, 8))  # a slot after Linear(64, 32)
    trainer = ea.Trainer(
        model,
        seed=seed,
        controller=ea.HeuristicController(ea.ControllerConfig.eager(), seed=seed),
        run_dir=run_dir,
        store=run_dir / "kernels",
        loggers=[CsvLogger(run_dir / "epochs.csv")],
    )
    return await trainer.fit(data.train, data.val, epochs=epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/own"))
    args = parser.parse_args()
    result = anyio.run(train, args.epochs, args.run_dir, args.seed)
    last = result.history[-1]
    print(f"val loss {last.val_loss:.4f}, accuracy {last.metrics['accuracy']:.4f}, "
          f"{len(result.events)} lifecycle events; see {args.run_dir}/epochs.csv and "
          f"`esper-async trace {args.run_dir} --html`")


if __name__ == "__main__":
    main()
