"""esper_async: asyncio-native morphogenetic training for PyTorch.

A host network trains while seed slots in it receive kernels — compiled, validated sub-networks
built from blueprints — that are blended in and then kept or removed.
"""

from ._exceptions import BlueprintError as BlueprintError
from ._exceptions import CompileError as CompileError
from ._exceptions import CompileTimeoutError as CompileTimeoutError
from ._exceptions import DemoConfigError as DemoConfigError
from ._exceptions import EsperError as EsperError
from ._exceptions import KernelError as KernelError
from ._exceptions import KernelIntegrityError as KernelIntegrityError
from ._exceptions import KernelValidationError as KernelValidationError
from ._exceptions import LifecycleError as LifecycleError
from ._exceptions import LoaderError as LoaderError
from ._exceptions import NoLegalArmError as NoLegalArmError
from ._exceptions import SeedRuntimeError as SeedRuntimeError
from ._exceptions import SelectionError as SelectionError
from ._exceptions import StoreError as StoreError
from ._exceptions import StoreIntegrityError as StoreIntegrityError
from ._exceptions import StreamError as StreamError
from ._exceptions import SurgeryError as SurgeryError
from ._exceptions import TelemetryConfigError as TelemetryConfigError
from ._exceptions import UnsafeKernelError as UnsafeKernelError
from ._execution import LagStats as LagStats
from ._execution import LoopLagMonitor as LoopLagMonitor
from ._execution import StepRunner as StepRunner
from .blueprints import Blueprint as Blueprint
from .blueprints import SlotContract as SlotContract
from .blueprints import SlotKind as SlotKind
from .blueprints import build as build
from .blueprints import library as library
from .compiler import BlueprintCompiler as BlueprintCompiler
from .compiler import KernelOptimizer as KernelOptimizer
from .compiler import KernelValidator as KernelValidator
from .compiler import OptimizerOptions as OptimizerOptions
from .compiler import ProcessPool as ProcessPool
from .compiler import ValidationReport as ValidationReport
from .controller import Controller as Controller
from .controller import ControllerConfig as ControllerConfig
from .controller import EpochReport as EpochReport
from .controller import HeuristicController as HeuristicController
from .data import digits_loaders as digits_loaders
from .demo import DemoConfig as DemoConfig
from .demo import run_demo as run_demo
from .distributed import BroadcastController as BroadcastController
from .distributed import ControllerBroadcastError as ControllerBroadcastError
from .distributed import DistributedError as DistributedError
from .distributed import RankCompiler as RankCompiler
from .distributed import RankDivergenceError as RankDivergenceError
from .distributed import RankMeanLoss as RankMeanLoss
from .distributed import check_ranks_in_sync as check_ranks_in_sync
from .distributed import ddp_wrapper as ddp_wrapper
from .distributed import init_distributed as init_distributed
from .kernels import Kernel as Kernel
from .kernels import export_kernel as export_kernel
from .kernels import load_kernel as load_kernel
from .reliability import Backoff as Backoff
from .reliability import BreakerConfig as BreakerConfig
from .reliability import CheckpointError as CheckpointError
from .reliability import CheckpointIntegrityError as CheckpointIntegrityError
from .reliability import CheckpointMismatchError as CheckpointMismatchError
from .reliability import CheckpointStore as CheckpointStore
from .reliability import FaultKind as FaultKind
from .reliability import GovernorConfig as GovernorConfig
from .reliability import GovernorError as GovernorError
from .reliability import Incident as Incident
from .reliability import IncidentKind as IncidentKind
from .reliability import ReliabilityConfig as ReliabilityConfig
from .reliability import ResourceLimits as ResourceLimits
from .seeds import SeedSlot as SeedSlot
from .seeds import SeedState as SeedState
from .seeds import find_slots as find_slots
from .seeds import wrap as wrap
from .selection import UCB1 as UCB1
from .selection import DiscountedUCB as DiscountedUCB
from .selection import EpsilonGreedy as EpsilonGreedy
from .selection import IntelligentSeedSelector as IntelligentSeedSelector
from .selection import LinUCB as LinUCB
from .selection import PerformanceTracker as PerformanceTracker
from .selection import SlidingWindowUCB as SlidingWindowUCB
from .selection import SlotCandidate as SlotCandidate
from .selection import Softmax as Softmax
from .selection import ThompsonBeta as ThompsonBeta
from .selection import ThompsonGaussian as ThompsonGaussian
from .selection import make_strategy as make_strategy
from .selection import strategy_names as strategy_names
from .store import KernelStore as KernelStore
from .store import default_store_path as default_store_path
from .store import kernel_key as kernel_key
from .streams import BridgeKind as BridgeKind
from .streams import enable_side_streams as enable_side_streams
from .surgery import AddResidual as AddResidual
from .surgery import AddSkip as AddSkip
from .surgery import FxRewire as FxRewire
from .surgery import InsertAfter as InsertAfter
from .surgery import ModelSurgeon as ModelSurgeon
from .surgery import RemoveLayer as RemoveLayer
from .surgery import SurgeryPolicy as SurgeryPolicy
from .surgery import SurgeryPolicyConfig as SurgeryPolicyConfig
from .surgery import Widen as Widen
from .surgery import WidenSlot as WidenSlot
from .telemetry import Telemetry as Telemetry
from .telemetry import TelemetryConfig as TelemetryConfig
from .telemetry import configure_logging as configure_logging
from .trainer import FitResult as FitResult
from .trainer import GrowthEvent as GrowthEvent
from .trainer import Trainer as Trainer

