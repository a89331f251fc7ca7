"""``RankContext``: who this process is in the job, and the channels for control traffic.

Control traffic (decisions, structure checks, checkpoint paths) goes over a dedicated gloo
:class:`~esper_async.distributed._channel.ControlChannel`, so it is carried on the CPU and never
interleaves with the gradient collectives DDP runs on the default group (NCCL on GPUs). Kernel
bytes go through the job's key-value store (the ``TCPStore`` torchrun set up), which needs no
collective at all.

A context owns its channel and, when :func:`init_distributed` made it, the default process group:
:meth:`RankContext.close` (or leaving ``with init_distributed() as ctx:``) shuts both down, and
:func:`init_distributed` also registers it to run at interpreter exit, so that no gloo worker is
left holding Python objects while the interpreter finalises (see ``_channel``).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field, replace
from datetime import timedelta

import structlog
import torch
import torch.distributed as dist

from ._channel import ControlChannel
from ._errors import DistributedError

__all__ = ("RankContext", "init_distributed")

log = structlog.get_logger(__name__)

#: Prefix of every key this package writes in the job's key-value store.
STORE_PREFIX = "esper_async/"
#: How long a control collective waits for the other ranks (a compile on rank 0 may take a
#: while before a decision is broadcast, so this is generous).
DEFAULT_CONTROL_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class RankContext:
    """This process's place in the job.

    Make it with :func:`init_distributed` (or :meth:`from_process_group` when the process group is
    already initialised); every rank must make it, in the same order as its other groups.

    :ivar rank: global rank.
    :ivar world_size: number of ranks.
    :ivar local_rank: rank on this host (the GPU index).
    :ivar device: where this rank trains.
    :ivar channel: the collectives of control traffic (gloo, on the CPU).
    :ivar store: the job's key-value store, under :data:`STORE_PREFIX`.
    :ivar backend: the default group's backend (``"gloo"`` or ``"nccl"``).
    :ivar owns_default_group: whether :meth:`close` also destroys the default process group
        (true when :func:`init_distributed` created it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    channel: ControlChannel
    store: dist.Store
    backend: str
    owns_default_group: bool = field(default=False, compare=False)

    #: The rank that decides, compiles and writes checkpoints.
    LEADER = 0

    @property
    def is_leader(self) -> bool:
        """Whether this rank decides, compiles and writes checkpoints."""
        return self.rank == self.LEADER

    @classmethod
    def from_process_group(
        cls,
        *,
        device: torch.device | str | None = None,
        timeout: timedelta = DEFAULT_CONTROL_TIMEOUT,
    ) -> RankContext:
        """The context of an initialised default process group. A collective: call it on every
        rank.

        :param device: this rank's device (default: ``cuda:<local rank>`` under NCCL, else CPU).
        :param timeout: how long control collectives wait for the other ranks.
        :raises DistributedError: if the default process group is not initialised.
        """
        if not dist.is_initialized():
            raise DistributedError(
                "torch.distributed is not initialised; call esper_async.distributed."
                "init_distributed() (or dist.init_process_group) on every rank first",
                rank=-1,
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = str(dist.get_backend())
        if device is None:
            device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        try:
            base = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"rank {rank}: the job's key-value store is not reachable ({exc})", rank=rank
            ) from exc
        store = dist.PrefixStore(STORE_PREFIX, base)
        channel = ControlChannel(store, rank, world, timeout)
        return cls(rank, world, local_rank, torch.device(device), channel, store, backend)

    def barrier(self) -> None:
        """Wait until every rank reaches this point (over the control channel)."""
        self.channel.barrier()

    def close(self) -> None:
        """Shut down the control channel and, if this context created it, the default process
        group. Not a collective; safe to call more than once (it also runs at exit).

        Call it after the last collective (DDP wrappers and channel calls fail afterwards).
        """
        self.channel.close()
        if self.owns_default_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> RankContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def init_distributed(
    *, backend: str | None = None, timeout: timedelta = DEFAULT_CONTROL_TIMEOUT
) -> RankContext:
    """Join the job torchrun (or any launcher setting ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``) started, and return this rank's context.

    With NCCL each rank binds its GPU (``cuda:<LOCAL_RANK>``) before the group is made.

    :param backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
    :param timeout: how long collectives wait for the other ranks.
    Use it as a context manager (``with init_distributed() as ctx:``) or call
    :meth:`RankContext.close` at the end; it also runs at exit.

    :raises DistributedError: if the launcher's environment variables are missing.
    """
    missing = [
        v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ
    ]
    if missing and not dist.is_initialized():
        raise DistributedError(
            f"missing environment variables {missing}; start the script with torchrun "
            "(torchrun --nproc_per_node 2 script.py)",
            rank=-1,
        )
    created = not dist.is_initialized()
    if created:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device_id = None
        if backend == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
            torch.cuda.set_device(local_rank)
            device_id = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    ctx = RankContext.from_process_group(timeout=timeout)
    if created:
        ctx = replace(ctx, owns_default_group=True)
    atexit.register(ctx.close)
    log.info("distributed.joined", rank=ctx.rank, world_size=ctx.world_size, backend=ctx.backend)
    return ctx
