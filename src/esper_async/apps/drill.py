"""The fault drill: many compile-and-graft operations on a tiny host, faults injected at random.

An *operation* is one accepted germination: a kernel is obtained (from the store, or compiled in
a worker), grafted, blended and removed again. A seeded :class:`~esper_async.reliability.FaultPlan`
gives a fraction of the operations a fault of one of the kinds of :class:`FaultKind`; the drill
injects it for real (see :mod:`esper_async.reliability._faults`) and the trainer must recover
without stopping. Most operations are served from the store after the first compile (cheap);
compile faults force real compiles (a fresh ``drill_slow`` variant, or a corrupted blob).

An operation *succeeded* when the system did what ``docs/reliability.md`` promises for its fault:

============== =================================================================================
fault          expected
============== =================================================================================
none           the kernel was grafted
worker_kill    the kernel was grafted (compile retried on a fresh worker)
corrupt_store  the kernel was grafted (blob quarantined, kernel recompiled)
compile_timeout a ``compile_timeout`` incident, and the slot dormant again
kernel_nan     a ``seed_non_finite`` incident for the slot (culled, step redone)
kernel_raise   a ``seed_raised`` incident for the slot (culled, step redone)
oom_graft      an ``out_of_memory`` incident for the slot (culled, growth backed off)
loss_spike     a ``loss_spike`` incident naming the slot (rolled back, seed embargoed)
non_finite_loss a ``non_finite_loss`` incident (rolled back)
============== =================================================================================

and, across the whole drill: no exception escaped training, every recorded training loss is
finite, and no committed data was lost (every checkpoint on disk restores; every store entry the
drill did not corrupt itself still verifies).
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch
from torch import nn

from ..blueprints import Blueprint, SlotKind, library
from ..compiler import BlueprintCompiler, OptimizerOptions
from ..control import Cull, Decision, EpochReport, Germinate, Release, StartBlending
from ..reliability import (
    BreakerConfig,
    BreakerState,
    CheckpointStore,
    FaultKind,
    FaultPlan,
    GovernorConfig,
    IncidentKind,
    ReliabilityConfig,
    ResourceLimits,
    corrupt_file,
    inject_kernel_nan,
    inject_kernel_oom,
    inject_kernel_raise,
    inject_loss_spike,
    kill_processes,
    poison_parameter,
    restore_state,
)
from ..seeds import SeedSlot, SeedState, find_slots, wrap
from ..store import KernelStore
from ..training.trainer import FitResult, Trainer
from ._drill_families import DRILL_FAMILY

__all__ = ("DrillConfig", "DrillReport", "run_drill")

log = structlog.get_logger(__name__)

#: What each fault's recovery must show, as the incident kind expected for the operation.
EXPECTED_INCIDENT = {
    FaultKind.COMPILE_TIMEOUT: IncidentKind.COMPILE_TIMEOUT,
    FaultKind.KERNEL_NAN: IncidentKind.SEED_NON_FINITE,
    FaultKind.KERNEL_RAISE: IncidentKind.SEED_RAISED,
    FaultKind.OOM_GRAFT: IncidentKind.OUT_OF_MEMORY,
    FaultKind.LOSS_SPIKE: IncidentKind.LOSS_SPIKE,
    FaultKind.NON_FINITE_LOSS: IncidentKind.NON_FINITE_LOSS,
}
#: Faults injected once the kernel is grafted (into the seed or its host).
RUNTIME_FAULTS = frozenset(
    {FaultKind.KERNEL_NAN, FaultKind.KERNEL_RAISE, FaultKind.OOM_GRAFT, FaultKind.LOSS_SPIKE,
     FaultKind.NON_FINITE_LOSS}
)
#: Compile options of the drill: few timing repeats (the drill measures recovery, not speed).
FAST = OptimizerOptions(repeats=2, batch=8)
#: How long a timed-out drill compile would sleep without its timeout.
_STUCK_MS = 600_000


@dataclass(frozen=True)
class DrillConfig:
    """Size and mix of a drill.

    :ivar operations: accepted germinations to run.
    :ivar seed: seeds the fault plan, the host and the data.
    :ivar slots: seed slots in the host (operations run in parallel across them).
    :ivar features: width of the host's hidden layers (the slots' contract).
    :ivar steps_per_epoch: training batches per epoch.
    :ivar fault_rate: probability that an operation carries a fault.
    :ivar kinds: the fault kinds to draw from.
    :ivar compile_timeout_s: the compiler's timeout (a ``compile_timeout`` fault exceeds it).
    :ivar kill_build_ms: how long a ``worker_kill`` compile's build takes (the kill lands in it).
    :ivar checkpoint_every: epochs between checkpoints.
    :ivar workdir: where the store and checkpoints go (default: a temporary directory).
    """

    operations: int = 1000
    seed: int = 0
    slots: int = 4
    features: int = 16
    steps_per_epoch: int = 2
    fault_rate: float = 0.08
    kinds: tuple[FaultKind, ...] = tuple(FaultKind)
    compile_timeout_s: float = 6.0
    kill_build_ms: int = 1500
    checkpoint_every: int = 25
    workdir: str | None = None


@dataclass
class _Operation:
    index: int
    slot: str
    blueprint: Blueprint
    fault: FaultKind | None
    reason: str
    step: int = -1
    events_at: int = 0  # lengths of the run's event and incident lists when it was issued
    incidents_at: int = 0
    accepted: bool = False
    injected: bool = False


@dataclass
class DrillReport:
    """The drill's figures.

    :ivar operations: accepted compile-and-graft operations.
    :ivar faults_injected: faults injected, by kind.
    :ivar recovered: per fault kind (and ``"none"``), ``[succeeded, total]`` operations.
    :ivar training_crashes: exceptions that escaped training (must be 0).
    :ivar committed_data_lost: checkpoints that no longer restore plus store entries that no
        longer verify, not counting entries the drill corrupted itself (must be 0).
    :ivar success_rate: operations that succeeded over all operations (every injected fault is
        recoverable).
    :ivar non_finite_losses_recorded: training losses recorded as non-finite (must be 0).
    :ivar incidents: incidents the trainer recorded, by kind.
    :ivar rollbacks: governor rollbacks.
    :ivar compiles: real compiles run (the rest came from the store).
    :ivar store_quarantines: store entries quarantined.
    :ivar checkpoints_verified: checkpoints restored at the end.
    :ivar epochs: epochs trained.
    :ivar steps: training steps taken.
    :ivar wall_s: seconds the drill took.
    :ivar failures: descriptions of the operations that did not succeed (at most 20).
    """

    operations: int = 0
    faults_injected: dict[str, int] = field(default_factory=dict)
    recovered: dict[str, list[int]] = field(default_factory=dict)
    training_crashes: int = 0
    committed_data_lost: int = 0
    success_rate: float = 0.0
    non_finite_losses_recorded: int = 0
    incidents: dict[str, int] = field(default_factory=dict)
    rollbacks: int = 0
    compiles: int = 0
    store_quarantines: int = 0
    checkpoints_verified: int = 0
    epochs: int = 0
    steps: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return dict(self.__dict__)


class _Host(nn.Module):
    """A tiny MLP classifier: ``(N, 8)`` → ``slots`` hidden layers of ``features`` → 4 classes."""

    def __init__(self, features: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, features)
        self.hidden = nn.ModuleList(nn.Linear(features, features) for _ in range(depth))
        self.out = nn.Linear(features, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.out(h)


def _host(cfg: DrillConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = _Host(cfg.features, cfg.slots)
    wrap(model, [f"hidden.{i}" for i in range(cfg.slots)], example_input=torch.zeros(2, 8))
    return model


def _data(cfg: DrillConfig) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[Any]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher = torch.randn(8, 4, generator=gen)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 8, generator=gen)
        return x, (x @ teacher).argmax(dim=1)

    return [batch(32) for _ in range(cfg.steps_per_epoch)], [batch(64)]


class _DrillController:
    """Runs operations back to back in every slot and injects the plan's faults.

    Per slot: germinate (boundary *k*); grafted at *k+1*, where blending starts at once and a
    runtime fault, if planned, is injected; culled at *k+2* when the blend is complete, and the
    next operation germinates in the same decision list.
    """

    def __init__(
        self, cfg: DrillConfig, plan: FaultPlan, trainer: Trainer, compiler: BlueprintCompiler,
        store: KernelStore,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.trainer = trainer
        self.compiler = compiler
        self.store = store
        self.library = library(SlotKind.LINEAR)
        self.ops: list[_Operation] = []
        self._issued: dict[str, _Operation] = {}
        self._carry: dict[str, FaultKind | None] = {}
        self._known: dict[str, str] = {}  # blueprint json -> kernel id grafted from the store
        self._variants = itertools.count(1)
        self._rotation = itertools.count()
        self.kill_marks: list[int] = []
        self.injected: Counter[str] = Counter()
        self.corrupted: set[str] = set()
        self.done = anyio.Event()

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        decisions: list[Decision] = []
        for name, slot in slots.items():
            self._settle(name, slot)
            state = slot.state
            if state is SeedState.TRAINING:
                self._learn_kernel(slot)
                self._inject_runtime(name, slot)
                decisions.append(StartBlending(name, "drill: blend at once", 1))
                continue
            if state is SeedState.PROBATION:
                decisions.append(Cull(name, "drill: operation complete"))
            if state in (SeedState.PROBATION, SeedState.EMBARGOED, SeedState.CULLED):
                decisions.append(Release(name, "drill: next operation"))
                state = SeedState.DORMANT
            if state is SeedState.DORMANT and len(self.ops) < self.cfg.operations:
                germinate = self._next(name)
                if germinate is not None:
                    decisions.append(germinate)
        if len(self.ops) >= self.cfg.operations and not self._issued and all(
            s.state is SeedState.DORMANT for s in slots.values()
        ):
            self.trainer.request_stop()
        return decisions

    def _settle(self, name: str, slot: SeedSlot) -> None:
        """Account for the germination issued to ``slot`` at the last boundary."""
        op = self._issued.pop(name, None)
        if op is None:
            return
        accepted = any(
            target is SeedState.GERMINATED and reason == op.reason
            for _, target, reason in slot.lifecycle.history
        )
        if not accepted:  # refused (breaker, backoff, limits): the fault waits for the next one
            self._carry[name] = op.fault
            return
        op.accepted = True
        self.ops.append(op)
        if op.fault is not None and op.fault not in RUNTIME_FAULTS:
            self.injected[op.fault.value] += op.fault is not FaultKind.WORKER_KILL

    def _next(self, name: str) -> Germinate | None:
        fault = self._carry.pop(name) if name in self._carry else self.plan.draw()
        if fault is FaultKind.CORRUPT_STORE and not self._known:
            self._carry[name] = fault  # nothing stored yet to corrupt: try again later
            fault = None
        blueprint = self._blueprint(fault)
        if blueprint is None:
            self._carry[name] = fault
            return None
        if fault is FaultKind.CORRUPT_STORE:
            kernel_id = self._known[blueprint.to_json()]
            blobs = list((Path(self.store.path) / "blobs").rglob(f"{kernel_id}*"))
            for blob in blobs:
                corrupt_file(blob)
            self.corrupted.add(kernel_id)
        if fault is FaultKind.WORKER_KILL:
            self.kill_marks.append(self.compiler.compiles)
        index = len(self.ops) + len(self._issued)
        op = _Operation(index, name, blueprint, fault, f"drill op {index} ({fault or 'none'})")
        op.step = self.trainer.step
        op.events_at = len(self.trainer.result.events)
        op.incidents_at = len(self.trainer.result.incidents)
        self._issued[name] = op
        return Germinate(name, blueprint, op.reason)

    def _blueprint(self, fault: FaultKind | None) -> Blueprint | None:
        if fault is FaultKind.WORKER_KILL:
            return Blueprint(DRILL_FAMILY, {"delay_ms": self.cfg.kill_build_ms,
                                            "variant": next(self._variants)})
        if fault is FaultKind.COMPILE_TIMEOUT:
            return Blueprint(DRILL_FAMILY, {"delay_ms": _STUCK_MS, "variant": next(self._variants)})
        choices = [
            bp for bp in self.library
            if self.trainer.breakers[bp.id].state is BreakerState.CLOSED
            and (fault is not FaultKind.CORRUPT_STORE or bp.to_json() in self._known)
        ]
        if not choices:
            return None
        return choices[next(self._rotation) % len(choices)]

    def _learn_kernel(self, slot: SeedSlot) -> None:
        if slot.blueprint is not None and slot.kernel_id is not None:
            self._known[slot.blueprint.to_json()] = slot.kernel_id
            self.corrupted.discard(slot.kernel_id)  # served again: the store repaired it

    def _inject_runtime(self, name: str, slot: SeedSlot) -> None:
        op = next((o for o in reversed(self.ops) if o.slot == name), None)
        if op is None or op.fault not in RUNTIME_FAULTS or op.injected or slot.seed is None:
            return
        op.injected = True
        self.injected[op.fault.value] += 1
        seed = slot.seed
        match op.fault:
            case FaultKind.KERNEL_NAN:
                inject_kernel_nan(seed, inf=self.plan.uniform(0, 1) < 0.5)
            case FaultKind.KERNEL_RAISE:
                inject_kernel_raise(seed)
            case FaultKind.OOM_GRAFT:
                inject_kernel_oom(seed)
            case FaultKind.LOSS_SPIKE:
                inject_loss_spike(seed)
            case FaultKind.NON_FINITE_LOSS:
                _poison_on_next_forward(slot.host)


def _poison_on_next_forward(module: nn.Module) -> None:
    """Set a parameter of ``module`` to NaN at its next forward call (once): after the
    boundary's snapshot, as a bad update inside an epoch would."""

    def hook(mod: nn.Module, _args: Any) -> None:
        handle.remove()
        poison_parameter(mod)

    handle = module.register_forward_pre_hook(hook)


