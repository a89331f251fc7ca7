"""Does growth pay? A growth run against a static model of its final size.

    python benchmarks/bench_growth.py [--quick] [--seeds N] [--epochs E] [--jobs J]
        [--controller KEY=VALUE ...] [--out NAME]   → benchmarks/results/growth.json (or NAME)
    python benchmarks/bench_growth.py --workload cifar [--cifar-dir PATH] [--limit N] ...
                                                    → benchmarks/results/growth_cifar.json

Workloads: ``digits`` (default; the digits demo's host on the bundled digits) and ``cifar``
(:class:`~esper_async.apps.cifar.CifarHost`, slots ``CIFAR_SLOTS``, on the user's own CIFAR-10
python files: ``--cifar-dir``, else ``$ESPER_CIFAR_DIR``, else
``~/.cache/esper_async/cifar-10-batches-py``; nothing is downloaded, and without the files the
run stops at once with exit code 2). The description below is the digits workload's; the cifar
workload runs the same three arms on its host, 15 epochs by default.

Three arms, each seed training on the same data split, order, recipe (the Trainer's default
Adam, lr 3e-3), epochs and batch size, from the same host initialisation:

* ``static``: the bare :class:`~esper_async.apps.demo.DigitsHost`.
* ``growth``: the demo's growth run (slots conv1, conv2, fc1; the default controller, with
  ``horizon_epochs`` set to the run's length and any ``--controller`` options).
* ``static_final``: the exact architecture growth ended with, trained from scratch: the host
  wrapped as in ``growth``, widened as growth widened it (``graft_widenings``: the recorded
  widenings replayed, the widened layers freshly initialised), and in every slot where growth
  fossilized a seed, a fresh module of
  the same blueprint (``build`` with a new seed), grafted and set FOSSILIZED before training, so
  it trains as part of the model from step 0 (the same function-preserving initialisation a
  growth seed gets). Paired with the growth run of the same seed.

Per arm: test accuracy (mean and 95 % t-interval), parameters, training FLOPs
(``esper_async.training._flops``: every step at the structure the model had, validation and
counterfactual passes, and an estimate for compiling and validating each kernel), wall time.
Paired differences growth − static_final and growth − static, with 95 % t-intervals.

Growth runs share one kernel store in a temporary directory: kernels compiled by one seed are
served to later ones (the FLOP figures count every kernel a run needs, compiled or not, as if
it ran alone).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import AsyncExitStack
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import ci95, controller_options, machine, write

ARMS = ("static", "growth", "static_final")


def _workload(workload: dict[str, Any], cfg: Any) -> tuple[Any, Any, Any, tuple[str, ...]]:
    """``(loaders, host, example input, slots)`` of ``workload`` for the arm options ``cfg``."""
    import torch

    if workload["name"] == "cifar":
        from esper_async.apps.cifar import CIFAR_SLOTS, CifarHost, cifar_loaders

        data = cifar_loaders(
            workload["cifar_dir"], batch_size=cfg.batch_size, seed=cfg.seed,
            limit=workload["limit"],
        )
        return data, CifarHost(), CifarHost.example_input(), CIFAR_SLOTS
    from esper_async.apps.data import digits_loaders
    from esper_async.apps.demo import DigitsHost

    data = digits_loaders(batch_size=cfg.batch_size, seed=cfg.seed)
    return data, DigitsHost(), torch.zeros(2, 1, 8, 8), cfg.slots


async def _arm(
    arm: str, seed: int, epochs: int, batch_size: int, store_dir: str,
    fossils: list[tuple[str, str]], controller: dict[str, Any],
    widenings: list[dict[str, Any]], workload: dict[str, Any],
) -> dict[str, Any]:
    import torch

    from esper_async import BlueprintCompiler, HeuristicController, Trainer, wrap
    from esper_async.apps.demo import DemoConfig, evaluate_accuracy
    from esper_async.apps.static_final import fossils_of, graft_fossils, graft_widenings
    from esper_async.control import ControllerConfig
    from esper_async.seeds import SeedState
    from esper_async.store import KernelStore
    from esper_async.training._flops import FlopLedger

    cfg = DemoConfig(
        epochs=epochs, seed=seed, batch_size=batch_size, controller=ControllerConfig(**controller)
    )
    torch.manual_seed(cfg.seed)
    data, model, example, slots = _workload(workload, cfg)
    if arm != "static":
        wrap(model, slots, example_input=example)
    graft_widenings(model, widenings, seed=seed)  # static_final: growth's widths, fresh
    graft_fossils(model, fossils, seed=seed)  # static_final: growth's fossils, fresh
    ledger = FlopLedger(model)
    germinated: list[str] = []
    async with AsyncExitStack() as stack:
        compiler = None
        if arm == "growth":
            store = await stack.enter_async_context(KernelStore(store_dir))
            compiler = BlueprintCompiler(store=store)
            await stack.enter_async_context(compiler)
        trainer = Trainer(
            model, grow=arm == "growth", seed=cfg.seed, compiler=compiler,
            controller=HeuristicController(cfg.controller, seed=cfg.seed),
        )
        seen = 0

        def on_epoch(report: Any, fit: Any) -> None:
            nonlocal seen
            ledger.end_epoch(report)
            for event in fit.events[seen:]:
                if event.target == SeedState.GERMINATED.value:
                    slot = trainer.slots[event.slot]
                    assert slot.blueprint is not None and slot.contract is not None
                    ledger.add_kernel(slot.blueprint, slot.contract)
                    germinated.append(f"{event.slot}/{slot.blueprint.name}")
            seen = len(fit.events)

        fit = await trainer.fit(
            ledger.train(data.train), ledger.val(data.val), epochs=cfg.epochs, on_epoch=on_epoch
        )
        compiles = 0 if compiler is None else compiler.compiles
    final = list(fossils_of(trainer.slots))
    return {
        "arm": arm,
        "seed": seed,
        "test_acc": evaluate_accuracy(model, data.test),
        "params": trainer.param_count(),
        "flops": dict(ledger.totals, total=ledger.total),
        "flop_measurements": ledger.counter.measurements,
        "steps": fit.steps,
        "wall_s": fit.wall_s,
        "fossilized": [name for name, _ in final],
        "fossil_blueprints": final,
        "surgeries": list(trainer.surgeries),
        "germinated": germinated,
        "culled": fit.count(SeedState.CULLED),
        "live_at_end": [
            f"{n}:{s.state.value}" for n, s in trainer.slots.items()
            if s.state in (SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATION)
        ],
        "kernels_compiled": compiles,
        "kernels_from_store": len(germinated) - compiles if arm == "growth" else 0,
    }


def run_arm(
    arm: str, seed: int, epochs: int, batch_size: int, store_dir: str,
    fossils: list[tuple[str, str]], threads: int, controller: dict[str, Any],
    widenings: list[dict[str, Any]], workload: dict[str, Any],
) -> dict[str, Any]:
    """One arm of one seed, in its own process."""
    import anyio
    import structlog
    import torch

    torch.set_num_threads(threads)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    out = anyio.run(
        _arm, arm, seed, epochs, batch_size, store_dir, fossils, controller, widenings,
        workload,
    )
    out["process_s"] = time.perf_counter() - started
    return out


def summarise(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Per-arm figures, paired differences and the FLOP ratio."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    arms: dict[str, Any] = {}
    for arm in ARMS:
        rs = [by[(arm, s)] for s in seeds]
        arms[arm] = {
            "test_acc": ci95([r["test_acc"] for r in rs]),
            "params": ci95([float(r["params"]) for r in rs]),
            "flops_total": ci95([float(r["flops"]["total"]) for r in rs]),
            "flops_mean_by_kind": {
                k: statistics.fmean(float(r["flops"][k]) for r in rs) for k in rs[0]["flops"]
            },
            "wall_s": ci95([r["wall_s"] for r in rs]),
        }

    def paired(a: str, b: str, key: str = "test_acc") -> dict[str, Any]:
        return ci95([by[(a, s)][key] - by[(b, s)][key] for s in seeds])

    ratios = [by[("growth", s)]["flops"]["total"] / by[("static_final", s)]["flops"]["total"]
              for s in seeds]
    return {
        "arms": arms,
        "paired_test_acc": {
            "growth_minus_static_final": paired("growth", "static_final"),
            "growth_minus_static": paired("growth", "static"),
            "static_final_minus_static": paired("static_final", "static"),
        },
        "flops_ratio_growth_over_static_final": {
            "of_means": arms["growth"]["flops_total"]["mean"]
            / arms["static_final"]["flops_total"]["mean"],
            "per_seed": ci95(ratios),
        },
    }


def _store_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    growth = [r for r in runs if r["arm"] == "growth"]
    hits = sum(r["kernels_from_store"] for r in growth)
    return {
        "shared": "one kernel store in a temporary directory, shared by every growth run and "
                  "removed afterwards",
        "kernels_compiled": sum(r["kernels_compiled"] for r in growth),
        "kernels_from_store": hits,
        "why": "a kernel's store key holds its initial-weight seed, which the trainer derives "
               "from the run's seed, so runs of different seeds never share a kernel"
               if hits == 0 else "later runs were served kernels earlier ones compiled",
    }


def _controller_summary(options: dict[str, Any]) -> dict[str, Any]:
    from esper_async.control import ControllerConfig

    return vars(ControllerConfig(**options))


def run(args: argparse.Namespace) -> dict[str, Any]:
    seeds = list(range(args.seeds))
    cpus = os.cpu_count() or 1
    jobs = args.jobs or min(len(seeds), cpus)
    threads = max(1, cpus // jobs)
    store_dir = tempfile.mkdtemp(prefix="esper-growth-store-")
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            pending: dict[Future[dict[str, Any]], tuple[str, int]] = {}

            def submit(
                arm: str, seed: int, fossils: list[Any], widenings: list[Any] | None = None
            ) -> None:
                future = pool.submit(
                    run_arm, arm, seed, args.epochs, args.batch_size, store_dir, fossils, threads,
                    args.controller_options, widenings or [], args.workload_spec,
                )
                pending[future] = (arm, seed)

            for seed in seeds:  # growth first: static_final waits for it
                submit("growth", seed, [])
            for seed in seeds:
                submit("static", seed, [])
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    arm, seed = pending.pop(future)
                    result = future.result()
                    runs.append(result)
                    print(
                        f"seed {seed} {arm:<12} acc {result['test_acc']:.4f} "
                        f"params {result['params']} flops {result['flops']['total']:.3e} "
                        f"{result['wall_s']:.1f} s fossils {result['fossilized']} "
                        f"widened {[r['target'] for r in result['surgeries']]}",
                        flush=True,
                    )
                    if arm == "growth":
                        submit(
                            "static_final", seed, result["fossil_blueprints"],
                            result["surgeries"],
                        )
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    runs.sort(key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
    # The digits workload's JSON keeps the keys it always had; only cifar records its workload.
    workload = {} if args.workload == "digits" else {"workload": args.workload_spec}
    return {
        **workload,
        "complete": not args.quick,
        "command": "python benchmarks/bench_growth.py " + " ".join(sys.argv[1:]),
        "seeds": len(seeds),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "controller": _controller_summary(args.controller_options),
        "jobs": jobs,
        "torch_threads_per_job": threads,
        "kernel_store": _store_summary(runs),
        "total_wall_s": time.perf_counter() - started,
        **summarise(runs, seeds),
        "runs": runs,
        "machine": machine(),
    }


def _cifar_workload(args: argparse.Namespace) -> dict[str, Any]:
    """The cifar workload's spec, once its files are found and read cleanly; else exit 2."""
    from esper_async.apps.cifar import cifar_loaders, resolve_cifar_dir
    from esper_async.errors import DataError

    try:
        directory = resolve_cifar_dir(args.cifar_dir)
        cifar_loaders(directory, limit=args.limit)  # every file the runs will read, checked once
    except DataError as exc:
        print(
            f"bench_growth: the cifar workload needs the CIFAR-10 python files (nothing is "
            f"downloaded): {exc}", file=sys.stderr,
        )
        raise SystemExit(2) from None
    return {"name": "cifar", "cifar_dir": str(directory), "limit": args.limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed (a smoke run)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--workload", choices=("digits", "cifar"), default="digits",
        help="digits: the demo's host on the bundled digits; cifar: CifarHost on CIFAR-10 files",
    )
    parser.add_argument(
        "--cifar-dir", default=None, metavar="PATH",
        help="the cifar-10-batches-py directory, or the folder holding it (default: "
             "$ESPER_CIFAR_DIR, else ~/.cache/esper_async/cifar-10-batches-py)",
    )
    parser.add_argument(
        "--limit", type=int, default=None,
        help="cifar: read only this many training (and test) images",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default 40 (cifar: 15)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=0, help="parallel runs (0: min(seeds, cpus))")
    parser.add_argument(
        "--controller", action="append", default=[], metavar="KEY=VALUE",
        help="a ControllerConfig option for the growth run (repeatable)",
    )
    parser.add_argument(
        "--out", default=None,
        help="result name (benchmarks/results/NAME.json; default growth, cifar: growth_cifar)",
    )
    parser.add_argument("--note", default="", help="recorded in the JSON, e.g. why it is partial")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 1
    cifar = args.workload == "cifar"
    if args.epochs is None:
        args.epochs = 15 if cifar else 40
    if args.out is None:
        args.out = "growth_cifar" if cifar else "growth"
    if args.limit is not None and not cifar:
        parser.error("--limit applies to the cifar workload only")
    args.workload_spec = _cifar_workload(args) if cifar else {"name": "digits"}
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    # horizon_epochs defaults to the run's length (--controller horizon_epochs=0 turns it off)
    args.controller_options = controller_options(args.controller, {"horizon_epochs": args.epochs})
    result = run(args)
    if args.note:
        result["note"] = args.note
    path = write(args.out, result)
    diff = result["paired_test_acc"]["growth_minus_static_final"]
    print(f"growth − static_final: {diff['mean']:+.4f} ± {diff['ci95']} → {path}")


if __name__ == "__main__":
    main()
