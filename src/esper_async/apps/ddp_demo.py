"""The demo model grown under data parallelism: one rank's part of the job, written out.

:func:`run_ddp_demo` is what ``examples/ddp_growth.py``, the distributed tests and
``benchmarks/bench_distributed.py`` run on every rank: the digits host with seed slots, trained
with DDP over sharded data, rank 0 deciding and compiling, the ranks checked equal after every
epoch, and checkpoints written by rank 0 (and resumed by all) when asked.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..compiler import OptimizerOptions
from ..control import ControllerConfig, EpochReport, Germinate, HeuristicController
from ..distributed import (
    BroadcastController,
    DeferredDDP,
    RankCompiler,
    RankContext,
    RankMeanLoss,
    RankState,
    ShardSampler,
    check_ranks_in_sync,
    ddp_wrapper,
    load_checkpoint,
    save_checkpoint,
)
from ..reliability import CheckpointStore
from ..seeds import find_slots, wrap
from ..store import KernelStore
from ..surgery import SurgeryPolicy, SurgeryPolicyConfig
from ..training.trainer import FitResult, Trainer
from .data import DigitsLoaders, digits_loaders
from .demo import DigitsHost

__all__ = ("DDPDemoConfig", "DDPDemoResult", "run_ddp_demo")

#: Adam's learning rate, as the trainer's default.
_LR = 3e-3


@dataclass(frozen=True)
class DDPDemoConfig:
    """Options of one rank's run (the same on every rank).

    :ivar epochs: epochs to train (after the resumed ones, when resuming).
    :ivar seed: seeds the host, the data split and shuffle, and the kernels.
    :ivar batch_size: training batch size per rank.
    :ivar limit: use only this many images.
    :ivar slots: host modules that get seed slots.
    :ivar controller: rank 0's controller thresholds.
    :ivar store: rank 0's kernel store directory (``None``: the default location).
    :ivar use_store: whether rank 0 keeps kernels in a store.
    :ivar compile_workers: rank 0's compile worker processes.
    :ivar checkpoints: a directory for checkpoints (rank 0 writes one after every epoch where no
        compile is in flight); ``None``: none.
    :ivar resume: restore the newest checkpoint in ``checkpoints`` first.
    :ivar check_every_epoch: check the ranks equal after every epoch (always at the end).
    :ivar forms: execution forms rank 0's kernel optimizer measures (``None``: the device's
        defaults).
    :ivar surgery: widen slots whose seeds fossilize (``None``: no surgery). Every rank runs the
        same policy on the same inputs — the fossilizations rank 0 decided and broadcast, the step
        count, the first 64 validation examples as probe — so every rank proposes, validates and
        commits the same operation; the ranks then check that they agree on the outcome.
    """

    epochs: int = 20
    seed: int = 0
    batch_size: int = 64
    limit: int | None = None
    slots: tuple[str, ...] = ("conv1", "conv2", "fc1")
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    store: str | None = None
    use_store: bool = True
    compile_workers: int = 1
    checkpoints: str | None = None
    resume: bool = False
    check_every_epoch: bool = True
    forms: tuple[str, ...] | None = None
    surgery: SurgeryPolicyConfig | None = None


@dataclass
class DDPDemoResult:
    """One rank's outcome.

    :ivar rank: the rank.
    :ivar world_size: ranks in the job.
    :ivar fit: the trainer's history and growth events on this rank.
    :ivar final: the ranks' common state at the end (checked).
    :ivar restored: the state right after resuming (checked), if resumed.
    :ivar resumed_epoch: epochs completed in the checkpoint resumed from (0 if none).
    :ivar compiles: kernels compiled on this rank (0 except on rank 0).
    :ivar received: kernels received from rank 0.
    :ivar step_s: wall seconds of every training step on this rank.
    :ivar ddp_builds: ``(time.time(), ("slot:kernel id", ...))`` at every DDP (re)build: the
        seeds it carries.
    :ivar ddp_params: trainable parameters DDP synchronised, at every (re)build.
    :ivar host_params: parameters of the bare host (no slots): what DDP carries while every slot
        is dormant.
    :ivar arrivals: ``(time.time(), blueprint, kernel id)`` when each kernel reached this rank.
    :ivar germinated: ``(time.time(), slot, blueprint)`` of every germination decided.
    :ivar checkpoints: paths of the checkpoints written.
    :ivar test_acc: accuracy on the test split.
    :ivar params: trainable parameters at the end.
    :ivar surgeries: the surgeries committed on the model (replayed ones included).
    """

    rank: int
    world_size: int
    fit: FitResult
    final: RankState
    restored: RankState | None
    resumed_epoch: int
    compiles: int
    received: int
    step_s: list[float]
    ddp_builds: list[tuple[float, tuple[str, ...]]]
    ddp_params: list[int]
    host_params: int
    germinated: list[tuple[float, str, str]]
    arrivals: list[tuple[float, str, str]]
    checkpoints: list[str]
    test_acc: float
    params: int
    surgeries: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "final": self.final.to_json(),
            "restored": None if self.restored is None else self.restored.to_json(),
            "resumed_epoch": self.resumed_epoch,
            "compiles": self.compiles,
            "received": self.received,
            "steps": len(self.step_s),
            "step_s": self.step_s,
            "ddp_builds": [[t, list(k)] for t, k in self.ddp_builds],
            "ddp_params": self.ddp_params,
            "host_params": self.host_params,
            "germinated": [list(g) for g in self.germinated],
            "arrivals": [list(a) for a in self.arrivals],
            "checkpoints": self.checkpoints,
            "events": [[e.epoch, e.step, e.slot, e.source, e.target] for e in self.fit.events],
            "val_loss": [r.val_loss for r in self.fit.history],
            "train_loss": [r.train_loss for r in self.fit.history],
            "test_acc": self.test_acc,
            "params": self.params,
            "surgeries": self.surgeries,
        }


class _TimedLoader:
    """The training loader, recording the wall time of every step (batch to batch)."""

    def __init__(self, loader: Iterable[Any], times: list[float]) -> None:
        self.loader = loader
        self.times = times

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            started = time.perf_counter()
            yield batch
            # The trainer asks for the next batch once the step (and its bookkeeping) is done.
            self.times.append(time.perf_counter() - started)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, loader: Iterable[Any], device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return correct / max(1, total)


async def run_ddp_demo(cfg: DDPDemoConfig, ctx: RankContext) -> DDPDemoResult:
    """Run this rank's part of the job; every rank calls it with the same ``cfg``.

    :raises RankDivergenceError: if the ranks ever differ in structure or parameters.
    :raises CheckpointError: if ``cfg.resume`` and there is no checkpoint to resume from.
    """
    torch.manual_seed(cfg.seed)
    data = distributed_digits_loaders(
        ctx, batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit
    )
    model = DigitsHost()
    wrap(model, cfg.slots, example_input=torch.zeros(2, 1, 8, 8))
    model.to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
    builds: list[tuple[float, tuple[str, ...]]] = []
    synced: list[int] = []
    step_s: list[float] = []
    written: list[str] = []

    def built(wrapper: DeferredDDP) -> None:
        seeded = tuple(
            f"{name}:{slot.kernel_id}"
            for name, slot in find_slots(model).items()
            if slot.seed is not None
        )
        builds.append((wrapper.built_at or time.time(), seeded))
        ddp = wrapper.ddp
        assert ddp is not None
        synced.append(sum(p.numel() for p in ddp.parameters() if p.requires_grad))

    async with AsyncExitStack() as stack:
        store = None
        if cfg.use_store and ctx.is_leader:
            store = await stack.enter_async_context(KernelStore(cfg.store))
        compiler = RankCompiler(
            ctx,
            device=str(ctx.device),
            workers=cfg.compile_workers,
            store=store,
            options=OptimizerOptions(forms=cfg.forms),
        )
        await stack.enter_async_context(compiler)
        controller = BroadcastController(HeuristicController(cfg.controller, seed=cfg.seed), ctx)
        checkpoints = None if cfg.checkpoints is None else CheckpointStore(cfg.checkpoints)
        policy = None
        if cfg.surgery is not None:
            policy = SurgeryPolicy(cfg.surgery, step=lambda: trainer.step)
        surgeries: list[dict[str, Any]] = []
        restored_state, base_epoch, base_step = None, 0, 0
        if cfg.resume:
            if checkpoints is None:
                raise ValueError("resume needs a checkpoints directory")
            restored = load_checkpoint(
                checkpoints,
                ctx=ctx,
                model=model,
                optimizer=optimizer,
                compiler=compiler,
                controller=controller,
                surgery=policy,
            )
            surgeries = list(restored.record.get("surgery", []))
            restored_state = check_ranks_in_sync(model, ctx)
            base_epoch, base_step = restored.epoch, restored.step
            sampler = data.train.sampler
            assert isinstance(sampler, ShardSampler)
            sampler.epoch = int(restored.record.get("sampler_epoch", base_epoch))
        trainer = Trainer(
            model,
            optimizer=optimizer,
            loss_fn=RankMeanLoss(nn.functional.cross_entropy, ctx),
            controller=controller,
            compiler=compiler,
            device=ctx.device,
            seed=cfg.seed,
            graft="epoch",
            wrap_model=ddp_wrapper(
                device_ids=None if ctx.device.type == "cpu" else [ctx.local_rank],
                on_build=built,
            ),
            surgery=policy,
            progress="off",  # the demo prints its own report
        )
        trainer.grower.continue_from(step=base_step, surgeries=surgeries)
        await compiler.wait_ready()

        def on_epoch(report: EpochReport, fit: FitResult) -> None:
            if cfg.check_every_epoch:
                check_ranks_in_sync(model, ctx)
            if checkpoints is not None:
                sampler = data.train.sampler
                assert isinstance(sampler, ShardSampler)
                path = save_checkpoint(
                    checkpoints,
                    ctx=ctx,
                    epoch=base_epoch + report.epoch + 1,
                    step=trainer.step,
                    model=model,
                    optimizer=optimizer,
                    compiler=compiler,
                    controller=controller,
                    record={"sampler_epoch": sampler.epoch},
                    surgeries=trainer.surgeries,
                    surgery=policy,
                )
                if path is not None:
                    written.append(str(path))

        fit = await trainer.fit(
            _TimedLoader(data.train, step_s), data.val, epochs=cfg.epochs, on_epoch=on_epoch
        )
        final = check_ranks_in_sync(model, ctx)
        germinated = [
            (t, d.slot, d.blueprint.name)
            for t, _, d in controller.decided
            if isinstance(d, Germinate)
        ]
        return DDPDemoResult(
            rank=ctx.rank,
            world_size=ctx.world_size,
            fit=fit,
            final=final,
            restored=restored_state,
            resumed_epoch=base_epoch,
            compiles=compiler.compiles,
            received=compiler.received,
            step_s=step_s,
            ddp_builds=builds,
            ddp_params=synced,
            host_params=sum(p.numel() for p in DigitsHost().parameters()),
            germinated=germinated,
            arrivals=compiler.arrivals,
            checkpoints=written,
            test_acc=_accuracy(model, data.test, ctx.device),
            params=trainer.param_count(),
            surgeries=list(trainer.surgeries),
        )


def distributed_digits_loaders(
    ctx: RankContext,
    *,
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
) -> DigitsLoaders:
    """The splits of :func:`esper_async.apps.data.digits_loaders`, the training one sharded by rank.

    :param ctx: this rank's context.
    :param batch_size: training batch size per rank (the global batch is ``world_size`` times).
    :param seed: seeds the split and the shuffle (the same on every rank).
    :param limit: use only this many images.
    """
    splits = digits_loaders(batch_size=batch_size, seed=seed, limit=limit)
    dataset = splits.train.dataset
    assert isinstance(dataset, Sized)
    sampler = ShardSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    train: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler
    )
    return DigitsLoaders(train=train, val=splits.val, test=splits.test)
