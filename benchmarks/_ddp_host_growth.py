"""The host-growth run of ``bench_distributed.py --host-growth``: one rank's program and the
summary of a launch's ranks.

Each rank trains the start GPT on its own shard of Shakespeare under DDP, then at one step boundary
receives rank 0's growth plan (operation records, broadcast on the control channel), applies each
operation in a surgery transaction (timed on this rank; ``check_ranks_in_sync`` after each),
rebuilds DDP around the grown model and trains on at the target size.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from _common import machine


def step_stats(step_s: list[float]) -> dict[str, float]:
    """Median, mean and p90 of step times, in milliseconds."""
    ms = sorted(1e3 * s for s in step_s)
    return {
        "median_ms": round(statistics.median(ms), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 4),
        "steps": len(ms),
    }


#: Per mode: the start GPT (n_layer, n_embd, n_head), the target (n_layer, n_embd; heads keep the
#: start's head size), context T and batch per rank. The full start is 3 blocks of width 128
#: (2 heads of 64); its target nanoGPT's shakespeare_char shape, 6 x 384 (6 heads of 64, MLP
#: 1536). The quick one is a tiny GPT for a CPU.
HOST_SIZES = {
    "full": {"start": (3, 128, 2), "target": (6, 384), "block_size": 256, "batch": 64},
    "quick": {"start": (1, 32, 1), "target": (2, 64), "block_size": 32, "batch": 8},
}


def host_plan(mode: str) -> list[dict[str, Any]]:
    """Rank 0's decision: the operation records that grow the start GPT to its target (residual
    width and heads, each MLP's hidden width to 4 x, then depth by G_stack)."""
    from esper_async.surgery import StackBlocks, Widen, WidenResidual, operation_record

    sizes = HOST_SIZES[mode]
    start_layers, _, _ = sizes["start"]
    layers, width = sizes["target"]
    ops: list[Any] = [WidenResidual(width, seed=0)]
    ops += [Widen(f"blocks.{i}.mlp.fc", 4 * width, seed=i) for i in range(start_layers)]
    ops.append(StackBlocks("blocks", layers // start_layers, "whole"))
    return [operation_record(op) for op in ops]


def host_rank_program(args: argparse.Namespace) -> None:
    """One rank of the host-growth run: train the start GPT, grow it at one step boundary by
    rank 0's broadcast records (each op timed on this rank, ranks checked after each), rebuild
    DDP, train on; rank 0 writes every rank's figures."""
    import time

    import anyio
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from esper_async.apps.gpt import GPT, GPTConfig
    from esper_async.apps.shakespeare import load_shakespeare
    from esper_async.distributed import RankDivergenceError, check_ranks_in_sync, init_distributed
    from esper_async.surgery import ModelSurgeon, operation_from_record, operation_record

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ctx = init_distributed(backend=args.backend)
    mode = "quick" if args.quick else "full"
    sizes = HOST_SIZES[mode]
    n_layer, n_embd, n_head = sizes["start"]
    block_size, batch = sizes["block_size"], sizes["batch"]
    device = ctx.device
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        data = load_shakespeare()
        total = 2 * (args.warmup + args.steps) + 2
        loader = data.train_batches(  # this rank's own stream of windows: its shard
            batch_size=batch,
            block_size=block_size,
            batches_per_epoch=total,
            seed=1000 * args.seed + ctx.rank,
        )
        batches = iter(loader)
        probe = next(iter(data.eval_batches(batch_size=4, block_size=block_size, max_batches=1)))
        probe_x, probe_y = probe[0].to(device), probe[1].to(device)
        torch.manual_seed(args.seed)  # the same initial GPT on every rank
        config = GPTConfig(
            data.vocab.size, block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd
        )
        model = GPT(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
        ids = None if device.type == "cpu" else [ctx.local_rank]
        ddp = DistributedDataParallel(model, device_ids=ids)

        def step(wrapper: Any) -> tuple[float, float]:
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            sync()
            started = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = wrapper(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            opt.step()
            sync()
            return time.perf_counter() - started, float(loss.detach())

        def probe_loss() -> float:
            with torch.no_grad():
                logits = model(probe_x)
                return float(
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), probe_y.reshape(-1))
                )

        def phase(wrapper: Any) -> dict[str, Any]:
            first = [step(wrapper) for _ in range(args.warmup)]
            timed = [step(wrapper) for _ in range(args.steps)]
            return {
                "warmup_step_s": [round(s, 6) for s, _ in first],
                "step_s": [s for s, _ in timed],
                "loss_first_last": [timed[0][1], timed[-1][1]],
            }

        found: dict[str, Any] = {"rank": ctx.rank, "device": str(device)}
        found["params_before"] = sum(p.numel() for p in model.parameters())
        found["before"] = phase(ddp)
        sync()
        started = time.perf_counter()
        plan = ctx.channel.broadcast_object(host_plan(mode) if ctx.is_leader else None, src=0)
        found["broadcast_s"] = time.perf_counter() - started
        surgeon, growth, in_sync = ModelSurgeon(), [], True
        # Surgery validates function preservation at rtol 1e-4: TF32 matmuls of the old and the
        # new shapes round differently, so growth runs in full FP32 (training goes on in TF32).
        torch.backends.cuda.matmul.allow_tf32 = False
        for record in plan:
            op = operation_from_record(record)
            loss_before = probe_loss()
            sync()
            started = time.perf_counter()
            anyio.run(lambda op=op: surgeon.apply(model, opt, op, probe=probe_x[:2]))
            sync()
            seconds = time.perf_counter() - started
            checked = time.perf_counter()
            try:
                digest = check_ranks_in_sync(model, ctx).digest
            except RankDivergenceError as exc:
                digest, in_sync = f"diverged: {exc}", False
            growth.append(
                {
                    "record": operation_record(op),
                    "seconds": seconds,
                    "check_s": time.perf_counter() - checked,
                    "probe_loss_before_after": [loss_before, probe_loss()],
                    "digest": digest,
                }
            )
        torch.backends.cuda.matmul.allow_tf32 = True
        found["growth"] = growth
        started = time.perf_counter()
        del ddp
        ddp = DistributedDataParallel(model, device_ids=ids)  # rebuilt around the grown model
        sync()
        found["ddp_rebuild_s"] = time.perf_counter() - started
        found["ddp_params_after"] = sum(p.numel() for p in ddp.parameters())
        found["params_after"] = sum(p.numel() for p in model.parameters())
        found["target_shapes"] = _matches_target(model, data.vocab.size, mode)
        found["after"] = phase(ddp)
        try:
            found["final_digest"] = check_ranks_in_sync(model, ctx).digest
        except RankDivergenceError as exc:
            found["final_digest"], in_sync = f"diverged: {exc}", False
        found["in_sync"] = in_sync
        ranks = ctx.channel.all_gather_object(found)
        if ctx.is_leader:
            out = Path(args.workdir) / f"world{ctx.world_size}.json"
            out.write_text(json.dumps({"machine": machine(), "ranks": ranks}))
    finally:
        ctx.close()


def _matches_target(model: Any, vocab: int, mode: str) -> bool:
    """Whether the grown GPT has exactly the state-dict shapes of a GPT built at the target."""
    from esper_async.apps.gpt import GPT, GPTConfig

    sizes = HOST_SIZES[mode]
    layers, width = sizes["target"]
    heads = width // (sizes["start"][1] // sizes["start"][2])
    built = GPT(GPTConfig(vocab, sizes["block_size"], n_layer=layers, n_head=heads, n_embd=width))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes == {k: tuple(v.shape) for k, v in built.state_dict().items()}


def host_summary(world: int, data: dict[str, Any]) -> dict[str, Any]:
    ranks = data["ranks"]
    lead = ranks[0]
    summary: dict[str, Any] = {"world_size": world}
    for when in ("before", "after"):
        per_rank = [step_stats(r[when]["step_s"]) for r in ranks]
        summary[f"per_rank_step_{when}"] = per_rank
        summary[f"slowest_median_ms_{when}"] = max(s["median_ms"] for s in per_rank)
        summary[f"first_step_ms_{when}"] = [
            round(1e3 * r[when]["warmup_step_s"][0], 3) for r in ranks
        ]
        summary[f"loss_first_last_{when}"] = [
            [round(v, 4) for v in r[when]["loss_first_last"]] for r in ranks
        ]
    summary["growth"] = [
        {
            "op": g["record"]["op"],
            "record": {k: v for k, v in g["record"].items() if k != "plan"},
            "seconds_per_rank": [round(r["growth"][i]["seconds"], 4) for r in ranks],
            "check_ranks_in_sync_s_per_rank": [round(r["growth"][i]["check_s"], 4) for r in ranks],
            "probe_loss_before_after_rank0": [round(v, 5) for v in g["probe_loss_before_after"]],
            "ranks_identical": len({r["growth"][i]["digest"] for r in ranks}) == 1,
        }
        for i, g in enumerate(lead["growth"])
    ]
    summary["growth_total_s_per_rank"] = [
        round(sum(g["seconds"] for g in r["growth"]), 4) for r in ranks
    ]
    summary["plan_broadcast_s_per_rank"] = [round(r["broadcast_s"], 4) for r in ranks]
    summary["ddp_rebuild_s_per_rank"] = [round(r["ddp_rebuild_s"], 4) for r in ranks]
    summary["params_before_after"] = [lead["params_before"], lead["params_after"]]
    summary["ddp_params_after"] = [r["ddp_params_after"] for r in ranks]
    summary["grown_to_target_shapes"] = all(r["target_shapes"] for r in ranks)
    summary["same_records_on_every_rank"] = all(
        [g["record"] for g in r["growth"]] == [g["record"] for g in lead["growth"]] for r in ranks
    )
    summary["ranks_identical"] = (
        all(r["in_sync"] for r in ranks)
        and len({r["final_digest"] for r in ranks}) == 1
        and all(g["ranks_identical"] for g in summary["growth"])
    )
    summary["final_digest"] = lead["final_digest"][:16]
    return summary
