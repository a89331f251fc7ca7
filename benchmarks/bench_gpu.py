"""The trainer's step against plain PyTorch, at real sizes, in fp32 and bf16.

    python benchmarks/bench_gpu.py [--device cuda|cpu] [--quick] [--precision fp32,bf16]
        → benchmarks/results/gpu.json (CUDA) or gpu_cpu.json (CPU)

Four loops run on copies of one model, alternating block by block in one process (so drift in
the machine's load affects them alike):

* ``plain``: ``zero_grad``, forward, backward, ``step``; no per-step sync (the block ends with one
  ``torch.cuda.synchronize()``);
* ``static``: ``Trainer(grow=False)`` on the unwrapped model;
* ``dormant``: the same with a slot on every candidate layer, all dormant;
* ``seeds``: the same with two seeds in TRAINING.

A block of the plain loop is ``steps`` steps; a block of a trainer is one ``fit(epochs=1)`` over the
same ``steps`` batches, timed from its first step's report to its last (``on_step``), so the epoch
boundary (validation, snapshot) is left out; the plain loop's time per step is measured over the
same ``steps - 1`` intervals. After the timed blocks, each trainer runs ``LAG_BLOCKS`` more with a
loop-lag monitor (a 5 ms heartbeat) beside it; their lateness percentiles are ``loop_lag_ms``. Those
blocks are not timed, so that the heartbeat's wake-ups (each takes the GIL from the thread that
launches the step) cannot slow the timed steps. A fifth loop, ``plain_seeds``, is the plain loop
over a copy of the model with the same two seeds grafted (its optimizer holds their parameters too):
``seeds_over_plain_seeds`` is what the trainer costs beyond the seeds' own compute. A sixth,
``plain_after_step``, is the plain loop over the dormant-slot model with ``Grower.after_step(loss)``
after each step (a user's own loop with growth). On a GPU, ``static_loop`` is ``static`` with
``ReliabilityConfig(launch="loop")`` (lagged steps launched on the event loop's thread), and
``plain_graphed`` the plain loop with its whole step captured as one CUDA graph and replayed. Every
trainer uses its defaults (on a GPU: lagged verdicts, fused Adam; ``--verdict sync|lagged`` forces
one kind); the plain loop uses the same optimizer. Figures: the median seconds per step of each
loop, ``ratio`` = loop / plain, and the GPU's utilisation sampled after each block
(``torch.cuda.utilization``, when pynvml is installed).

Workloads: the demo host (``DigitsHost``, batch 64 of 1×8×8); a CIFAR-shaped ResNet-18 (batch 256 of
synthetic 3×32×32) and the small ResNet (one block a stage, 4.9M parameters, same batch); the GPT of
``esper_async.apps.gpt`` (6 × 384, 64 × 256 tokens). ``--quick`` shrinks batches, models and repeats
so that a CPU run takes a few minutes."""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine

from esper_async import Grower, Trainer, library
from esper_async.apps.demo import DigitsHost
from esper_async.apps.gpt import GPT, GPTConfig
from esper_async.errors import BlueprintError
from esper_async.kernels import export_kernel, load_kernel
from esper_async.runtime import LagStats, LoopLagMonitor
from esper_async.seeds import find_slots, wrap
from esper_async.training._optim import add_module_params
from esper_async.training._task import ClassificationTask, LanguageModelTask

Batch = tuple[torch.Tensor, torch.Tensor]

