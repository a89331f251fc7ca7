"""Helpers shared by the benchmarks: machine description, timing, JSON output."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def interleaved_medians(
    fns: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each function, timing them in turn (A, B, A, B, ...) so that
    drift in machine load affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def write(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def ci95(values: list[float]) -> dict[str, float | int | None]:
    """Mean and 95 % t-interval half-width over ``values`` (seeds): ``ci95`` is ``None`` with
    fewer than 2 values, ``mean`` is ``None`` with none."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci95": half, "n": n}


def controller_options(pairs: list[str], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--controller key=value`` options of :class:`~esper_async.control.ControllerConfig`, each
    parsed by the type of the option's default (booleans as ``true``/``false``/``1``/``0``; options
    whose default is ``None`` cannot be set this way), on top of ``defaults``.

    :raises SystemExit: for an unknown key, an empty value or a boolean that is not one.
    """
    from esper_async.control import ControllerConfig

    types = {name: type(value) for name, value in vars(ControllerConfig()).items()
             if value is not None}
    options: dict[str, Any] = dict(defaults or {})
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types or not value:
            raise SystemExit(
                f"--controller {pair!r}: expected key=value, key one of {sorted(types)}"
            )
        if types[key] is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--controller {pair!r}: expected true or false")
            options[key] = value.lower() in ("true", "1")
        else:
            options[key] = types[key](value)
    return options