async def _killer(controller: _DrillController, compiler: BlueprintCompiler) -> None:
    """Kill the compile worker while a ``worker_kill`` operation's compile runs."""
    executor: Any = compiler.executor
    while True:
        await anyio.sleep(0.05)
        if not controller.kill_marks or compiler.compiles <= controller.kill_marks[0]:
            continue
        controller.kill_marks.pop(0)
        with anyio.move_on_after(30):
            while not executor.pids:  # noqa: ASYNC110  (the pool has no event for "started")
                await anyio.sleep(0.05)
            await anyio.sleep(controller.plan.uniform(0.3, 0.9))
            if kill_processes(executor.pids):
                controller.injected[FaultKind.WORKER_KILL.value] += 1


def _judge(op: _Operation, until: _Operation | None, fit: FitResult) -> bool:
    """Whether ``op`` went as promised, judged on what the run recorded between its issue and
    the issue of the next operation in its slot (``until``)."""
    events = fit.events[op.events_at : None if until is None else until.events_at]
    incidents = fit.incidents[op.incidents_at : None if until is None else until.incidents_at]
    events = [e for e in events if e.slot == op.slot]
    if op.fault in EXPECTED_INCIDENT:
        want = EXPECTED_INCIDENT[op.fault]
        hits = [
            i for i in incidents
            if i.kind is want and (i.slot == op.slot or op.fault is FaultKind.NON_FINITE_LOSS)
        ]
        if op.fault is FaultKind.COMPILE_TIMEOUT:
            return bool(hits) and any(e.target == SeedState.DORMANT.value for e in events)
        return bool(hits)
    return any(e.target == SeedState.TRAINING.value for e in events)


