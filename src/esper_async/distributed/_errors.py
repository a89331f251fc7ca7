"""Errors of distributed training.

::

    EsperError
    └── DistributedError              a rank could not take part in a collective step
        ├── RankDivergenceError       ranks disagree on structure or parameters
        └── ControllerBroadcastError  rank 0's controller failed; every rank is told
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import EsperError

__all__ = ("ControllerBroadcastError", "DistributedError", "RankDivergenceError")


class DistributedError(EsperError):
    """Base class of errors of distributed training.

    :ivar rank: the rank that raised it.
    """

    def __init__(self, message: str, *, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class RankDivergenceError(DistributedError):
    """Ranks that must be identical are not: their structure (slot states, kernel ids, parameter
    shapes) or their parameters differ.

    :ivar ranks: the ranks that differ from rank 0.
    :ivar field: what differs (``"structure"``, ``"parameters"`` or ``"decisions"``).
    :ivar max_abs_diff: for ``"parameters"``, the largest absolute difference from rank 0's.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        ranks: Sequence[int],
        field: str,
        max_abs_diff: float | None = None,
    ) -> None:
        super().__init__(message, rank=rank)
        self.ranks = tuple(ranks)
        self.field = field
        self.max_abs_diff = max_abs_diff


class ControllerBroadcastError(DistributedError):
    """The controller raised on rank 0; the other ranks raise this so that none is left waiting."""
