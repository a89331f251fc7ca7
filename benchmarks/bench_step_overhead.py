"""Diagnostic: where the trainer's per-step overhead on a GPU goes (variants of the lagged step).

    python benchmarks/bench_step_overhead.py   → benchmarks/results/step_overhead_cuda.json

For each workload of :mod:`bench_gpu` (ResNet-18 and the GPT in bf16, the demo host and ResNet-18
in fp32; 50 steps a block, 5 timed blocks after one warm-up, alternating in one process), the
plain loop against ``Trainer(grow=False)`` in these variants:

* ``default``: the trainer as shipped (lagged verdicts, lag 1, the host-function bridge);
* ``lag2``, ``lag3``: ``ReliabilityConfig(verdict_lag=2 | 3)``;
* ``event_thread``, ``query_poll``: the other completion bridges;
* ``inline``, ``inline_lag2``: the step launched on the event loop's own thread, not a worker
  thread (this blocks the loop for the launch: a loop-lag cost this script does not measure);
* ``sync``: the synchronous verdict; ``dormant``: every candidate layer a dormant slot.

It also reports the host time of one step's launch: the plain loop's (synchronised after each
step) and the trainer's step function's, per variant. The variants reach into private attributes
(``Trainer._steps``); this is a measurement, not a supported configuration. Needs CUDA.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import anyio
import bench_gpu as B
import torch
from _common import RESULTS, machine

from esper_async import Trainer
from esper_async.reliability import ReliabilityConfig
from esper_async.runtime._execution import StepRunner

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {}, "lag2": {"lag": 2}, "lag3": {"lag": 3},
    "event_thread": {"bridge": "event_thread"}, "query_poll": {"bridge": "query_poll"},
    "inline": {"inline": True}, "inline_lag2": {"inline": True, "lag": 2},
    "sync": {"verdict": "sync"}, "dormant": {"wrapped": True},
}


def make_trainer(base: torch.nn.Module, spec: dict[str, Any], dev: torch.device, precision: str,
                 lag: int = 1, verdict: str = "auto", bridge: str | None = None,
                 inline: bool = False, wrapped: bool = False) -> tuple[Trainer, list[float]]:
    """A trainer in one variant, and the list its step function's host times go to."""
    model = copy.deepcopy(base)
    if wrapped:
        B.wrap(model, spec["slots"], example_input=spec["example"])
    model = model.to(dev)
    t = Trainer(model, optimizer=B._optimizer(model, dev), task=spec["task"], grow=False,
                device=dev, loop_lag_interval_s=None, precision=precision,  # type: ignore[arg-type]
                reliability=ReliabilityConfig(verdict=verdict, verdict_lag=lag))  # type: ignore[arg-type]
    if bridge:
        t._steps = StepRunner.for_device(dev, bridge=bridge)
    if inline:
        runner: Any = t._steps

        async def launch(fn: Any, *args: Any) -> Any:
            armed: list[Any] = []
            result = runner._launch(fn, args, armed)
            return result, armed[0]

        runner.launch = launch
    inner: list[float] = []
    name = "_step"  # one step for both verdict policies
    step = getattr(t, name)

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return step(*args)
        finally:
            inner.append(time.perf_counter() - start)

    setattr(t, name, timed)
    return t, inner


def block(t: Trainer, batches: list[Any]) -> float:
    marks: list[float] = []
    anyio.run(lambda: t.fit(batches, batches[:1], epochs=1,
                            on_step=lambda _s, _l: marks.append(time.perf_counter())))
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def main() -> None:
    dev = torch.device("cuda")
    specs = B._workloads(False)
    out: dict[str, Any] = {"machine": machine(), "results": {}}
    path = RESULTS / "step_overhead_cuda.json"
    for wl, precision in (("resnet18", "bf16"), ("gpt", "bf16"), ("demo", "fp32"),
                          ("resnet18", "fp32")):
        spec = specs[wl]
        torch.manual_seed(0)
        base = spec["model"]()
        batches = [tuple(x.to(dev) for x in spec["batch"]()) for _ in range(50)]
        plain = B.Plain(copy.deepcopy(base).to(dev), spec["task"], batches, dev, precision)
        loops: dict[str, tuple[Any, list[float] | None]] = {"plain": (plain, None)}
        for key, kwargs in VARIANTS.items():
            loops[key] = make_trainer(base, spec, dev, precision, **kwargs)
        samples: dict[str, list[float]] = {k: [] for k in loops}
        for rep in range(6):
            for key, (loop, inner) in loops.items():
                if inner is not None:
                    inner.clear()
                seconds = loop.block() if key == "plain" else block(loop, batches)
                if rep:  # the first is a warm-up
                    samples[key].append(seconds)
        launch = []
        for b in batches[:20]:
            start = time.perf_counter()
            plain.opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, loss = spec["task"].forward(plain.model, b)
            loss.backward()
            plain.opt.step()
            launch.append(time.perf_counter() - start)
            B._sync(dev)
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        res = {"median_ms": {k: round(v, 3) for k, v in med.items()},
               "ratio": {k: round(v / med["plain"], 3) for k, v in med.items()},
               "plain_launch_cpu_ms": round(statistics.median(launch) * 1e3, 3),
               "inner_launch_cpu_ms": {k: round(statistics.median(inner) * 1e3, 3)
                                       for k, (_, inner) in loops.items() if inner}}
        out["results"][f"{wl}/{precision}"] = res
        print(wl, precision, json.dumps(res), flush=True)
        path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench_step_overhead.py needs CUDA")
    main()