__version__ = "0.1.0"

__all__ = (
    "UCB1",
    "AddResidual",
    "AddSkip",
    "Backoff",
    "Blueprint",
    "BlueprintCompiler",
    "BlueprintError",
    "BreakerConfig",
    "BridgeKind",
    "BroadcastController",
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointMismatchError",
    "CheckpointStore",
    "CompileError",
    "CompileTimeoutError",
    "Controller",
    "ControllerBroadcastError",
    "ControllerConfig",
    "DemoConfig",
    "DemoConfigError",
    "DiscountedUCB",
    "DistributedError",
    "EpochReport",
    "EpsilonGreedy",
    "EsperError",
    "FaultKind",
    "FitResult",
    "FxRewire",
    "GovernorConfig",
    "GovernorError",
    "GrowthEvent",
    "HeuristicController",
    "Incident",
    "IncidentKind",
    "InsertAfter",
    "IntelligentSeedSelector",
    "Kernel",
    "KernelError",
    "KernelIntegrityError",
    "KernelOptimizer",
    "KernelStore",
    "KernelValidationError",
    "KernelValidator",
    "LagStats",
    "LifecycleError",
    "LinUCB",
    "LoaderError",
    "LoopLagMonitor",
    "ModelSurgeon",
    "NoLegalArmError",
    "OptimizerOptions",
    "PerformanceTracker",
    "ProcessPool",
    "RankCompiler",
    "RankDivergenceError",
    "RankMeanLoss",
    "ReliabilityConfig",
    "RemoveLayer",
    "ResourceLimits",
    "SeedRuntimeError",
    "SeedSlot",
    "SeedState",
    "SelectionError",
    "SlidingWindowUCB",
    "SlotCandidate",
    "SlotContract",
    "SlotKind",
    "Softmax",
    "StepRunner",
    "StoreError",
    "StoreIntegrityError",
    "StreamError",
    "SurgeryError",
    "SurgeryPolicy",
    "SurgeryPolicyConfig",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryConfigError",
    "ThompsonBeta",
    "ThompsonGaussian",
    "Trainer",
    "UnsafeKernelError",
    "ValidationReport",
    "Widen",
    "WidenSlot",
    "build",
    "check_ranks_in_sync",
    "configure_logging",
    "ddp_wrapper",
    "default_store_path",
    "digits_loaders",
    "enable_side_streams",
    "export_kernel",
    "find_slots",
    "init_distributed",
    "kernel_key",
    "library",
    "load_kernel",
    "make_strategy",
    "run_demo",
    "strategy_names",
    "wrap",
)