async def _verify_committed(
    cfg: DrillConfig, controller: _DrillController, store: KernelStore, checkpoints: Path
) -> tuple[int, int]:
    """Committed data that no longer reads back, and the checkpoints verified."""
    report = await store.verify()
    lost = len(set(report.quarantined) - controller.corrupted)
    verified = 0
    ckpts = CheckpointStore(checkpoints)
    for path in ckpts.paths():
        try:
            model = _host(cfg)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            restore_state(ckpts.load(path), model=model, optimizer=optimizer,
                          slots=find_slots(model), stateful={})
            if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                       if t.is_floating_point()):
                raise ValueError("non-finite parameters")
            verified += 1
        except Exception as exc:
            log.error("checkpoint does not restore", path=str(path), error=str(exc))
            lost += 1
    return lost, verified


async def run_drill(config: DrillConfig | None = None) -> DrillReport:
    """Run a fault drill and report its figures.

    :param config: size and mix (default: 1,000 operations, every fault kind).
    """
    cfg = config or DrillConfig()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="esper-drill-") as tmp:
        workdir = Path(cfg.workdir or tmp)
        checkpoints = workdir / "checkpoints"
        report = DrillReport()
        # No memory cache: every germination reads its kernel from disk, where corruption is.
        async with KernelStore(workdir / "store", memory_bytes=0) as store:
            compiler = BlueprintCompiler(
                workers=1, options=FAST, timeout=cfg.compile_timeout_s, retries=1, store=store,
                imports=["esper_async.apps._drill_families"],
            )
            model = _host(cfg)
            trainer = Trainer(
                model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                seed=cfg.seed, compiler=compiler,
                graft="epoch",  # each operation is grafted at the boundary after it germinates
                reliability=ReliabilityConfig(
                    breaker=BreakerConfig(threshold=4, window_s=20.0, cooldown_s=2.0),
                    limits=ResourceLimits(max_compiles_in_flight=cfg.slots),
                    governor=GovernorConfig(warmup=4),
                ),
                progress="off",  # the drill prints its own report
            )
            plan = FaultPlan(
                seed=cfg.seed, rate=cfg.fault_rate, kinds=cfg.kinds, skip_first=2 * cfg.slots
            )
            controller = _DrillController(cfg, plan, trainer, compiler, store)
            trainer.grower.controller = controller
            train, val = _data(cfg)
            fit = FitResult()
            # Generous: operations normally take two epochs per slot; refusals cost a few more.
            epochs = 4 * math.ceil(cfg.operations / cfg.slots) + 40
            async with compiler, anyio.create_task_group() as tg:
                tg.start_soon(_killer, controller, compiler)
                try:
                    fit = await trainer.fit(
                        train, val, epochs=epochs, checkpoint_dir=checkpoints,
                        checkpoint_every=cfg.checkpoint_every,
                    )
                except Exception as exc:  # the figure this drill exists to keep at zero
                    log.exception("training crashed", error=str(exc))
                    report.training_crashes += 1
                    fit = trainer.result
                tg.cancel_scope.cancel()
            report.compiles = compiler.compiles
            lost, verified = await _verify_committed(cfg, controller, store, checkpoints)
            report.store_quarantines = (await store.stats()).quarantine_events
        _fill(report, controller, fit, trainer, lost, verified)
    report.wall_s = round(time.perf_counter() - started, 2)
    return report


