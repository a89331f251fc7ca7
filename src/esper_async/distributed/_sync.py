"""Checking that every rank holds the same model: structure bitwise, parameters exactly.

DDP keeps parameters equal only as long as every rank applies the same structure changes at the
same step and its all-reduced gradients are the same everywhere. :func:`check_ranks_in_sync`
checks that this held: it gathers each rank's :class:`RankState` (slot lifecycles, kernel ids,
parameter names and shapes, and a sha256 of every parameter and buffer) over the control channel
and raises :class:`RankDivergenceError` if any rank differs from rank 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..seeds import find_slots
from ._context import RankContext
from ._errors import RankDivergenceError

__all__ = ("RankState", "check_ranks_in_sync", "rank_state")

SlotRecord = tuple[str, str, str | None, str | None, float, int, int, int]


@dataclass(frozen=True)
class RankState:
    """One rank's model, summarised for comparison.

    :ivar rank: the rank.
    :ivar slots: per slot: name, state, blueprint name, kernel id, α, blend steps, epochs and
        steps in its state.
    :ivar params: per parameter and buffer: name, shape, dtype.
    :ivar digest: sha256 of every parameter's and buffer's bytes, in ``state_dict`` order.
    """

    rank: int
    slots: tuple[SlotRecord, ...]
    params: tuple[tuple[str, tuple[int, ...], str], ...]
    digest: str

    @property
    def structure(self) -> tuple[object, ...]:
        """What must be bitwise-identical across ranks, besides the parameters' values."""
        return (self.slots, self.params)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form (for logs and results files)."""
        return {
            "rank": self.rank,
            "slots": [list(s) for s in self.slots],
            "params": [[n, list(shape), dtype] for n, shape, dtype in self.params],
            "digest": self.digest,
        }


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in model.state_dict(keep_vars=False).items()]


def rank_state(model: nn.Module, rank: int) -> RankState:
    """``model``'s :class:`RankState` on this rank. Copies every tensor to the CPU once.

    :param model: the model (not its DDP wrapper).
    :param rank: this rank.
    """
    slots = tuple(
        (
            name,
            slot.state.value,
            None if slot.blueprint is None else slot.blueprint.name,
            slot.kernel_id,
            float(slot.alpha),
            int(slot.blend_steps),
            int(slot.lifecycle.epochs_in_state),
            int(slot.lifecycle.steps_in_state),
        )
        for name, slot in find_slots(model).items()
    )
    sha = hashlib.sha256()
    params = []
    for name, tensor in _tensors(model):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(name.encode())
        sha.update(data.view(torch.uint8).numpy().tobytes())
        params.append((name, tuple(tensor.shape), str(tensor.dtype)))
    return RankState(rank, slots, tuple(params), sha.hexdigest())


def _max_abs_diff(model: nn.Module, ctx: RankContext) -> float:
    """Largest absolute difference of this rank's parameters from rank 0's (a collective)."""
    flat = torch.cat([t.detach().to("cpu", torch.float64).reshape(-1) for _, t in _tensors(model)])
    reference = flat.clone()
    ctx.channel.broadcast(reference, ctx.LEADER)
    diff = (flat - reference).abs().max() if flat.numel() else torch.zeros((), dtype=torch.float64)
    ctx.channel.all_reduce(diff, dist.ReduceOp.MAX)
    return float(diff)


def check_ranks_in_sync(model: nn.Module, ctx: RankContext) -> RankState:
    """Raise unless every rank's model has rank 0's structure and parameters. A collective.

    :param model: this rank's model (not its DDP wrapper).
    :param ctx: this rank's context.
    :returns: this rank's state (equal to every other rank's, rank aside).
    :raises RankDivergenceError: on every rank, if any rank differs from rank 0: ``field`` says
        whether the structure or the parameters, ``ranks`` which ranks.
    """
    mine = rank_state(model, ctx.rank)
    gathered: list[RankState] = ctx.channel.all_gather_object(mine)
    reference = gathered[ctx.LEADER]
    odd = [s.rank for s in gathered if s.structure != reference.structure]
    if odd:
        differing = next(s for s in gathered if s.rank == odd[0])
        where = [
            f"{a} != {b}" for a, b in zip(differing.slots, reference.slots, strict=False) if a != b
        ] or ["parameter names or shapes differ"]
        raise RankDivergenceError(
            f"ranks {odd} differ from rank 0 in structure (seen on rank {ctx.rank}): "
            f"{'; '.join(where[:3])}",
            rank=ctx.rank,
            ranks=odd,
            field="structure",
        )
    odd = [s.rank for s in gathered if s.digest != reference.digest]
    if odd:
        worst = _max_abs_diff(model, ctx)
        raise RankDivergenceError(
            f"ranks {odd} hold parameters that differ from rank 0's (largest difference "
            f"{worst:.3g}, seen on rank {ctx.rank}); were all ranks started from the same seed, "
            "and do they step with the same DDP wrapper?",
            rank=ctx.rank,
            ranks=odd,
            field="parameters",
            max_abs_diff=worst,
        )
    return mine
