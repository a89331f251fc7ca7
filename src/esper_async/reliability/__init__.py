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
from ._checkpoint import capture_state as capture_state
from ._checkpoint import restore_state as restore_state
from ._checkpoint_store import CheckpointStore as CheckpointStore
from ._checkpoint_store import write_atomic as write_atomic
from ._config import ReliabilityConfig as ReliabilityConfig
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointForgeryError as CheckpointForgeryError
from ._errors import CheckpointIntegrityError as CheckpointIntegrityError
from ._errors import CheckpointMismatchError as CheckpointMismatchError
from ._errors import GovernorError as GovernorError
from ._errors import is_out_of_memory as is_out_of_memory
from ._faults import FaultKind as FaultKind
from ._faults import FaultPlan as FaultPlan
from ._governor import Governor as Governor
from ._governor import GovernorConfig as GovernorConfig
from ._incidents import Incident as Incident
from ._incidents import IncidentKind as IncidentKind
from ._limits import Admission as Admission
from ._limits import ResourceLimits as ResourceLimits
from ._snapshot import Snapshot as Snapshot

__all__ = (
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
    "ReliabilityConfig",
    "ResourceLimits",
    "Restored",
    "Snapshot",
    "capture_state",
    "is_out_of_memory",
    "restore_state",
    "retry",
    "write_atomic",
)
