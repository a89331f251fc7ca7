"""``RankMeanLoss``: every rank sees the same loss value, and keeps its own gradient.

The trainer's reliability layer judges every step's loss before the backward pass (a bad step is
rolled back, never applied). Under DDP each rank computes the loss of its own shard, so one rank
could judge a spike that the others do not and skip a backward pass they run: the ranks' DDP
collectives would then pair up wrongly. Wrapped in :class:`RankMeanLoss`, the loss *value* is the
mean over ranks (the same bytes everywhere, so every rank's governor judges alike and keeps the
same history), while its *gradient* is the rank's own, which DDP then averages as usual.

It is also the step guard's :class:`~esper_async.reliability.StepConsensus`: a rank whose forward
pass raised contributes NaN to the mean (so every rank judges the step bad), and the ranks agree on
which seed to blame before anyone culls or rolls back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from ._context import RankContext

__all__ = ("RankMeanLoss",)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RankMeanLoss:
    """A ``loss_fn`` for :class:`~esper_async.Trainer` whose value is the mean over ranks.

    A collective on the control channel: the trainer calls its ``loss_fn`` the same number of times
    on every rank (once per step, and per validation batch and ablation, which every rank runs
    on the same data). Costs one scalar all-reduce per call and reads the loss on the host (which
    the trainer's step guard does anyway).

    :param loss_fn: the rank-local loss, ``loss_fn(logits, targets)``.
    :param ctx: this rank's context.
    """

    def __init__(self, loss_fn: LossFn, ctx: RankContext) -> None:
        self.loss_fn = loss_fn
        self.ctx = ctx

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(logits, targets)
        total = loss.detach().to("cpu", torch.float64).reshape(1)
        self.ctx.channel.all_reduce(total, dist.ReduceOp.SUM)
        mean = (total / self.ctx.world_size).to(loss.device, loss.dtype).reshape(loss.shape)
        # `loss - loss.detach()` is exactly zero: the value is `mean` to the bit on every rank,
        # the gradient is this rank's.
        return mean + (loss - loss.detach())

    def failed_forward(self) -> float:
        """This rank's forward pass raised: join the loss's all-reduce with NaN; returns the
        mean, NaN on every rank."""
        total = torch.full((1,), math.nan, dtype=torch.float64)
        self.ctx.channel.all_reduce(total, dist.ReduceOp.SUM)
        return float(total) / self.ctx.world_size

    def agree_culprit(self, index: int) -> int:
        """The largest culprit code any rank found (-1: no rank found one)."""
        found = torch.tensor([index], dtype=torch.int64)
        self.ctx.channel.all_reduce(found, dist.ReduceOp.MAX)
        return int(found)

    def agree_all(self, ok: bool) -> bool:
        """Whether ``ok`` on every rank (an all-reduce of the minimum)."""
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        self.ctx.channel.all_reduce(flag, dist.ReduceOp.MIN)
        return bool(flag)
