"""``ControlChannel``: control collectives whose gloo worker never outlives the interpreter.

A one-rank job in this process (a ``HashStore`` for the rendezvous): the collectives return what
they should, and after ``close`` the channel's worker thread is gone and calls raise a typed error.
The two-rank programs of ``test_ddp.py`` use the same channel; ``make soak-distributed``
runs them repeatedly under load (their exit at the end is where the old flake was).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from esper_async.distributed import DistributedError
from esper_async.distributed._channel import ControlChannel


def _worker_threads() -> int:
    tasks = Path("/proc/self/task")
    return sum((t / "comm").read_text().strip() == "pt_gloo_runloop" for t in tasks.iterdir())


@pytest.fixture
def channel() -> ControlChannel:
    return ControlChannel(dist.HashStore(), 0, 1, timedelta(seconds=30))


def test_collectives_on_one_rank(channel: ControlChannel) -> None:
    t = torch.tensor([3.0])
    assert channel.all_reduce(t, dist.ReduceOp.SUM).tolist() == [3.0]
    assert [x.tolist() for x in channel.all_gather(torch.tensor([1, 2]))] == [[1, 2]]
    assert channel.broadcast(torch.tensor([7]), 0).tolist() == [7]
    assert channel.broadcast_object({"a": (1, "x")}, 0) == {"a": (1, "x")}
    assert channel.all_gather_object(["state", 2]) == [["state", 2]]
    channel.barrier()
    channel.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc to list threads")
def test_close_joins_the_worker_and_refuses_later_calls(channel: ControlChannel) -> None:
    channel.all_reduce(torch.ones(1), dist.ReduceOp.SUM)  # its worker has started and named itself
    before = _worker_threads()
    assert before >= 1
    channel.close()
    assert _worker_threads() == before - 1
    assert channel.closed
    with pytest.raises(DistributedError, match="closed"):
        channel.barrier()
    channel.close()  # idempotent
