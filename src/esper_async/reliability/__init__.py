"""Reliability: surviving faults without stopping training.

Circuit breakers per blueprint, retries with jittered backoff, bounds on growth (backpressure),
the loss governor with its in-memory snapshots, atomic checkpoints of the whole morphogenetic
state (sealed with their sha256, verified before they are read), and the fault-injection means
the drills use. See ``docs/reliability.md``.

The fault drill itself (which runs a trainer) lives in :mod:`esper_async.apps.drill`.
"""

from ._backoff import Backoff as Backoff
from ._backoff import retry as retry
from ._breaker import BreakerBoard as BreakerBoard
from ._breaker import BreakerConfig as BreakerConfig
from ._breaker import BreakerState as BreakerState
from ._breaker import CircuitBreaker as CircuitBreaker
from ._checkpoint import Restored as Restored
from ._checkpoint import apply_state as apply_state
from ._checkpoint import capture_state as capture_state
from ._checkpoint import restore_state as restore_state
from ._checkpoint import verify_state as verify_state
from ._checkpoint_store import CHECKPOINT_PATTERN as CHECKPOINT_PATTERN
from ._checkpoint_store import CheckpointStore as CheckpointStore
from ._checkpoint_store import reason as failure_reason
from ._checkpoint_store import unrestorable as unrestorable
from ._checkpoint_store import write_atomic as write_atomic
from ._config import ReliabilityConfig as ReliabilityConfig
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointForgeryError as CheckpointForgeryError
from ._errors import CheckpointIntegrityError as CheckpointIntegrityError
from ._errors import CheckpointMismatchError as CheckpointMismatchError
from ._errors import GovernorError as GovernorError
from ._errors import LossAnomaly as LossAnomaly
from ._errors import is_out_of_memory as is_out_of_memory
from ._faults import FaultKind as FaultKind
from ._faults import FaultPlan as FaultPlan
from ._faults import corrupt_file as corrupt_file
from ._faults import inject_kernel_nan as inject_kernel_nan
from ._faults import inject_kernel_oom as inject_kernel_oom
from ._faults import inject_kernel_raise as inject_kernel_raise
from ._faults import inject_loss_spike as inject_loss_spike
from ._faults import kill_processes as kill_processes
from ._faults import poison_parameter as poison_parameter
from ._governor import Governor as Governor
from ._governor import GovernorConfig as GovernorConfig
from ._governor import LossJudge as LossJudge
from ._governor import RollbackBudget as RollbackBudget
from ._governor import SnapshotKeeper as SnapshotKeeper
from ._incidents import Incident as Incident
from ._incidents import IncidentKind as IncidentKind
from ._limits import Admission as Admission
from ._limits import ResourceLimits as ResourceLimits
from ._snapshot import Snapshot as Snapshot

__all__ = (
    "CHECKPOINT_PATTERN",
    "Admission",
    "Backoff",
    "BreakerBoard",
    "BreakerConfig",
    "BreakerState",
    "CheckpointError",
    "CheckpointForgeryError",
    "CheckpointIntegrityError",
    "CheckpointMismatchError",
    "CheckpointStore",
    "CircuitBreaker",
    "FaultKind",
    "FaultPlan",
    "Governor",
    "GovernorConfig",
    "GovernorError",
    "Incident",
    "IncidentKind",
    "LossAnomaly",
    "LossJudge",
    "ReliabilityConfig",
    "ResourceLimits",
    "Restored",
    "RollbackBudget",
    "Snapshot",
    "SnapshotKeeper",
    "apply_state",
    "capture_state",
    "corrupt_file",
    "failure_reason",
    "inject_kernel_nan",
    "inject_kernel_oom",
    "inject_kernel_raise",
    "inject_loss_spike",
    "is_out_of_memory",
    "kill_processes",
    "poison_parameter",
    "restore_state",
    "retry",
    "unrestorable",
    "verify_state",
    "write_atomic",
)
