"""Surgery on a sharded model is refused: FSDP (``FullyShardedDataParallel``, ``fully_shard``) and
DTensor parameters, on a one-rank gloo group on the CPU.

Every rank of a sharded model holds a shard (or a flat buffer) of each parameter, so no operator
can read or rebuild a whole weight. The refusal is a :class:`GrowthCouplingError` naming the
module and the fix (grow the unwrapped module, then shard it again), raised before anything
changes; the recipe it names is shown to work.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch
import torch.distributed as dist
from torch import nn

from esper_async.surgery import (
    GrowthCouplingError,
    ModelSurgeon,
    StackBlocks,
    Widen,
    WidenResidual,
    operation_record,
    replay_operations,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.surgery._host_models import adamw, lm_step, tiny_gpt, tokens

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo process group (the default group), destroyed afterwards."""
    if dist.is_initialized():
        pytest.fail("a default process group is already initialised in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _refused(model: nn.Module, optimizer: torch.optim.Optimizer, operation: object) -> str:
    before = _shapes(model)
    with pytest.raises(GrowthCouplingError) as caught:
        anyio.run(
            lambda: ModelSurgeon().apply(model, optimizer, operation, probe=tokens(seed=1)[0][:2])
        )
    assert _shapes(model) == before  # nothing changed
    assert "Grow the unwrapped module" in str(caught.value)
    assert "shard it again" in str(caught.value)
    return caught.value.module


def test_fully_sharded_data_parallel_is_refused(group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = FullyShardedDataParallel(tiny_gpt(), device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lm_step(model, optimizer, tokens(seed=0))  # it trains: a real FSDP model
    assert _refused(model, optimizer, StackBlocks(blocks="_fsdp_wrapped_module.blocks")) == "<root>"


def test_fully_shard_is_refused_and_names_the_sharded_block(group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = tiny_gpt()
    fully_shard(model.blocks[1])  # only the second block is sharded
    optimizer = adamw(model)
    lm_step(model, optimizer, tokens(seed=0))
    assert _refused(model, optimizer, WidenResidual(48)) == "blocks.1"


def test_dtensor_parameter_is_refused_by_every_operation_and_replay(group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].weight = nn.Parameter(distribute_tensor(model[2].weight.data, mesh, [Replicate()]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _shapes(model)
    with pytest.raises(GrowthCouplingError) as caught:
        anyio.run(
            lambda: ModelSurgeon().apply(model, optimizer, Widen("0", 12), probe=torch.randn(2, 4))
        )
    assert caught.value.module == "2" and "DTensor parameter ('2.weight')" in str(caught.value)
    with pytest.raises(GrowthCouplingError, match="Grow the unwrapped module"):
        replay_operations(model, optimizer, [operation_record(Widen("0", 12))])
    assert _shapes(model) == before


def test_grow_unwrapped_then_shard_again_works(group: None) -> None:
    """The recipe the error names: grow the plain module, rebuild the optimizer, shard it."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    torch.manual_seed(0)
    model = tiny_gpt()
    optimizer = adamw(model)
    lm_step(model, optimizer, tokens(seed=0))
    probe = tokens(seed=1)[0][:2]
    anyio.run(lambda: ModelSurgeon().apply(model, optimizer, StackBlocks(factor=2), probe=probe))
    anyio.run(lambda: ModelSurgeon().apply(model, optimizer, WidenResidual(48), probe=probe))
    assert len(model.blocks) == 4
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    assert isinstance(model, FSDPModule)
    sharded = adamw(model)
    losses = [lm_step(model, sharded, tokens(seed=2)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
