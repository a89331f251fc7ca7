"""Sharding a data set for data parallelism.

Each rank trains on its own shard of the training split (a :class:`ShardSampler`, reshuffled
every epoch), while every rank evaluates the **whole** validation and test splits: with equal
parameters, every rank's epoch report is then the same, so rank 0's decisions rest on the
figures every rank sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DistributedSampler

__all__ = ("ShardSampler",)


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
