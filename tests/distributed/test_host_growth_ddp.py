"""Host growth under DDP: two real gloo processes on the CPU.

Rank 0 decides each growth (from its own random generator, which differs by rank) and broadcasts
it as a record; every rank applies it in a surgery transaction, rebuilds DDP around the grown
model, and checks that the ranks are identical (:func:`check_ranks_in_sync`) right after the
growth and again after training on different data shards (only DDP's all-reduce keeps them
equal, so the rebuilt DDP covers the new parameters). A checkpoint written by rank 0 after the
growths is resumed on every rank (a fresh model, the records replayed, the tensors loaded) and
its next step is bitwise the live model's. The rank program is this file:
``python tests/distributed/test_host_growth_ddp.py grow <out-dir>``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _proposals(choose: random.Random) -> list[dict[str, Any]]:
    """What rank 0 decides: the growth records, with choices drawn from its generator."""
    return [
        {
            "op": "stack_blocks",
            "blocks": "blocks",
            "factor": 2,
            "mode": choose.choice(["whole", "interleave"]),
            "indices": None,
        },
        {
            "op": "insert_identity_blocks",
            "blocks": "blocks",
            "after": [choose.randrange(4)],
            "zero": None,
        },
        {
            "op": "widen_residual",
            "width": 48,
            "seed": choose.randrange(10_000),
            "embedding": None,
            "head_dim": None,
        },
    ]


def _grow(out: Path) -> None:
    """Rank program: grow a GPT three times under DDP, then resume from rank 0's checkpoint."""
    import anyio
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(ROOT))
    from tests.surgery._host_models import VOCAB, adamw, tiny_gpt, tokens

    from esper_async.distributed import check_ranks_in_sync, init_distributed
    from esper_async.surgery import (
        ModelSurgeon,
        operation_from_record,
        operation_record,
        replay_operations,
    )

    torch.set_num_threads(1)
    ctx = init_distributed(backend="gloo")
    torch.manual_seed(0)  # the same initial model on every rank
    model = tiny_gpt()
    opt = adamw(model)
    ddp = DistributedDataParallel(model)
    found: dict[str, Any] = {"decided": [], "digests": [], "after_training": [], "ddp": []}

    def step(wrapper: Any, optimizer: Any, seed: int) -> float:
        x, y = tokens(seed=seed * ctx.world_size + ctx.rank)  # each rank its own shard
        optimizer.zero_grad(set_to_none=True)
        logits = wrapper(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for s in range(2):
        step(ddp, opt, s)
    mine = _proposals(random.Random(1000 + ctx.rank))  # what this rank would have chosen
    records = []
    for i in range(len(mine)):
        decided = ctx.channel.broadcast_object(mine[i] if ctx.is_leader else None, src=0)
        found["decided"].append(decided)
        op = operation_from_record(decided)
        anyio.run(lambda op=op: ModelSurgeon().apply(model, opt, op, probe=tokens(seed=99)[0]))
        records.append(operation_record(op))
        ddp = DistributedDataParallel(model)  # rebuilt around the grown parameters
        found["ddp"].append(sum(p.numel() for p in ddp.parameters()))
        found["digests"].append(check_ranks_in_sync(model, ctx).digest)
        for s in range(2):
            step(ddp, opt, 10 * (i + 1) + s)
        found["after_training"].append(check_ranks_in_sync(model, ctx).digest)

    path = out / "checkpoint.pt"
    if ctx.is_leader:
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "records": records}, path
        )
    ctx.barrier()
    saved = torch.load(path, weights_only=False)
    fresh = tiny_gpt()
    fresh_opt = adamw(fresh)
    replay_operations(fresh, fresh_opt, saved["records"])
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    found["resumed_digest"] = check_ranks_in_sync(fresh, ctx).digest
    fresh_ddp = DistributedDataParallel(fresh)
    live = [step(ddp, opt, 50 + s) for s in range(2)]
    resumed = [step(fresh_ddp, fresh_opt, 50 + s) for s in range(2)]
    found["resume_exact"] = live == resumed and all(
        torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    found["records"] = records
    found["shape"] = [len(model.blocks), model.wte.weight.shape[1]]
    found["final"] = check_ranks_in_sync(fresh, ctx).digest
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(found))
    ctx.close()


@pytest.mark.timeout(240)
def test_host_growth_is_decided_once_applied_everywhere_and_resumes(tmp_path: Path) -> None:
    from .test_ddp import _launch

    lead, follow = _launch([str(Path(__file__).resolve()), "grow", str(tmp_path)], tmp_path)
    # rank 1 would have chosen otherwise; both applied rank 0's decisions
    assert _proposals(random.Random(1001)) != lead["decided"]
    assert lead["decided"] == follow["decided"] == _proposals(random.Random(1000))
    assert lead["records"] == follow["records"]
    assert lead["shape"] == follow["shape"] == [5, 48]
    # DDP was rebuilt around each grown model: it holds every new parameter
    assert lead["ddp"] == follow["ddp"] and lead["ddp"] == sorted(lead["ddp"])
    assert len(set(lead["ddp"])) == 3
    # identical ranks right after each growth, and after training on different shards
    assert lead["digests"] == follow["digests"]
    assert lead["after_training"] == follow["after_training"]
    assert len(set(lead["after_training"])) == 3
    # the resume from rank 0's checkpoint is exact on every rank
    assert lead["resume_exact"] and follow["resume_exact"]
    assert lead["resumed_digest"] == follow["resumed_digest"] == lead["after_training"][-1]
    assert lead["final"] == follow["final"]


if __name__ == "__main__":
    if sys.argv[1] != "grow":
        sys.exit(f"no rank program {sys.argv[1]!r}; the case is 'grow'")
    _grow(Path(sys.argv[2]))
