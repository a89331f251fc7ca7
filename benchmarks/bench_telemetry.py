"""Cost of telemetry on a real training loop: a span and metrics on every step vs none.

    python benchmarks/bench_telemetry.py [--quick]   → benchmarks/results/telemetry.json

A small conv net trains on scikit-learn's bundled digits (8x8 images, batch 64, Adam) in one
thread. Three loops run in turn in the same process, in rounds of ``STEPS_PER_ROUND`` steps
(A, B, C, A, B, C, ...), each step reading its loss with ``.item()`` as a real loop does:

* ``baseline``: no telemetry;
* ``every_step``: inside run and epoch spans, an ``esper.step`` span on every step with the loss
  as an attribute, plus ``metrics.step_finished``: the figure of ``overhead_ratio``;
* ``sampled``: the default ``TelemetryConfig`` (a step span every 10th step), metrics every step.

Spans go through the default path: a ``BatchSpanProcessor`` writing the JSON-lines file of a
temporary run directory on its own thread. Medians of per-step time over the rounds; ratios
against the baseline. Also the bare cost of one span (start, attributes, end) in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write

from esper_async.telemetry import (
    SPAN_EPOCH,
    SPAN_RUN,
    Telemetry,
    TelemetryConfig,
    read_span_records,
)

#: Steps timed together; long enough that the clock's resolution does not matter.
STEPS_PER_ROUND = 50
BATCH = 64
GOAL = 1.01


def digits_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x) - BATCH + 1, BATCH)]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class Loop:
    """One model and optimizer, stepped ``STEPS_PER_ROUND`` steps per call."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        torch.manual_seed(0)
        self.model = make_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.batches = batches
        self.step = 0

    def train_step(self) -> float:
        x, y = self.batches[self.step % len(self.batches)]
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def plain_round(self) -> None:
        for _ in range(STEPS_PER_ROUND):
            self.train_step()

    def traced_round(self, tel: Telemetry, epoch: int) -> None:
        with tel.span(SPAN_EPOCH, epoch=epoch):
            for _ in range(STEPS_PER_ROUND):
                start = time.perf_counter()
                with tel.step_span(self.step, epoch=epoch) as span:
                    loss = self.train_step()
                    span.set_attribute("esper.loss", loss)
                tel.metrics.step_finished(time.perf_counter() - start)


def per_step_medians(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up: allocator, Adam state, first exports
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) / STEPS_PER_ROUND)
    return {name: statistics.median(s) for name, s in samples.items()}


def bare_span_us(tel: Telemetry, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        with tel.span("esper.bench", step=i, slot="l1"):
            pass
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, seconds not minutes")
    args = parser.parse_args()
    rounds = 10 if args.quick else 60
    torch.set_num_threads(1)
    batches = digits_batches()
    loops = {name: Loop(batches) for name in ("baseline", "every_step", "sampled")}

    with tempfile.TemporaryDirectory() as tmp:
        every_dir, sampled_dir = Path(tmp, "every"), Path(tmp, "sampled")
        every = Telemetry.create(
            run_dir=every_dir, config=TelemetryConfig(step_every=1, otlp=False)
        )
        sampled = Telemetry.create(run_dir=sampled_dir, config=TelemetryConfig(otlp=False))
        epochs = {"every_step": 0, "sampled": 0}

        def traced(name: str, tel: Telemetry) -> Callable[[], None]:
            def run() -> None:
                loops[name].traced_round(tel, epochs[name])
                epochs[name] += 1

            return run

        with every, sampled, every.span(SPAN_RUN), sampled.span(SPAN_RUN):
            medians = per_step_medians(
                {
                    "baseline": loops["baseline"].plain_round,
                    "every_step": traced("every_step", every),
                    "sampled": traced("sampled", sampled),
                },
                rounds,
            )
            span_us = bare_span_us(every, 2_000 if args.quick else 20_000)
        step_spans = sum(r.name == "esper.step" for r in read_span_records(every_dir))
        sampled_spans = sum(r.name == "esper.step" for r in read_span_records(sampled_dir))

    ratio = medians["every_step"] / medians["baseline"]
    result = {
        "overhead_ratio": round(ratio, 4),
        "overhead_ratio_sampled": round(medians["sampled"] / medians["baseline"], 4),
        "goal": GOAL,
        "median_step_ms": {k: round(v * 1e3, 4) for k, v in medians.items()},
        "bare_span_us": round(span_us, 2),
        "step_spans_exported": {"every_step": step_spans, "sampled": sampled_spans},
        "model": "conv 1-16-32 + MLP 512-64-10 on sklearn digits, Adam, batch 64, 1 torch thread",
        "steps_per_round": STEPS_PER_ROUND,
        "rounds": rounds,
        "exporter": "BatchSpanProcessor -> JSON-lines file",
        "machine": machine(),
    }
    path = write("telemetry", result)
    print(
        f"overhead_ratio {ratio:.4f} (span + metrics every step; goal < {GOAL}), "
        f"sampled {result['overhead_ratio_sampled']:.4f}, step {result['median_step_ms']}, "
        f"bare span {span_us:.1f} µs → {path}"
    )


if __name__ == "__main__":
    main()
