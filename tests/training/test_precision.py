"""``Trainer(precision="bf16")``: training steps, host and seeds, run under bf16 autocast (on a
CPU as on a GPU), and still learn; validation stays in fp32. Batches reach the step through
the prefetcher in both precisions."""

from __future__ import annotations

import anyio
import pytest
import torch
from tests.reliability import _helpers as helpers
from torch import nn

from esper_async.reliability import ReliabilityConfig
from esper_async.seeds import SeedState, find_slots
from esper_async.training._prefetch import prefetched
from esper_async.training._task import ClassificationTask
from esper_async.training.trainer import Trainer


def _data() -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 128, 16)], [(x, y)]


@pytest.mark.parametrize("verdict", ["sync", "lagged"])
def test_bf16_steps_run_host_and_seed_in_bf16_and_learn(verdict: str) -> None:
    model = helpers.host()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    helpers.grow(model, opt, "0", rank=2)
    slot = find_slots(model)["0"]
    dtypes: dict[str, set[torch.dtype]] = {"host": set(), "seed": set()}
    slot.host.register_forward_hook(lambda _m, _a, out: dtypes["host"].add(out.dtype))
    assert slot.seed is not None
    slot.seed.register_forward_hook(lambda _m, _a, out: dtypes["seed"].add(out.dtype))
    trainer = Trainer(model, grow=False, optimizer=opt, precision="bf16",
                      reliability=ReliabilityConfig(verdict=verdict))  # type: ignore[arg-type]
    train, val = _data()
    fit = anyio.run(lambda: trainer.fit(train, val, epochs=4))
    assert torch.bfloat16 in dtypes["host"] and torch.bfloat16 in dtypes["seed"]
    assert torch.float32 in dtypes["host"]  # validation, outside autocast
    assert slot.state is SeedState.TRAINING and not fit.incidents
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert fit.history[-1].val_loss < fit.history[0].val_loss - 0.05


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        Trainer(nn.Linear(2, 2), precision="fp16")  # type: ignore[arg-type]


def test_the_prefetcher_yields_every_batch_in_order_on_the_device() -> None:
    train, _ = _data()
    moved = list(prefetched(train, ClassificationTask(), torch.device("cpu")))
    assert len(moved) == len(train)
    for (x, y), ((mx, my), ready) in zip(train, moved, strict=True):
        assert ready is None and torch.equal(x, mx) and torch.equal(y, my)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_prefetcher_copies_pinned_batches_beside_the_step() -> None:
    train, _ = _data()
    moved = list(prefetched(train, ClassificationTask(), torch.device("cuda")))
    assert len(moved) == len(train)
    for (x, _), ((mx, _), ready) in zip(train, moved, strict=True):
        assert ready is not None and mx.is_cuda
        torch.cuda.current_stream().wait_event(ready[0])
        assert torch.equal(mx.cpu(), x)
