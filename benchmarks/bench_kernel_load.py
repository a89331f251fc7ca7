"""Benchmark loading a kernel: the safe loader against the ``torch.export.load`` path it replaced.

Baseline: what ``load_kernel`` did before it read archives itself (commit 4340807): sha256 check,
``torch.export.load(...).module()``, then strip the pytree wrapping and per-call guards.
Candidate: ``load_kernel`` now — sha256 check, the archive's checks (zip structure, allowed
members, raw payloads, the sample-inputs pickle scanned), the graph rebuilt on the allow-list.
Also timed alone: the checks (``read_archive``). Same kernel bytes, one process, one torch
thread, timed in turn; medians of ``--repeats`` loads.

Usage::

    python benchmarks/bench_kernel_load.py            # 20 loads each
    python benchmarks/bench_kernel_load.py --quick    # 5 loads each

Writes ``benchmarks/results/kernel_load.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging

import torch
from _common import interleaved_medians, machine, write

from esper_async.blueprints import Blueprint, SlotContract
from esper_async.kernels import Kernel, export_kernel, load_kernel
from esper_async.kernels._archive import read_archive

#: A small conv kernel of the size the demo uses (digits: 16 channels of 8x8).
BLUEPRINT = Blueprint("residual_conv")
CONTRACT = SlotContract("conv", (16, 8, 8))


def _old_load(kernel: Kernel) -> torch.nn.Module:
    """The loader before the safe load: only safe for bytes from a trusted source."""
    assert hashlib.sha256(kernel.artifact).hexdigest() == kernel.kernel_id
    program = torch.export.load(io.BytesIO(kernel.artifact)).module()
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
        elif node.op == "output":
            outputs = node.args[0]
            if isinstance(outputs, tuple | list) and len(outputs) == 1:
                node.args = (outputs[0],)
    graph._codegen = torch.fx.graph.CodeGen()
    program._forward_pre_hooks.clear()
    program._forward_hooks.clear()
    program.recompile()
    return program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 loads each")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 5
    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    kernel = export_kernel(BLUEPRINT, CONTRACT, seed=0)
    medians = interleaved_medians(
        {
            "torch_export_load": lambda: _old_load(kernel),
            "load_kernel": lambda: load_kernel(kernel),
            "checks_only": lambda: read_archive(kernel.artifact),
        },
        repeats=args.repeats,
    )
    data = {
        "machine": machine(),
        "kernel": {"blueprint": BLUEPRINT.name, "shape": list(CONTRACT.shape),
                   "artifact_bytes": kernel.nbytes},
        "repeats": args.repeats,
        "median_ms": {name: round(s * 1e3, 3) for name, s in medians.items()},
        "speedup": round(medians["torch_export_load"] / medians["load_kernel"], 2),
        "notes": "torch_export_load = the loader before the safe load (sha256 + "
        "torch.export.load().module() + stripping its wrapping), unsafe on untrusted bytes; "
        "load_kernel = sha256 + archive checks + graph rebuilt on the allow-list; checks_only = "
        "zip/member/payload checks and the sample-inputs pickle scan (read_archive).",
    }
    print(data["median_ms"], "speedup", data["speedup"])
    write("kernel_load", data)


if __name__ == "__main__":
    main()