def _fill(
    report: DrillReport, controller: _DrillController, fit: FitResult, trainer: Trainer,
    lost: int, verified: int,
) -> None:
    ops = controller.ops
    following: dict[int, _Operation] = {}
    last: dict[str, _Operation] = {}
    for op in ops:
        if op.slot in last:
            following[last[op.slot].index] = op
        last[op.slot] = op
    recovered: dict[str, list[int]] = {}
    failures = []
    for op in ops:
        ok = _judge(op, following.get(op.index), fit)
        tally = recovered.setdefault(op.fault.value if op.fault else "none", [0, 0])
        tally[0] += ok
        tally[1] += 1
        if not ok:
            failures.append(f"op {op.index} in {op.slot} ({op.blueprint.name}, fault "
                            f"{op.fault or 'none'}) at step {op.step}")
    report.operations = len(ops)
    report.faults_injected = dict(sorted(controller.injected.items()))
    report.recovered = dict(sorted(recovered.items()))
    report.success_rate = (
        round(sum(t[0] for t in recovered.values()) / len(ops), 6) if ops else 0.0
    )
    report.committed_data_lost = lost
    report.checkpoints_verified = verified
    report.non_finite_losses_recorded = sum(
        r.train_loss is not None and not math.isfinite(r.train_loss) for r in fit.history
    )
    report.incidents = dict(sorted(Counter(i.kind.value for i in fit.incidents).items()))
    report.rollbacks = trainer.governor.rollbacks
    report.epochs = len(fit.history)
    report.steps = trainer.step
    report.failures = failures[:20]
