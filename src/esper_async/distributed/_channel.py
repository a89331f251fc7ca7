"""``ControlChannel``: the collectives of control traffic, on a gloo backend of our own.

Why not ``dist.new_group(backend="gloo")``: a gloo process group runs its collectives on worker
threads (two by default), and the worker that finishes a collective may drop the *last* reference
to it. Its tensors came from Python, so releasing them takes the GIL; when that happens after the
main thread has begun interpreter shutdown, the worker thread is torn down inside a C++ frame and
the process aborts ("terminate called without an active exception", SIGABRT) although the job's
work is done. Under torchrun the job is then marked failed. This was the flake of the one-rank
fault test: its last collective (the rank-state gather) ended a few microseconds before exit.

The channel removes the race by construction:

* its backend has exactly **one** worker thread, so collectives run in order and, once collective
  *k + 1* has completed, the worker has released everything of collective *k*;
* it keeps the handle of the latest collective until the next one completes, so the main thread,
  holding the GIL, always drops the last reference;
* :meth:`close` destroys the backend first (which joins its worker, idle or finishing a collective
  whose last reference the channel still holds) and only then drops the last handle.

:func:`~esper_async.distributed.init_distributed` registers :meth:`RankContext.close` to run at
exit, so a script that never calls it still shuts down cleanly.
"""

from __future__ import annotations

import itertools
import pickle
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    AllgatherOptions,
    AllreduceOptions,
    BarrierOptions,
    BroadcastOptions,
)

from ._errors import DistributedError

__all__ = ("ControlChannel",)

#: Key prefix of the channels' rendezvous in the job's key-value store.
_STORE_PREFIX = "control/"
#: Numbers this process's channels, so that a second channel (a second RankContext) rendezvous
#: under keys of its own. Every rank makes its contexts in the same order (as with
#: ``dist.new_group``), so the numbers agree across ranks.
_CHANNEL_NUMBERS = itertools.count()


class ControlChannel:
    """Collectives over a private single-worker gloo backend (see the module doc).

    Every call is a collective: every rank calls the same methods in the same order. Values
    travel on the CPU; objects are pickled, as ``torch.distributed``'s object collectives do (the
    peers are the ranks of one job, never a file).

    :param store: the job's key-value store (a prefix is added).
    :param rank: this rank.
    :param world_size: number of ranks.
    :param timeout: how long a collective waits for the other ranks.
    """

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, timeout: timedelta
    ) -> None:
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._threads = 1  # the invariant the module doc relies on
        options._devices = [dist.ProcessGroupGloo.create_default_device()]
        options._timeout = timeout
        self.rank = rank
        self.world_size = world_size
        self._backend: Any = dist.ProcessGroupGloo(
            dist.PrefixStore(f"{_STORE_PREFIX}{next(_CHANNEL_NUMBERS)}/", store), rank,
            world_size, options,
        )
        self._last: Any = None  # the latest collective's handle (see the module doc)
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._backend is None

    def _run(self, start: str, *args: Any) -> None:
        with self._lock:
            backend = self._backend
            if backend is None:
                raise DistributedError(
                    f"rank {self.rank}: the control channel is closed", rank=self.rank
                )
            work = getattr(backend, start)(*args)
            work.wait()
            # The worker is done with the previous collective (one worker, in order): dropping
            # it here releases its tensors under the GIL, in this thread.
            self._last = work

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        """Reduce ``tensor`` in place over ranks with ``op``; returns it."""
        options = AllreduceOptions()
        options.reduceOp = op  # type: ignore[assignment]
        self._run("allreduce", [tensor], options)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s; returns it."""
        options = BroadcastOptions()
        options.rootRank = src
        options.rootTensor = 0
        self._run("broadcast", [tensor], options)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype everywhere), in rank order."""
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run("allgather", [out], [tensor], AllgatherOptions())
        return out

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        self._run("barrier", BarrierOptions())

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """Rank ``src``'s ``obj`` on every rank (``obj`` is ignored elsewhere)."""
        payload = pickle.dumps(obj) if self.rank == src else b""
        size = self.broadcast(torch.tensor([len(payload)], dtype=torch.int64), src)
        data = torch.empty(int(size), dtype=torch.uint8)
        if self.rank == src:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.broadcast(data, src)
        return pickle.loads(data.numpy().tobytes())  # a peer rank of this job, never a file

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        payload = pickle.dumps(obj)
        sizes = self.all_gather(torch.tensor([len(payload)], dtype=torch.int64))
        longest = max(int(s) for s in sizes)
        data = torch.zeros(longest, dtype=torch.uint8)
        data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        gathered = self.all_gather(data)
        return [
            pickle.loads(part[: int(size)].numpy().tobytes())
            for part, size in zip(gathered, sizes, strict=True)
        ]

    def close(self) -> None:
        """Destroy the backend (joining its worker), then drop the last collective's handle.

        Not a collective, and safe to call more than once or on an error path.
        """
        with self._lock:
            backend, self._backend = self._backend, None
            del backend  # the only reference: its destructor joins the worker thread
            self._last = None

