"""The compiler: blueprints become validated kernels in worker processes."""

from ._compiler import BlueprintCompiler as BlueprintCompiler
from ._compiler import default_workers as default_workers
from ._optimizer import KernelOptimizer as KernelOptimizer
from ._optimizer import OptimizerOptions as OptimizerOptions
from ._optimizer import OptimizerResult as OptimizerResult
from ._pool import CompileExecutor as CompileExecutor
from ._pool import ProcessPool as ProcessPool
from ._pool import WorkerDiedError as WorkerDiedError
from ._pool import WorkerError as WorkerError
from ._pool import WorkerStartError as WorkerStartError
from ._validator import _BATCHES as VALIDATOR_BATCHES
from ._validator import Check as Check
from ._validator import KernelValidator as KernelValidator
from ._validator import ValidationReport as ValidationReport

__all__ = (
    "VALIDATOR_BATCHES",
    "BlueprintCompiler",
    "Check",
    "CompileExecutor",
    "KernelOptimizer",
    "KernelValidator",
    "OptimizerOptions",
    "OptimizerResult",
    "ProcessPool",
    "ValidationReport",
    "WorkerDiedError",
    "WorkerError",
    "WorkerStartError",
    "default_workers",
)