# --- workloads ---------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3×3 convs, batch norm, identity or 1×1 shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """The CIFAR-10 ResNet-18 (3×3 stem, no max-pool; 11.2M parameters at ``width=64``).
    ``blocks=1``: one basic block a stage, the small ResNet (4.9M parameters at ``width=64``)."""

    def __init__(self, width: int = 64, classes: int = 10, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        c = width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            rest = [BasicBlock(out, out, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(BasicBlock(c, out, stride), *rest))
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def _workloads(quick: bool) -> dict[str, dict[str, Any]]:
    """name → model factory, batch factory, task, candidate slots, example input."""
    gen = torch.Generator().manual_seed(0)
    demo_n = 64
    res_n, res_w = (16, 16) if quick else (256, 64)
    gpt_cfg = (
        GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=64)
        if quick
        else GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
    )
    gpt_n, gpt_t = (8, 64) if quick else (64, 256)

    def resnet(blocks: int) -> dict[str, Any]:  # blocks a stage: 2 is ResNet-18, 1 the small one
        return {
            "model": lambda: ResNet18(res_w, blocks=blocks),
            "task": ClassificationTask(),
            "batch": lambda: (
                torch.randn(res_n, 3, 32, 32, generator=gen),
                torch.randint(0, 10, (res_n,), generator=gen),
            ),
            "slots": ["layer1", "layer2", "layer3", "layer4"],
            "example": torch.zeros(2, 3, 32, 32),
        }

    return {
        "demo": {
            "model": DigitsHost,
            "task": ClassificationTask(),
            "batch": lambda: (
                torch.randn(demo_n, 1, 8, 8, generator=gen),
                torch.randint(0, 10, (demo_n,), generator=gen),
            ),
            "slots": ["conv1", "conv2", "fc1"],
            "example": torch.zeros(2, 1, 8, 8),
        },
        "resnet18": resnet(2),
        "resnet_small": resnet(1),
        "gpt": {
            "model": lambda: GPT(gpt_cfg),
            "task": LanguageModelTask(),
            "batch": lambda: (
                torch.randint(0, 65, (gpt_n, gpt_t), generator=gen),
                torch.randint(0, 65, (gpt_n, gpt_t), generator=gen),
            ),
            "slots": [f"blocks.{i}.mlp" for i in range(gpt_cfg.n_layer)],
            "example": torch.zeros(2, gpt_t, dtype=torch.long),
        },
    }


def _grow_two(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> list[str]:
    """Graft a seed (the first library blueprint that fits) into each of two slots."""
    grown = []
    for name, slot in list(find_slots(model).items())[:2]:
        assert slot.contract is not None
        for bp in library():
            try:
                bp.check_fits(slot.contract)
            except BlueprintError:  # the next one may fit
                continue
            kernel = export_kernel(bp, slot.contract)
            slot.germinate(bp, "bench")
            module = load_kernel(kernel, device=device)
            slot.graft(module, kernel.kernel_id)
            add_module_params(opt, module)
            grown.append(f"{name}:{bp.name}")
            break
    return grown


# --- loops -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda" or None)


#: Heartbeat of the loop-lag monitor (seconds), and how many extra, untimed blocks of each trainer
#: run with it.
LAG_INTERVAL_S = 0.005
LAG_BLOCKS = 3

#: ``--verdict``: how the trainers judge their losses (``None``: the trainer's default).
VERDICT: str | None = None


def _trainer_kwargs(device: torch.device, precision: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "grow": False,
        "device": device,
        "loop_lag_interval_s": None,
        "progress": "off",
    }
    if VERDICT is not None:
        from esper_async.reliability import ReliabilityConfig

        kwargs["reliability"] = ReliabilityConfig(verdict=VERDICT)  # type: ignore[arg-type]
    if "precision" in inspect.signature(Trainer).parameters:
        kwargs["precision"] = precision
    elif precision != "fp32":
        raise SystemExit("this Trainer has no precision option; run with --precision fp32")
    return kwargs


class Plain:
    """The plain loop over ``batches`` (already on the device)."""

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        batches: list[Batch],
        device: torch.device,
        precision: str,
    ) -> None:
        self.model, self.task, self.batches, self.device = model, task, batches, device
        self.opt = _optimizer(model, device)
        self.dtype = torch.bfloat16 if precision == "bf16" else None

    def block(self) -> float:
        self.model.train()
        start = time.perf_counter()
        for i, batch in enumerate(self.batches):
            if i == 1:
                _sync(self.device)
                start = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.dtype is not None
            ):
                _, loss = self.task.forward(self.model, batch)
            loss.backward()
            self.opt.step()
        _sync(self.device)
        return (time.perf_counter() - start) / (len(self.batches) - 1)


class PlainGraphed(Plain):
    """The plain loop with its whole step (forward, backward, fused capturable Adam) captured
    once as a CUDA graph and replayed: what CUDA graphs of the step could save where the host's
    launches bound it. Each step copies its batch into the graph's static inputs first."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=True, capturable=True)
        x, y = self.batches[0]
        self.x, self.y = x.clone(), y.clone()
        self.model.train()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.dtype is not None, cache_enabled=False
        ):
            _, loss = self.task.forward(self.model, (self.x, self.y))
        loss.backward()
        self.opt.step()

    def block(self) -> float:
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.batches):
            if i == 1:
                _sync(self.device)
                start = time.perf_counter()
            self.x.copy_(x, non_blocking=True)
            self.y.copy_(y, non_blocking=True)
            self.graph.replay()
        _sync(self.device)
        return (time.perf_counter() - start) / (len(self.batches) - 1)


