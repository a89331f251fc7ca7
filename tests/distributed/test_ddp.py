"""Growth under DDP: two real processes on gloo, on the CPU.

Each test launches its ranks as separate interpreters with the variables torchrun sets
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). The growth and resume
runs are ``examples/ddp_growth.py``; the checks of the control plane run this file as the rank
program (``python tests/distributed/test_ddp.py <case> <out-dir>``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ddp_growth.py"
WORLD = 2
#: Seconds a whole two-rank launch may take before its ranks are killed.
LAUNCH_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(argv: list[str], out: Path) -> list[dict[str, Any]]:
    """Run ``argv`` as ranks 0 and 1 of a gloo job; return each rank's ``rank<N>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        log = open(out / f"log{rank}.txt", "wb")  # closed below, once the rank ends
        procs.append(
            (subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=log), log)
        )
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=LAUNCH_TIMEOUT_S))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if any(codes):
        tails = [(out / f"log{r}.txt").read_text(errors="replace")[-3000:] for r in range(WORLD)]
        raise AssertionError(f"exit codes {codes}\n" + "\n---\n".join(tails))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _growth(out: Path, store: Path, *extra: str) -> list[dict[str, Any]]:
    argv = [str(EXAMPLE), "--eager", "--limit", "600", "--store", str(store), "--out", str(out)]
    return _launch([*argv, *extra], out)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel store for the module: rank 0 of a later run finds the kernels compiled before."""
    return tmp_path_factory.mktemp("kernels")


def _same_ranks(ranks: list[dict[str, Any]], key: str = "final") -> None:
    first = ranks[0][key]
    for other in ranks[1:]:
        assert other[key]["slots"] == first["slots"]
        assert other[key]["params"] == first["params"]
        assert other[key]["digest"] == first["digest"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("epochs", [pytest.param(6, id="six-epochs-eager")])
def test_growth_run_ends_with_equal_ranks(tmp_path: Path, store: Path, epochs: int) -> None:
    ranks = _growth(tmp_path / "run", store, "--epochs", str(epochs))
    lead, follow = ranks
    _same_ranks(ranks)
    # Every rank applied the same transitions at the same steps.
    assert lead["events"] == follow["events"]
    targets = {e[4] for e in lead["events"]}
    assert {"germinated", "training"} <= targets
    # Kernels were compiled (or found in the store) on rank 0 only and received by rank 1.
    grafts = sum(e[4] == "training" for e in lead["events"])
    assert follow["compiles"] == 0 and lead["received"] == 0
    assert follow["received"] >= grafts >= 1
    # DDP was rebuilt after the structure changed, on both ranks alike.
    assert len(lead["ddp_builds"]) == len(follow["ddp_builds"]) > 1
    assert [k for _, k in lead["ddp_builds"]] == [k for _, k in follow["ddp_builds"]]
    assert lead["ddp_builds"][-1][1], "no seed was grafted by the end"
    # Dormant slots cost DDP nothing: before any graft it synchronises the bare host's parameters.
    assert lead["ddp_params"][0] == lead["host_params"]
    assert lead["ddp_params"][-1] > lead["host_params"]
    assert lead["steps"] == follow["steps"] > 0
    assert lead["val_loss"] == follow["val_loss"]
    # RankMeanLoss: the training loss every rank's step guard judged is the same on every rank.
    assert lead["train_loss"] == follow["train_loss"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("epochs", [pytest.param((3, 2), id="three-then-two")])
def test_resume_from_rank0_checkpoint(tmp_path: Path, store: Path, epochs: tuple[int, int]) -> None:
    first, second = epochs
    ckpt = tmp_path / "checkpoints"
    common = ["--max-live", "1", "--checkpoints", str(ckpt)]
    before = _growth(tmp_path / "a", store, "--epochs", str(first), *common)
    _same_ranks(before)
    written = before[0]["checkpoints"]
    assert written and before[1]["checkpoints"] == written
    assert written[-1].endswith(f"ckpt-{first:08d}.pt"), written
    assert all(Path(p).parent == ckpt for p in written)
    live = [s for s in before[0]["final"]["slots"] if s[3] is not None]
    assert live, "the first run should end with a grafted seed"

    after = _growth(tmp_path / "b", store, "--epochs", str(second), *common, "--resume")
    # Every rank restored rank 0's checkpoint: the state the first run ended in.
    for rank in after:
        assert rank["resumed_epoch"] == first
        assert rank["restored"]["digest"] == before[0]["final"]["digest"]
        assert rank["restored"]["slots"] == before[0]["final"]["slots"]
    _same_ranks(after, "restored")
    _same_ranks(after)
    assert after[0]["events"] == after[1]["events"]
    # The restored seed went on with its life from the bytes in the checkpoint (no compile).
    slot = live[0][0]
    moves = [(e[3], e[4]) for e in after[0]["events"] if e[2] == slot]
    assert moves and moves[0][0] == live[0][1]
    assert ("germinated", "training") not in moves


@pytest.mark.timeout(240)
def test_surgery_under_ddp_is_the_same_on_every_rank_and_resumes(
    tmp_path: Path, store: Path
) -> None:
    ckpt = tmp_path / "checkpoints"
    common = ["--surgery", "--checkpoints", str(ckpt)]
    first = _growth(tmp_path / "a", store, "--epochs", "8", *common)
    _same_ranks(first)
    lead, follow = first
    assert lead["surgeries"], "no slot was widened (no seed fossilized?)"
    assert lead["surgeries"] == follow["surgeries"]
    assert {s["op"] for s in lead["surgeries"]} == {"widen_slot"}
    # The widened parameters were all-reduced by a DDP rebuilt around them, on both ranks alike.
    assert lead["ddp_params"] == follow["ddp_params"]
    assert lead["ddp_params"][-1] > max(lead["ddp_params"][:-1])
    second = _growth(tmp_path / "b", store, "--epochs", "2", "--resume", *common)
    _same_ranks(second)
    for rank in second:
        # Every rank replayed the surgeries on its fresh model, then loaded rank 0's tensors.
        assert rank["restored"]["digest"] == lead["final"]["digest"]
        assert rank["surgeries"][: len(lead["surgeries"])] == lead["surgeries"]


@pytest.mark.parametrize(
    ("size", "world"), [pytest.param(10, 2, id="even"), pytest.param(11, 3, id="padded")]
)
def test_shard_sampler_shards_and_reshuffles_every_epoch(size: int, world: int) -> None:
    from esper_async.distributed import ShardSampler

    data = list(range(size))
    samplers = [ShardSampler(data, num_replicas=world, rank=r, seed=3) for r in range(world)]
    first = [list(s) for s in samplers]
    second = [list(s) for s in samplers]
    assert len({len(shard) for shard in first}) == 1  # every rank takes the same number of steps
    assert set().union(*map(set, first)) == set(data)
    assert first != second  # the trainer never calls set_epoch; the sampler moves on itself
    assert all(s.epoch == 2 for s in samplers)


def test_rank_state_sees_structure_and_parameters() -> None:
    import torch

    from esper_async.apps.demo import DigitsHost
    from esper_async.distributed import rank_state
    from esper_async.seeds import find_slots, wrap

    torch.manual_seed(0)
    model = DigitsHost()
    wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    base = rank_state(model, 0)
    assert [s[0] for s in base.slots] == ["conv1", "fc1"]
    assert rank_state(model, 1).structure == base.structure
    assert rank_state(model, 1).digest == base.digest
    find_slots(model)["fc1"].alpha = 0.5
    assert rank_state(model, 0).structure != base.structure
    find_slots(model)["fc1"].alpha = 0.0
    with torch.no_grad():
        model.head.bias[0] += 1e-6
    moved = rank_state(model, 0)
    assert moved.structure == base.structure and moved.digest != base.digest


def _fits(blueprint: Any, contract: Any) -> bool:
    from esper_async.errors import BlueprintError

    try:
        blueprint.check_fits(contract)
    except BlueprintError:
        return False
    return True


def _check_control(out: Path) -> None:
    """Rank program: decisions come from rank 0; divergence is caught, on every rank."""
    import anyio
    import torch

    from esper_async.apps.demo import DigitsHost
    from esper_async.blueprints import library
    from esper_async.control._controller import Cull, EpochReport
    from esper_async.distributed import (
        BroadcastController,
        ControllerBroadcastError,
        RankCompiler,
        RankDivergenceError,
        RankMeanLoss,
        check_ranks_in_sync,
        init_distributed,
    )
    from esper_async.errors import CompileError
    from esper_async.seeds import find_slots, wrap

    ctx = init_distributed(backend="gloo")
    found: dict[str, Any] = {"rank": ctx.rank}
    torch.manual_seed(0)
    model = DigitsHost()
    wrap(model, ["conv1"], example_input=torch.zeros(2, 1, 8, 8))
    slots = find_slots(model)
    report = EpochReport(epoch=0, train_loss=1.0, val_loss=1.0, val_acc=0.5)

    class PerRank:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def decide(self, *_: object) -> list[Cull]:
            if self.fail:
                raise RuntimeError("no decision today")
            return [Cull("conv1", f"decided on rank {ctx.rank}")]

    decisions = BroadcastController(PerRank(False), ctx).decide(report, [], slots)
    found["reasons"] = [d.reason for d in decisions]
    try:
        BroadcastController(PerRank(True), ctx).decide(report, [], slots)
    except (ControllerBroadcastError, RuntimeError) as exc:
        found["controller_error"] = type(exc).__name__

    async def compile_too_slowly() -> str:
        # A compile deadline no compile can meet: rank 0's failure must reach rank 1 as an error.
        contract = slots["conv1"].contract
        assert contract is not None
        blueprint = next(b for b in library() if _fits(b, contract))
        async with RankCompiler(ctx, workers=1, timeout=0.01) as compiler:
            try:
                await compiler.compile(blueprint, contract, seed=0)
            except CompileError as exc:
                return f"{type(exc).__name__}: {exc}"
        return "compiled"

    found["compile_failure"] = anyio.run(compile_too_slowly)

    weight = torch.tensor([float(ctx.rank + 1)], requires_grad=True)
    mean_loss = RankMeanLoss(lambda a, b: (a * b).sum(), ctx)(weight, torch.tensor([2.0]))
    mean_loss.backward()
    assert weight.grad is not None
    found["mean_loss"] = [float(mean_loss), float(weight.grad)]
    found["in_sync_digest"] = check_ranks_in_sync(model, ctx).digest
    if ctx.rank == 1:
        with torch.no_grad():
            model.head.bias[0] += 0.25
    try:
        check_ranks_in_sync(model, ctx)
    except RankDivergenceError as exc:
        found["params"] = [exc.field, list(exc.ranks), exc.max_abs_diff]
    with torch.no_grad():
        model.head.bias[0] -= 0.25 if ctx.rank == 1 else 0.0
    if ctx.rank == 1:
        slots["conv1"].alpha = 0.5
    try:
        check_ranks_in_sync(model, ctx)
    except RankDivergenceError as exc:
        found["structure"] = [exc.field, list(exc.ranks)]
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(found))
    ctx.close()


@pytest.mark.timeout(120)
def test_control_plane_broadcasts_fails_alike_and_catches_divergence(tmp_path: Path) -> None:
    ranks = _launch([str(Path(__file__).resolve()), "control", str(tmp_path)], tmp_path)
    lead, follow = ranks
    assert lead["reasons"] == follow["reasons"] == ["decided on rank 0"]
    assert lead["controller_error"] == "RuntimeError"
    assert follow["controller_error"] == "ControllerBroadcastError"
    assert lead["compile_failure"].startswith("CompileTimeoutError")
    assert follow["compile_failure"].startswith("CompileError: rank 0 could not compile")
    assert "CompileTimeoutError" in follow["compile_failure"]
    # The loss value is the ranks' mean (2 and 4), the gradient each rank's own (2).
    assert lead["mean_loss"] == follow["mean_loss"] == [3.0, 2.0]
    assert lead["in_sync_digest"] == follow["in_sync_digest"]
    for rank in ranks:
        field, odd, diff = rank["params"]
        assert (field, odd) == ("parameters", [1])
        assert diff == pytest.approx(0.25)
        assert rank["structure"] == ["structure", [1]]


def _check_fault(out: Path, oom: bool = False) -> None:
    """Rank program: a seed fails on rank 1's data only (raises, or runs out of memory); both
    ranks blame it, for the same kind of failure, and cull it alike."""
    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from esper_async.apps.demo import DigitsHost
    from esper_async.blueprints import build, library
    from esper_async.distributed import RankMeanLoss, check_ranks_in_sync, init_distributed
    from esper_async.errors import SeedRuntimeError
    from esper_async.reliability import Governor, is_out_of_memory
    from esper_async.reliability._errors import LossAnomaly
    from esper_async.seeds import find_slots, wrap
    from esper_async.training import ClassificationTask
    from esper_async.training._guard import StepGuard

    ctx = init_distributed(backend="gloo")
    torch.manual_seed(0)
    model = DigitsHost()
    wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    slots = find_slots(model)
    for name, slot in slots.items():
        assert slot.contract is not None
        blueprint = next(b for b in library(slot.contract.kind) if _fits(b, slot.contract))
        slot.germinate(blueprint)
        slot.graft(build(blueprint, slot.contract, seed=0), f"kernel-{name}")

    class BreaksOnRankOne(nn.Module):
        """The fc1 seed: from its third call on, it raises on rank 1 (on that rank's data)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if ctx.rank == 1 and self.calls >= 3:
                if oom:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated on this shard)")
                raise RuntimeError("bad input on this shard")
            return self.inner(h)

    assert slots["fc1"].seed is not None
    slots["fc1"].seed = BreaksOnRankOne(slots["fc1"].seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ddp = DistributedDataParallel(model)
    task = ClassificationTask(RankMeanLoss(nn.functional.cross_entropy, ctx))
    governor = Governor()
    guard = StepGuard(lambda b: task.forward(ddp, b), optimizer, slots, governor, task.loss_fn,
                      run_model=lambda b: ddp(task.inputs(b)))

    def guarded_step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:  # as Trainer._step
        optimizer.zero_grad(set_to_none=True)
        loss = None
        try:
            _, loss = task.forward(ddp, batch)
        except SeedRuntimeError as exc:
            guard.forward_failed(exc)
        value = guard.judge(loss, batch)
        assert loss is not None
        guard.backward(loss, value)
        optimizer.step()
        governor.accept(value)
        return value

    gen = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own shard
    events: list[list[Any]] = []
    losses = []
    for step in range(6):
        x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for _ in range(len(slots) + 1):
            try:
                losses.append(guarded_step((x, y)))
                break
            except SeedRuntimeError as exc:
                events.append([step, exc.slot, is_out_of_memory(exc)])
                slots[exc.slot].cull("failed")
                ddp = DistributedDataParallel(model)  # the structure changed: re-wrap
            except LossAnomaly as exc:
                events.append([step, f"anomaly: {exc}"])
                break
    found = {"events": events, "losses": losses,
             "digest": check_ranks_in_sync(model, ctx).digest,
             "states": {n: s.state.value for n, s in slots.items()}}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(found))
    ctx.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["fault", "fault-oom"])
def test_a_seed_failing_on_one_rank_is_culled_on_every_rank(tmp_path: Path, case: str) -> None:
    lead, follow = _launch([str(Path(__file__).resolve()), case, str(tmp_path)], tmp_path)
    # Rank 1's seed failed at the third step; rank 0's did not, yet both blamed it there, for
    # the same kind of failure (an OOM also pauses growth, so the ranks must agree on it).
    assert lead["events"] == follow["events"] == [[2, "fc1", case == "fault-oom"]]
    assert lead["states"] == follow["states"] == {"conv1": "training", "fc1": "culled"}
    assert lead["losses"] == follow["losses"] and len(lead["losses"]) == 6
    assert lead["digest"] == follow["digest"]


if __name__ == "__main__":
    cases = {
        "control": _check_control,
        "fault": _check_fault,
        "fault-oom": lambda out: _check_fault(out, oom=True),
    }
    if sys.argv[1] not in cases:
        sys.exit(f"no rank program {sys.argv[1]!r}; the cases are {sorted(cases)}")
    cases[sys.argv[1]](Path(sys.argv[2]))
