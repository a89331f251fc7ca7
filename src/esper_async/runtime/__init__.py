"""The runtime: running training steps off the event loop and measuring it.

:class:`StepRunner` runs a step in a worker thread (CPU) or launches it and awaits its completion
through a CUDA :class:`CompletionBridge` (GPU); :class:`LoopLagMonitor` measures how late the
event loop runs.
"""

from ._bridge import BridgeKind as BridgeKind
from ._bridge import Completion as Completion
from ._bridge import CompletionBridge as CompletionBridge
from ._execution import CudaStepRunner as CudaStepRunner
from ._execution import LagStats as LagStats
from ._execution import LoopLagMonitor as LoopLagMonitor
from ._execution import StepRunner as StepRunner
from ._execution import ThreadStepRunner as ThreadStepRunner

__all__ = (
    "BridgeKind",
    "Completion",
    "CompletionBridge",
    "CudaStepRunner",
    "LagStats",
    "LoopLagMonitor",
    "StepRunner",
    "ThreadStepRunner",
)