class PlainAfterStep(Plain):
    """The plain loop plus ``Grower.after_step(loss)`` after every optimizer step (a user's own
    loop with growth, here with every slot dormant and ``grow=False``: the per-step cost of the
    grower itself)."""

    def block(self) -> float:
        times: list[float] = []

        async def run() -> None:
            async with Grower(self.model, self.opt, task=self.task, grow=False) as grower:
                self.model.train()
                for i, batch in enumerate(self.batches):
                    if i == 1:
                        _sync(self.device)
                        times.append(time.perf_counter())
                    self.opt.zero_grad(set_to_none=True)
                    with torch.autocast(
                        self.device.type, dtype=torch.bfloat16, enabled=self.dtype is not None
                    ):
                        _, loss = self.task.forward(self.model, batch)
                    loss.backward()
                    self.opt.step()
                    grower.after_step(loss)
                _sync(self.device)
                times.append(time.perf_counter())

        anyio.run(run)
        return (times[1] - times[0]) / (len(self.batches) - 1)


class InTrainer:
    """``Trainer.fit(epochs=1)`` over ``batches``, timed between its first and last step."""

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        batches: list[Batch],
        device: torch.device,
        precision: str,
        grow_two: bool,
        **extra: Any,
    ) -> None:
        opt = _optimizer(model, device)
        self.grown = _grow_two(model, opt, device) if grow_two else []
        self.trainer = Trainer(
            model, optimizer=opt, task=task, **{**_trainer_kwargs(device, precision), **extra}
        )
        self.batches, self.val = batches, batches[:1]
        self.lag_s: list[float] = []  # the event loop's lateness over the monitored blocks

    def block(self, *, monitor: bool = False) -> float:
        """One epoch; ``monitor``: with the loop-lag heartbeat beside it (its samples kept)."""
        marks: list[float] = []

        async def fit() -> None:
            async with AsyncExitStack() as stack:
                lag = (
                    await stack.enter_async_context(LoopLagMonitor(interval=LAG_INTERVAL_S))
                    if monitor
                    else None
                )
                await self.trainer.fit(
                    self.batches,
                    self.val,
                    epochs=1,
                    on_step=lambda _s, _l: marks.append(time.perf_counter()),
                )
            if lag is not None:
                self.lag_s.extend(lag.samples)

        anyio.run(fit)
        assert len(marks) == len(self.batches), "a step was dropped or redone"
        return (marks[-1] - marks[0]) / (len(marks) - 1)


