"""Benchmark: latency of each surgery operation, validation included, and of rollback.

Model: a ResNet-18 built here (BasicBlock x[2, 2, 2, 2], 64-512 channels, 11.7 M parameters; no
torchvision) with an Adam optimizer that has taken one step (so moments exist and are carried). Each
sample is one whole transaction: snapshot, the operation, its validation (the changed region on the
probe batch: shapes, function preservation, gradient reachability) and the commit checks (optimizer
coverage, budget). The change is then undone outside the timed region, so every sample starts from
the same model. Rollback is timed separately: a transaction whose block raises after staging a
widening; the baseline it is compared with is the naive snapshot (``copy.deepcopy`` of the model and
of the optimizer's state dict) that the journal avoids. ``floor`` gives, per operation, the work no
implementation of it can skip (the probe forward up to its region, writing the tensors it creates),
timed on its own: the distance from an operation's p50 to its floor is what surgery itself adds.

Host growth (``--host``, or ``--host-only``): each host-growth operator (depth stacking, identity
blocks, residual-width expansion) timed the same way, validation included, on nanoGPT's 6 x 384
Shakespeare GPT (``GPTConfig.reference``, AdamW after one step, probe of 2 x 64 tokens) on
``--device``; the target is 100 ms per operator on the GPU.

Usage: ``python benchmarks/bench_surgery.py [--quick] [--threads N] [--out PATH]``
GPU (host growth): ``python benchmarks/bench_surgery.py --host-only --device cuda
--out benchmarks/results/surgery_host_gpu.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import torch
from torch import nn

from esper_async.apps.gpt import GPT, GPTConfig
from esper_async.surgery import (
    AddResidual,
    AddSkip,
    InsertAfter,
    InsertIdentityBlocks,
    ModelSurgeon,
    RemoveLayer,
    StackBlocks,
    Widen,
    WidenResidual,
    identity_conv2d,
)

RESULTS = Path(__file__).parent / "results" / "surgery.json"


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs with batch norm and a (projected) identity shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18(nn.Module):
    """ResNet-18 (ImageNet layout) for ``classes`` outputs."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, c_in = (64, 128, 256, 512), 64
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            blocks = nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width, 1))
            setattr(self, f"layer{index}", blocks)
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def operations() -> dict[str, Any]:
    """Fresh operation factories (inserted modules must be new objects each time)."""
    return {
        "widen_conv": lambda: Widen("layer2.0.conv1", 160),
        "widen_conv_layer4": lambda: Widen("layer4.1.conv1", 640),
        "insert_identity_conv": lambda: InsertAfter("layer3.0.bn1", identity_conv2d(256)),
        "remove_block": lambda: RemoveLayer("layer4.1"),
        "remove_strided_block": lambda: RemoveLayer("layer3.0"),
        "add_residual": lambda: AddResidual("layer2.1.conv2"),
        "add_skip_fx": lambda: AddSkip("layer1.0", "layer1.1", scope="layer1"),
    }


async def one(
    surgeon: ModelSurgeon,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probe: torch.Tensor,
    factory: Any,
) -> float:
    """Commit one operation in its own transaction; return the seconds it took."""
    started = time.perf_counter()
    async with surgeon.transaction(model, optimizer, probe=probe) as tx:
        await tx.stage(factory())
    return time.perf_counter() - started


class _Abort(Exception):
    pass


