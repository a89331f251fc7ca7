"""Cost of telemetry on a real training loop: a span and metrics on every step vs none.

    python benchmarks/bench_telemetry.py [--quick]   → benchmarks/results/telemetry.json

A small conv net trains on scikit-learn's bundled digits (8x8 images, batch 64, Adam) in one
thread. One model and optimizer are stepped by four variants of the loop in turn, in rounds of
``STEPS_PER_ROUND`` steps, the order rotated every round, each step reading its loss with
``.item()`` as a real loop does. Each round is timed by the process's CPU time (the figure of
``overhead_ratio``: it includes the export thread, and other tenants of a shared machine do not
inflate it) and by the wall clock (``overhead_ratio_wall``).

* ``baseline`` and ``baseline_b``: no telemetry (the same loop twice: their ratio,
  ``noise_ratio_aa``, is the noise floor of the measurement on this machine at this time);
* ``every_step``: inside run and epoch spans, an ``esper.step`` span on every step with the loss
  as an attribute, plus ``metrics.step_finished``: the figure of ``overhead_ratio``;
* ``sampled``: the default ``TelemetryConfig`` (a step span every 10th step), metrics every step.

Spans go through the default path: a ``BatchSpanProcessor`` writing the JSON-lines file of a
temporary run directory on its own thread. Medians of per-step time over the rounds; ratios
against the baseline.

On a shared 2-core machine the A/B difference of a 1 % effect is below the noise floor (see
``noise_ratio_aa``), so the benchmark also measures telemetry's own CPU per step directly (the
traced loop's telemetry calls without the training step, the export thread's work included) and
divides by the baseline step: ``overhead_ratio_from_cost``.
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
        """The loop without telemetry; it times its steps as a real loop does."""
        durations = []
        for _ in range(STEPS_PER_ROUND):
            start = time.perf_counter()
            self.train_step()
            durations.append(time.perf_counter() - start)

    def traced_round(self, tel: Telemetry, epoch: int) -> None:
        with tel.span(SPAN_EPOCH, epoch=epoch):
            for _ in range(STEPS_PER_ROUND):
                start = time.perf_counter()
                with tel.step_span(self.step, epoch=epoch) as span:
                    loss = self.train_step()
                    span.set_attribute("esper.loss", loss)
                tel.metrics.step_finished(time.perf_counter() - start)


def per_step_samples(
    fns: dict[str, Callable[[], None]], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Per-step seconds of each variant per round, by clock: ``cpu`` (this process's CPU time,
    the export thread's included) and ``wall``."""
    for fn in fns.values():  # warm-up: allocator, Adam state, first exports
        fn()
    samples: dict[str, dict[str, list[float]]] = {
        "cpu": {n: [] for n in fns},
        "wall": {n: [] for n in fns},
    }
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no fixed slot
            cpu, wall = time.process_time(), time.perf_counter()
            fns[name]()
            samples["cpu"][name].append((time.process_time() - cpu) / STEPS_PER_ROUND)
            samples["wall"][name].append((time.perf_counter() - wall) / STEPS_PER_ROUND)
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, object]:
    """Ratios of medians against the baseline, per-round paired ratios, medians in ms."""
    med = {name: statistics.median(s) for name, s in samples.items()}
    others = ("every_step", "sampled", "baseline_b")
    return {
        "ratio_of_medians": {n: round(med[n] / med["baseline"], 4) for n in others},
        # Same round: less exposed to load drift than the ratio of medians.
        "median_paired_ratio": {
            n: round(
                statistics.median(
                    a / b for a, b in zip(samples[n], samples["baseline"], strict=True)
                ),
                4,
            )
            for n in others
        },
        "median_step_ms": {n: round(v * 1e3, 4) for n, v in med.items()},
        "added_per_step_us": {n: round((med[n] - med["baseline"]) * 1e6, 1) for n in others},
    }


