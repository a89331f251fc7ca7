"""The data-parallel checkpoint path (``distributed.save_checkpoint`` / ``load_checkpoint``) in a
real one-rank gloo job: a damaged newest checkpoint is skipped for the one before, and a directory
without checkpoints is an error that says where rank 0 looked. (Two-process resumes are in
``tests/distributed/test_ddp.py``.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing
import torch
import torch.distributed as dist
from _helpers import grow, host, train

from esper_async.distributed import RankCompiler, RankContext, load_checkpoint, save_checkpoint
from esper_async.reliability import CheckpointError, CheckpointStore
from esper_async.seeds import find_slots


@pytest.fixture
def ctx() -> Iterator[RankContext]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield RankContext.from_process_group()
    finally:
        dist.destroy_process_group()


def _written(ctx: RankContext, directory: Path) -> CheckpointStore:
    store = CheckpointStore(directory)
    model = host()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    compiler = RankCompiler(ctx)
    kernel = grow(model, optimizer, "0", rank=2)
    compiler.kernels[kernel.kernel_id] = kernel
    for epoch in (1, 2):
        train(model, optimizer, 3, seed=epoch)
        save_checkpoint(store, ctx=ctx, epoch=epoch, step=3 * epoch, model=model,
                        optimizer=optimizer, compiler=compiler)
    return store


def test_a_damaged_newest_checkpoint_falls_back_on_every_rank(
    ctx: RankContext, tmp_path: Path
) -> None:
    store = _written(ctx, tmp_path)
    older, newer = store.paths()
    expected = store.read(older)
    data = bytearray(newer.read_bytes())
    data[len(data) // 2] ^= 0x01
    newer.write_bytes(bytes(data))

    model = host()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    compiler = RankCompiler(ctx)
    with structlog.testing.capture_logs() as logs:
        restored = load_checkpoint(store, ctx=ctx, model=model, optimizer=optimizer,
                                   compiler=compiler)
    assert (restored.epoch, restored.step) == (1, 3)
    state = model.state_dict()
    assert state.keys() == expected["model"].keys()
    assert all(torch.equal(state[k], expected["model"][k]) for k in state)
    assert find_slots(model)["0"].seed is not None and set(compiler.kernels) == set(
        expected["kernels"]
    )
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["path"] == str(newer) and "rank 0: is damaged" in warning["error"]


def test_no_checkpoint_is_an_error_saying_where_rank_0_looked(
    ctx: RankContext, tmp_path: Path
) -> None:
    model = host()
    with pytest.raises(CheckpointError, match=rf"looked for ckpt-.* in {re.escape(str(tmp_path))}"):
        load_checkpoint(CheckpointStore(tmp_path), ctx=ctx, model=model,
                        optimizer=torch.optim.Adam(model.parameters()), compiler=RankCompiler(ctx))


@pytest.mark.asyncio
async def test_a_trainers_grower_is_the_whole_distributed_checkpoint(
    ctx: RankContext, tmp_path: Path
) -> None:
    """``grower=``: the grower's one state path; the resumed trainer continues at the saved step
    and epoch with the saved governor and record, nothing set by hand."""
    from esper_async import Trainer

    store = CheckpointStore(tmp_path)
    model = host()
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    trainer = Trainer(model, grow=False)
    await trainer.fit(batches, batches[:1], epochs=2)
    assert save_checkpoint(store, ctx=ctx, grower=trainer.grower) is not None

    fresh = Trainer(host(), grow=False)
    restored = load_checkpoint(store, ctx=ctx, grower=fresh.grower)
    assert (restored.epoch, restored.step) == (2, trainer.step)
    assert (fresh.step, fresh.epoch) == (trainer.step, 2)
    assert fresh.governor.state_dict() == trainer.governor.state_dict()
    assert [r.val_loss for r in fresh.result.history] == [
        r.val_loss for r in trainer.result.history]
    state, saved = fresh.model.state_dict(), model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