async def measure(quick: bool) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)  # other work on a shared machine inflates timings
    torch.manual_seed(0)
    model = ResNet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # A probe is a handful of samples: enough to check shapes, values and gradient paths.
    batch, size = 2, 32
    probe = torch.randn(batch, 3, size, size)
    model(torch.randn(batch, 3, size, size)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    surgeon = ModelSurgeon()
    repeats = 5 if quick else 21
    results: dict[str, Any] = {}
    for name, factory in operations().items():
        commit_ms: list[float] = []
        for _ in range(repeats):
            state = _Reset(model, optimizer)
            seconds = await one(surgeon, model, optimizer, probe, factory)
            commit_ms.append(seconds * 1e3)
            state.restore()
        results[name] = {"p50_ms": statistics.median(commit_ms), "max_ms": max(commit_ms)}
    rollback_ms: list[float] = []
    for _ in range(repeats):
        try:
            async with surgeon.transaction(model, optimizer, probe=probe) as tx:
                await tx.stage(Widen("layer2.0.conv1", 160))
                staged = time.perf_counter()
                raise _Abort
        except _Abort:
            pass
        rollback_ms.append((time.perf_counter() - staged) * 1e3)
    # Baseline: the naive snapshot the journal avoids (deep copies of model and optimizer state).
    deepcopy_ms: list[float] = []
    for _ in range(max(3, repeats // 4)):
        started = time.perf_counter()
        copy.deepcopy(model)
        copy.deepcopy(optimizer.state_dict())
        deepcopy_ms.append((time.perf_counter() - started) * 1e3)
    floors = await _floors(surgeon, model, optimizer, probe, repeats)
    forward_ms: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            model.eval()
            model(probe)
            model.train()
        forward_ms.append((time.perf_counter() - started) * 1e3)
    op_p50 = {name: round(r["p50_ms"], 3) for name, r in results.items()}
    return {
        "benchmark": "surgery",
        "quick": quick,
        "model": "ResNet18 (built in benchmarks/bench_surgery.py, ImageNet layout, 1000 classes)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "probe_shape": list(probe.shape),
        "repeats": repeats,
        "op_p50_ms": op_p50,
        "op_max_ms": {name: round(r["max_ms"], 3) for name, r in results.items()},
        "op_max_p50_ms": max(op_p50.values()),
        "rollback_p50_ms": round(statistics.median(rollback_ms), 3),
        "baseline_deepcopy_snapshot_p50_ms": round(statistics.median(deepcopy_ms), 3),
        "rollback_speedup_vs_deepcopy_snapshot": round(
            statistics.median(deepcopy_ms) / statistics.median(rollback_ms), 1
        ),
        "probe_forward_p50_ms": round(statistics.median(forward_ms), 3),
        "floor": floors,
        "seed_target_ms": 100,
        "goal_ms": 20,
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
    }


async def _floors(
    surgeon: ModelSurgeon,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probe: torch.Tensor,
    repeats: int,
) -> dict[str, Any]:
    """Per operation, the work no implementation of it can skip, timed on its own.

    * ``region``: the module validation checked (read from the committed transaction's report);
    * ``forward_to_region_ms``: the probe forward on the old structure until that module has
      returned (its input and old output are needed: everything before it has to run);
    * ``new_megabytes`` and ``write_new_ms``: the parameters and optimizer-state tensors the
      operation creates (present after it, not before), and the time to allocate and fill
      tensors of those shapes (all kept alive until the last is written, as the operation must).

    Both run in a worker thread, as a transaction's work does. The new region's own forward (also
    needed) is left out, so the floor is a lower bound.
    """
    floors: dict[str, Any] = {}
    for name, factory in operations().items():
        before = _tensor_ids(model, optimizer)
        state = _Reset(model, optimizer)
        async with surgeon.transaction(model, optimizer, probe=probe) as tx:
            await tx.stage(factory())
        region = tx.checks[0].region
        created = [t for key, t in _tensors(model, optimizer).items() if key not in before]
        state.restore()
        module = model.get_submodule(region) if region else model
        forward_ms: list[float] = []
        write_ms: list[float] = []
        for _ in range(repeats):
            # In a worker thread, where a transaction does this work (its malloc arena differs).
            forward, write = await anyio.to_thread.run_sync(
                _floor_sample, model, optimizer, probe, module, created
            )
            forward_ms.append(forward)
            write_ms.append(write)
        floors[name] = {
            "region": region,
            "forward_to_region_ms": round(statistics.median(forward_ms), 3),
            "new_megabytes": round(sum(t.numel() * t.element_size() for t in created) / 1e6, 2),
            "write_new_ms": round(statistics.median(write_ms), 3),
        }
    return floors


def _floor_sample(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probe: torch.Tensor,
    module: nn.Module,
    created: list[torch.Tensor],
) -> tuple[float, float]:
    """Milliseconds of one probe forward cut after ``module``, and of writing ``created`` anew."""
    from esper_async.surgery._context import SurgeryContext

    started = time.perf_counter()
    SurgeryContext(model, optimizer, probe).capture([module], operation="floor")
    forward = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    written = [torch.empty_like(t).copy_(t) for t in created]
    write = (time.perf_counter() - started) * 1e3
    del written
    return forward, write


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    found = {id(p): p.detach() for p in model.parameters()}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                found[id(value)] = value
    return found


def _tensor_ids(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    return set(_tensors(model, optimizer))


class _Reset:
    """Puts the benchmark model back after a committed sample, so every sample starts alike.

    Operations never write into existing modules or tensors, so restoring each module's child table
    and the optimizer's groups and state (snapshotted before the sample) undoes a committed change.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from esper_async.surgery._context import OptimizerSnapshot

        self._model = model
        self._children = {
            name: (module, dict(module._modules), dict(module._parameters))
            for name, module in model.named_modules()
        }
        self._optimizer = OptimizerSnapshot(optimizer)

    def restore(self) -> None:
        for module, children, parameters in self._children.values():
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(parameters)
        self._optimizer.restore()


def host_operations() -> dict[str, Any]:
    """The host-growth operators timed on the 6 x 384 GPT."""
    return {
        "stack_blocks_x2_whole": lambda: StackBlocks("blocks", 2, "whole"),
        "stack_blocks_x2_interleave": lambda: StackBlocks("blocks", 2, "interleave"),
        "insert_identity_blocks_3": lambda: InsertIdentityBlocks("blocks", after=(0, 2, 4)),
        "widen_residual_384_to_512": lambda: WidenResidual(512, seed=0),
    }


async def measure_host(quick: bool, device: str) -> dict[str, Any]:
    """Latency of each host-growth operator, validation included, on the 6 x 384 GPT."""
    dev = torch.device(device)
    torch.manual_seed(0)
    config = GPTConfig.reference(65)
    model = GPT(config).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 65, (8, config.block_size), device=dev)
    model(batch).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    probe = torch.randint(0, 65, (2, 64), device=dev)
    surgeon = ModelSurgeon()
    repeats = 5 if quick else 21

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    results: dict[str, Any] = {}
    for name, factory in host_operations().items():
        samples: list[float] = []
        for i in range(repeats + 2):  # the first two warm up (allocator, kernels, tracing)
            state = _Reset(model, optimizer)
            sync()
            started = time.perf_counter()
            async with surgeon.transaction(model, optimizer, probe=probe) as tx:
                await tx.stage(factory())
            sync()
            if i >= 2:
                samples.append((time.perf_counter() - started) * 1e3)
            state.restore()
        results[name] = {
            "p50_ms": round(statistics.median(samples), 3),
            "max_ms": round(max(samples), 3),
        }
    p50 = {name: r["p50_ms"] for name, r in results.items()}
    return {
        "benchmark": "surgery_host",
        "quick": quick,
        "model": "GPT 6 x 384 (esper_async.apps.gpt, GPTConfig.reference(65)), AdamW",
        "parameters": sum(p.numel() for p in model.parameters()),
        "probe_shape": list(probe.shape),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "repeats": repeats,
        "op_p50_ms": p50,
        "op_max_ms": {name: r["max_ms"] for name, r in results.items()},
        "op_max_p50_ms": max(p50.values()),
        "target_ms": 100,
        "meets_target": max(p50.values()) < 100,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller probe")
    # One thread by default: on a shared 2-core machine, two OpenMP threads stall at every barrier
    # whenever another process holds a core, which inflates small-op latencies many times over.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--host", action="store_true", help="also time the host-growth operators")
    parser.add_argument("--host-only", action="store_true", help="time only host growth")
    parser.add_argument("--device", default="cpu", help="device of the host-growth run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.host_only:
        result = anyio.run(measure_host, args.quick, args.device)
    else:
        result = anyio.run(measure, args.quick)
        if args.host:
            result["host"] = anyio.run(measure_host, args.quick, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
