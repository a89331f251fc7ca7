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


def _proposals(choose: random.Random) -> dict[str, list[dict[str, Any]]]:
    """What rank 0 decides, per host: growth records with choices drawn from its generator."""
    return {
        "gpt": [
            {
                "op": "stack_blocks",
                "blocks": "blocks",
                "factor": 2,
                "indices": None,
                "mode": choose.choice(["whole", "interleave"]),
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
        ],
        "user": [
            {
                "op": "widen_residual",
                "width": 48,
                "seed": choose.randrange(10_000),
                "embedding": None,
                "head_dim": None,
                "grow_heads": True,
            },
            {
                "op": "widen_gated",
                "gate": "layers.1.mlp.gate",
                "up": "layers.1.mlp.up",
                "width": 144 + choose.randrange(1, 9),
                "seed": choose.randrange(10_000),
            },
        ],
        "cnn": [
            {
                "op": "widen_channels",
                "target": "layer1.0.conv2",
                "width": 6 + choose.randrange(2, 9),
                "seed": choose.randrange(10_000),
            },
        ],
    }


def _grow(out: Path) -> None:
    """Rank program: grow a GPT (three times), a user's transformer (twice) and a CNN under DDP,
    each then resumed from rank 0's checkpoint."""
    import torch

    sys.path.insert(0, str(ROOT))
    from esper_async.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(backend="gloo")
    found = {host: _grow_host(ctx, host, out) for host in ("gpt", "user", "cnn")}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(found))
    ctx.close()


def _grow_host(ctx: Any, host: str, out: Path) -> dict[str, Any]:
    import anyio
    import torch
    import torch.nn.functional as F
    from tests.surgery._helpers import TinyNet, images
    from tests.surgery._host_models import UserLM, adamw, tiny_gpt, tokens
    from torch.nn.parallel import DistributedDataParallel

    from esper_async.distributed import check_ranks_in_sync
    from esper_async.surgery import (
        ModelSurgeon,
        operation_from_record,
        operation_record,
        replay_operations,
    )

    def build() -> Any:
        return {"gpt": tiny_gpt, "user": UserLM, "cnn": TinyNet}[host]()

    def batch(seed: int) -> Any:
        return images(8, seed=seed) if host == "cnn" else tokens(seed=seed)

    probe = batch(99)[0][:4]
    torch.manual_seed(0)  # the same initial model on every rank
    model = build()
    opt = adamw(model)
    ddp = DistributedDataParallel(model)
    found: dict[str, Any] = {"decided": [], "digests": [], "after_training": [], "ddp": []}

    def step(wrapper: Any, optimizer: Any, seed: int) -> float:
        x, y = batch(seed * ctx.world_size + ctx.rank)  # each rank its own shard
        optimizer.zero_grad(set_to_none=True)
        logits = wrapper(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def settle(wrapper: Any) -> None:
        """DDP broadcasts rank 0's buffers (batch-norm statistics) at the start of a forward;
        each rank's last training forward then updated its own. An eval forward syncs them."""
        wrapper.eval()
        with torch.no_grad():
            wrapper(probe)
        wrapper.train()

    for s in range(2):
        step(ddp, opt, s)
    mine = _proposals(random.Random(1000 + ctx.rank))[host]  # what this rank would choose
    records = []
    for i in range(len(mine)):
        decided = ctx.channel.broadcast_object(mine[i] if ctx.is_leader else None, src=0)
        found["decided"].append(decided)
        op = operation_from_record(decided)
        anyio.run(lambda op=op: ModelSurgeon().apply(model, opt, op, probe=probe))
        records.append(operation_record(op))
        ddp = DistributedDataParallel(model)  # rebuilt around the grown parameters
        found["ddp"].append(sum(p.numel() for p in ddp.parameters()))
        found["digests"].append(check_ranks_in_sync(model, ctx).digest)
        for s in range(2):
            step(ddp, opt, 10 * (i + 1) + s)
        settle(ddp)
        found["after_training"].append(check_ranks_in_sync(model, ctx).digest)

    path = out / f"{host}.pt"
    if ctx.is_leader:
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "records": records}, path
        )
    ctx.barrier()
    saved = torch.load(path, weights_only=False)
    torch.manual_seed(ctx.rank + 7)  # the resumed model's own initial values do not matter
    fresh = build()
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
    found["parameters"] = sum(p.numel() for p in model.parameters())
    settle(fresh_ddp)
    found["final"] = check_ranks_in_sync(fresh, ctx).digest
    return found


@pytest.mark.timeout(240)
def test_host_growth_is_decided_once_applied_everywhere_and_resumes(tmp_path: Path) -> None:
    from .test_ddp import _launch

    lead, follow = _launch([str(Path(__file__).resolve()), "grow", str(tmp_path)], tmp_path)
    decided = _proposals(random.Random(1000))
    assert _proposals(random.Random(1001)) != decided  # rank 1 alone would have chosen otherwise
    for host in ("gpt", "user", "cnn"):
        a, b = lead[host], follow[host]
        assert a["decided"] == b["decided"] == decided[host]  # rank 0's decisions, everywhere
        assert a["records"] == b["records"]
        # DDP was rebuilt around each grown model: it holds every new parameter
        assert (
            a["ddp"] == b["ddp"]
            and a["ddp"] == sorted(a["ddp"])
            and len(set(a["ddp"])) == len(a["ddp"])
        )
        assert a["ddp"][-1] == a["parameters"]
        # identical ranks right after each growth, and after training on different shards
        assert a["digests"] == b["digests"]
        assert a["after_training"] == b["after_training"]
        assert len(set(a["after_training"])) == len(a["after_training"])
        # the resume from rank 0's checkpoint is exact on every rank
        assert a["resume_exact"] and b["resume_exact"]
        assert a["resumed_digest"] == b["resumed_digest"] == a["after_training"][-1]
        assert a["final"] == b["final"]


if __name__ == "__main__":
    if sys.argv[1] != "grow":
        sys.exit(f"no rank program {sys.argv[1]!r}; the case is 'grow'")
    _grow(Path(sys.argv[2]))
