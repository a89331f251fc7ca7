"""Growth under ``torch.distributed`` data parallelism.

Every rank runs its own :class:`~esper_async.Trainer` over its shard of the data. Rank 0 decides
(:class:`BroadcastController`) and compiles (:class:`RankCompiler`); every rank applies the same
decisions and grafts the same kernel bytes at the same epoch boundary; DDP is rebuilt at the
step after every structure change (:func:`ddp_wrapper`); :func:`check_ranks_in_sync` checks the
ranks equal; checkpoints are written by rank 0 and resumed by all (:func:`save_checkpoint`,
:func:`load_checkpoint`). See ``docs/distributed.md``.
"""

from ._checkpoint import GrowthState as GrowthState
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._context import RankContext as RankContext
from ._context import init_distributed as init_distributed
from ._control import BroadcastController as BroadcastController
from ._data import ShardSampler as ShardSampler
from ._ddp import DeferredDDP as DeferredDDP
from ._ddp import ddp_wrapper as ddp_wrapper
from ._errors import ControllerBroadcastError as ControllerBroadcastError
from ._errors import DistributedError as DistributedError
from ._errors import RankDivergenceError as RankDivergenceError
from ._kernels import RankCompiler as RankCompiler
from ._loss import RankMeanLoss as RankMeanLoss
from ._sync import RankState as RankState
from ._sync import check_ranks_in_sync as check_ranks_in_sync
from ._sync import rank_state as rank_state

__all__ = (
    "BroadcastController",
    "ControllerBroadcastError",
    "DeferredDDP",
    "DistributedError",
    "GrowthState",
    "RankCompiler",
    "RankContext",
    "RankDivergenceError",
    "RankMeanLoss",
    "RankState",
    "ShardSampler",
    "check_ranks_in_sync",
    "ddp_wrapper",
    "init_distributed",
    "load_checkpoint",
    "rank_state",
    "save_checkpoint",
)