def telemetry_cpu_us_per_step(step_every: int, steps: int) -> tuple[float, int]:
    """CPU time telemetry adds to one step, measured without the step: the traced loop's
    telemetry calls around a constant loss, then a shutdown so that the export thread's work
    (JSON encoding, file writes) is counted too. Far less noisy than an A/B difference."""
    with tempfile.TemporaryDirectory() as tmp:
        config = TelemetryConfig(step_every=step_every, otlp=False)
        start = time.process_time()
        tel = Telemetry.create(run_dir=tmp, config=config)
        with tel.span(SPAN_RUN), tel.span(SPAN_EPOCH, epoch=0):
            for step in range(steps):
                t0 = time.perf_counter()
                with tel.step_span(step, epoch=0) as span:
                    span.set_attribute("esper.loss", 0.5)
                tel.metrics.step_finished(time.perf_counter() - t0)
                if step % 200 == 0:
                    time.sleep(0.002)  # leave the export thread room, as a real step does
        tel.shutdown()
        cost = (time.process_time() - start) / steps * 1e6
        written = sum(r.name == "esper.step" for r in read_span_records(tmp))
        return cost, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, seconds not minutes")
    args = parser.parse_args()
    rounds = 10 if args.quick else 60
    torch.set_num_threads(1)
    batches = digits_batches()
    loop = Loop(batches)  # one model for every variant: only the telemetry differs

    with tempfile.TemporaryDirectory() as tmp:
        every_dir, sampled_dir = Path(tmp, "every"), Path(tmp, "sampled")
        every = Telemetry.create(
            run_dir=every_dir, config=TelemetryConfig(step_every=1, otlp=False)
        )
        sampled = Telemetry.create(run_dir=sampled_dir, config=TelemetryConfig(otlp=False))
        epochs = {"every_step": 0, "sampled": 0}

        def traced(name: str, tel: Telemetry) -> Callable[[], None]:
            def run() -> None:
                loop.traced_round(tel, epochs[name])
                epochs[name] += 1

            return run

        with every, sampled, every.span(SPAN_RUN), sampled.span(SPAN_RUN):
            samples = per_step_samples(
                {
                    "baseline": loop.plain_round,
                    "baseline_b": loop.plain_round,
                    "every_step": traced("every_step", every),
                    "sampled": traced("sampled", sampled),
                },
                rounds,
            )
        step_spans = sum(r.name == "esper.step" for r in read_span_records(every_dir))
        sampled_spans = sum(r.name == "esper.step" for r in read_span_records(sampled_dir))

    cpu, wall = summarize(samples["cpu"]), summarize(samples["wall"])
    n = 2_000 if args.quick else 20_000
    costs = {
        "every_step": telemetry_cpu_us_per_step(1, n),
        "sampled": telemetry_cpu_us_per_step(10, n),
    }
    cost_us = {k: v[0] for k, v in costs.items()}
    base_us = cpu["median_step_ms"]["baseline"] * 1e3  # type: ignore[index]
    ratio = cpu["ratio_of_medians"]["every_step"]  # type: ignore[index]
    result = {
        "overhead_ratio": ratio,
        "overhead_ratio_sampled": cpu["ratio_of_medians"]["sampled"],  # type: ignore[index]
        "noise_ratio_aa": cpu["ratio_of_medians"]["baseline_b"],  # type: ignore[index]
        "overhead_ratio_wall": wall["ratio_of_medians"]["every_step"],  # type: ignore[index]
        "noise_ratio_aa_wall": wall["ratio_of_medians"]["baseline_b"],  # type: ignore[index]
        "clock": "process CPU time (time.process_time, export thread included); wall in 'wall'",
        "cpu": cpu,
        "wall": wall,
        "goal": GOAL,
        # Telemetry's own CPU per step (export included) over the baseline step's CPU time.
        "telemetry_cpu_us_per_step": {k: round(v, 1) for k, v in cost_us.items()},
        "overhead_ratio_from_cost": {k: round(1 + v / base_us, 4) for k, v in cost_us.items()},
        "cost_run": {"steps": n, "step_spans_written": {k: v[1] for k, v in costs.items()}},
        "step_spans_exported": {"every_step": step_spans, "sampled": sampled_spans},
        "model": "conv 1-16-32 + MLP 512-64-10 on sklearn digits, Adam, batch 64, 1 torch thread",
        "steps_per_round": STEPS_PER_ROUND,
        "rounds": rounds,
        "exporter": "BatchSpanProcessor -> JSON-lines file",
        "machine": machine(),
    }
    path = write("telemetry", result)
    print(
        f"overhead_ratio {ratio:.4f} (CPU time, span + metrics every step; goal < {GOAL}), "
        f"sampled {result['overhead_ratio_sampled']:.4f}, A/A {result['noise_ratio_aa']:.4f}; "
        f"wall {result['overhead_ratio_wall']:.4f}, wall A/A {result['noise_ratio_aa_wall']:.4f}; "
        f"step ms {cpu['median_step_ms']}; "
        f"telemetry CPU per step {result['telemetry_cpu_us_per_step']} µs, "
        f"ratio from cost {result['overhead_ratio_from_cost']} → {path}"
    )


if __name__ == "__main__":
    main()
