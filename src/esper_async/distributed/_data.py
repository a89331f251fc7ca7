"""The digits, sharded for data parallelism.

Each rank trains on its own shard of the training split (a :class:`ShardSampler`, reshuffled
every epoch), while every rank evaluates the **whole** validation and test splits: with equal
parameters, every rank's epoch report is then the same, so rank 0's decisions rest on the
figures every rank sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data import DigitsLoaders, digits_loaders
from ._context import RankContext

__all__ = ("ShardSampler", "distributed_digits_loaders")


class ShardSampler(DistributedSampler[Any]):
    """A :class:`~torch.utils.data.DistributedSampler` that moves to the next epoch by itself.

    The trainer iterates its loader once per epoch and never calls ``set_epoch``; this sampler
    counts the passes, so every epoch is shuffled anew, identically on every rank. Every rank
    gets the same number of samples (the last are padded by repetition), so every rank takes the
    same number of steps: DDP needs that.

    :ivar epoch: the next pass's epoch (set it when resuming).
    """

    def __iter__(self) -> Iterator[Any]:
        indices = super().__iter__()
        self.epoch += 1
        return indices


def distributed_digits_loaders(
    ctx: RankContext,
    *,
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
) -> DigitsLoaders:
    """The splits of :func:`esper_async.data.digits_loaders`, the training one sharded by rank.

    :param ctx: this rank's context.
    :param batch_size: training batch size per rank (the global batch is ``world_size`` times).
    :param seed: seeds the split and the shuffle (the same on every rank).
    :param limit: use only this many images.
    """
    splits = digits_loaders(batch_size=batch_size, seed=seed, limit=limit)
    dataset = splits.train.dataset
    assert isinstance(dataset, Sized)
    sampler = ShardSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    train: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler
    )
    return DigitsLoaders(train=train, val=splits.val, test=splits.test)
