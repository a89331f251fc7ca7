"""Cost of dormant seed slots: forward+backward of a wrapped host vs the same host unwrapped.

    python benchmarks/bench_dormant.py [--quick]   → benchmarks/results/dormant.json

Two hosts: a small CIFAR-sized conv net (every Conv2d and Linear wrapped) at batch 32, where the
figure of interest is ``overhead_ratio``, and the demo's tiny digits host, where a step is so short
that the fixed Python cost of a slot shows (``overhead_ratio_digits_host``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import interleaved_medians, machine, write

from esper_async import wrap
from esper_async.apps.demo import DigitsHost


def conv_host() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def ratio(host: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, dict[str, float], int]:
    plain = host
    wrapped = copy.deepcopy(host)
    slots = wrap(wrapped, [nn.Conv2d, nn.Linear], example_input=x)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    times = interleaved_medians(
        {"unwrapped": lambda: step(plain), "wrapped": lambda: step(wrapped)}, repeats=repeats
    )
    return times["wrapped"] / times["unwrapped"], times, len(slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, seconds not minutes")
    args = parser.parse_args()
    repeats = 20 if args.quick else 200
    torch.manual_seed(0)
    conv_ratio, conv_times, conv_slots = ratio(conv_host(), torch.randn(32, 3, 32, 32), repeats)
    digits_ratio, digits_times, digits_slots = ratio(
        DigitsHost(), torch.randn(64, 1, 8, 8), repeats * 5
    )
    result = {
        "overhead_ratio": round(conv_ratio, 4),
        "goal": 1.02,
        "conv_host": {
            "slots": conv_slots,
            "batch": 32,
            "input": [3, 32, 32],
            "median_ms": {k: round(v * 1e3, 4) for k, v in conv_times.items()},
        },
        "overhead_ratio_digits_host": round(digits_ratio, 4),
        "digits_host": {
            "slots": digits_slots,
            "batch": 64,
            "input": [1, 8, 8],
            "median_ms": {k: round(v * 1e3, 4) for k, v in digits_times.items()},
        },
        "repeats": repeats,
        "machine": machine(),
    }
    path = write("dormant", result)
    print(
        f"overhead_ratio {conv_ratio:.4f} (conv host, {conv_slots} slots), "
        f"digits host {digits_ratio:.4f} → {path}"
    )


if __name__ == "__main__":
    main()