def _utilisation(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing: not measured
        return None


def bench_workload(
    name: str, spec: dict[str, Any], device: torch.device, precision: str, steps: int, repeats: int
) -> dict[str, Any]:
    """The four loops on one workload, alternating, ``repeats`` blocks each after a warm-up."""
    torch.manual_seed(0)
    base = spec["model"]()
    batches = [tuple(t.to(device) for t in spec["batch"]()) for _ in range(steps)]

    def wrapped() -> nn.Module:
        model = copy.deepcopy(base)
        wrap(model, spec["slots"], example_input=spec["example"])
        return model.to(device)

    loops: dict[str, Any] = {
        "plain": Plain(copy.deepcopy(base).to(device), spec["task"], batches, device, precision),
        "static": InTrainer(copy.deepcopy(base), spec["task"], batches, device, precision, False),
        "dormant": InTrainer(wrapped(), spec["task"], batches, device, precision, False),
        "seeds": InTrainer(wrapped(), spec["task"], batches, device, precision, True),
    }
    if device.type == "cuda":
        try:
            loops["plain_graphed"] = PlainGraphed(
                copy.deepcopy(base).to(device), spec["task"], batches, device, precision
            )
        except Exception as exc:  # a model that cannot be captured: say so, measure the rest
            print(
                f"{name} {precision}: no CUDA graph ({type(exc).__name__}: {exc})", file=sys.stderr
            )
    if device.type == "cuda":  # the lagged steps launched on the loop's own thread
        from esper_async.reliability import ReliabilityConfig

        launch = ReliabilityConfig(launch="loop", verdict=VERDICT or "auto")  # type: ignore[arg-type]
        loops["static_loop"] = InTrainer(
            copy.deepcopy(base),
            spec["task"],
            batches,
            device,
            precision,
            False,
            reliability=launch,
        )
    seeded = wrapped()
    _grow_two(seeded, _optimizer(seeded, device), device)
    loops["plain_seeds"] = Plain(seeded, spec["task"], batches, device, precision)
    loops["plain_after_step"] = PlainAfterStep(wrapped(), spec["task"], batches, device, precision)
    samples: dict[str, list[float]] = {k: [] for k in loops}
    util: dict[str, list[float]] = {k: [] for k in loops}
    for loop in loops.values():  # warm-up: allocator, cuDNN's choices, autocast caches
        loop.block()
    for _ in range(repeats):
        for key, loop in loops.items():
            samples[key].append(loop.block())
            u = _utilisation(device)
            if u is not None:
                util[key].append(u)
    for loop in loops.values():
        if isinstance(loop, InTrainer):
            for _ in range(LAG_BLOCKS):
                loop.block(monitor=True)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    out: dict[str, Any] = {
        "params": sum(p.numel() for p in base.parameters()),
        "batch": list(batches[0][0].shape),
        "steps_per_block": steps,
        "blocks": repeats,
        "median_ms": {k: round(v * 1e3, 4) for k, v in medians.items()},
        "ratio": {k: round(v / medians["plain"], 4) for k, v in medians.items() if k != "plain"},
        "seeds_over_plain_seeds": round(medians["seeds"] / medians["plain_seeds"], 4),
        "seeds": loops["seeds"].grown,
        "loop_lag_ms": {
            k: _lag(loop.lag_s) for k, loop in loops.items() if isinstance(loop, InTrainer)
        },
    }
    if any(util.values()):
        out["gpu_utilisation_pct"] = {k: statistics.median(v) for k, v in util.items() if v}
    print(
        f"{name} {precision}: {json.dumps(out['median_ms'])} ratio {json.dumps(out['ratio'])} "
        f"seeds/plain_seeds {out['seeds_over_plain_seeds']}",
        file=sys.stderr,
    )
    return out


def _lag(samples: list[float]) -> dict[str, float | int]:
    stats = LagStats.from_seconds(samples)
    return {
        "samples": stats.samples,
        "p50": round(stats.p50_ms, 3),
        "p99": round(stats.p99_ms, 3),
        "max": round(stats.max_ms, 3),
    }


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--workloads", default="demo,resnet_small,resnet18,gpt")
    parser.add_argument(
        "--verdict",
        choices=("auto", "sync", "lagged"),
        default=None,
        help="ReliabilityConfig(verdict=) of the trainers (default: theirs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    parser.add_argument("--steps", type=int, default=None, help="steps a block (default 50)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks (default 11)")
    args = parser.parse_args()
    global VERDICT
    VERDICT = args.verdict
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # steady figures on a shared machine
    steps, repeats = (16, 7) if args.quick else (50, 11)
    steps, repeats = args.steps or steps, args.repeats or repeats
    specs = _workloads(args.quick)
    results: dict[str, Any] = {}
    out = args.out or RESULTS / ("gpu.json" if device.type == "cuda" else "gpu_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine(),
        "device": str(device),
        "quick": args.quick,
        "verdict": args.verdict or "default",
        "loop_lag_interval_s": LAG_INTERVAL_S,
        "command": " ".join(["python", *sys.argv]),
        "commit": _commit(),
        "results": results,
    }
    for name in args.workloads.split(","):
        for precision in args.precision.split(","):
            results[f"{name}/{precision}"] = bench_workload(
                name, specs[name], device, precision, steps, repeats
            )
            # written after every workload, so that a run cut short keeps what it measured
            out.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(out, file=sys.stderr)


if __name__ == "__main__":
    main()
