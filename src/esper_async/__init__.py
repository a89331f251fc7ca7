"""esper_async: asyncio-native morphogenetic training for PyTorch.

A host network trains while seed slots in it receive kernels — compiled, validated sub-networks
built from blueprints — that are blended in and then kept or removed.
"""

from ._exceptions import BlueprintError as BlueprintError
from ._exceptions import CompileError as CompileError
from ._exceptions import CompileTimeoutError as CompileTimeoutError
from ._exceptions import EsperError as EsperError
from ._exceptions import KernelError as KernelError
from ._exceptions import KernelIntegrityError as KernelIntegrityError
from ._exceptions import KernelValidationError as KernelValidationError
from ._exceptions import LifecycleError as LifecycleError
from ._exceptions import NoLegalArmError as NoLegalArmError
from ._exceptions import SeedRuntimeError as SeedRuntimeError
from ._exceptions import SelectionError as SelectionError
from ._exceptions import StoreError as StoreError
from ._exceptions import StoreIntegrityError as StoreIntegrityError
from ._exceptions import SurgeryError as SurgeryError
from .blueprints import Blueprint as Blueprint
from .blueprints import SlotContract as SlotContract
from .blueprints import SlotKind as SlotKind
from .blueprints import build as build
from .blueprints import library as library
from .compiler import BlueprintCompiler as BlueprintCompiler
from .controller import ControllerConfig as ControllerConfig
from .controller import EpochReport as EpochReport
from .controller import HeuristicController as HeuristicController
from .data import digits_loaders as digits_loaders
from .demo import DemoConfig as DemoConfig
from .demo import run_demo as run_demo
from .kernels import Kernel as Kernel
from .kernels import export_kernel as export_kernel
from .kernels import load_kernel as load_kernel
from .seeds import SeedSlot as SeedSlot
from .seeds import SeedState as SeedState
from .seeds import find_slots as find_slots
from .seeds import wrap as wrap
from .trainer import FitResult as FitResult
from .trainer import GrowthEvent as GrowthEvent
from .trainer import Trainer as Trainer

__version__ = "0.1.0"

__all__ = (
    "Blueprint",
    "BlueprintCompiler",
    "BlueprintError",
    "CompileError",
    "CompileTimeoutError",
    "ControllerConfig",
    "DemoConfig",
    "EpochReport",
    "EsperError",
    "FitResult",
    "GrowthEvent",
    "HeuristicController",
    "Kernel",
    "KernelError",
    "KernelIntegrityError",
    "KernelValidationError",
    "LifecycleError",
    "NoLegalArmError",
    "SeedRuntimeError",
    "SeedSlot",
    "SeedState",
    "SelectionError",
    "SlotContract",
    "SlotKind",
    "StoreError",
    "StoreIntegrityError",
    "SurgeryError",
    "Trainer",
    "build",
    "digits_loaders",
    "export_kernel",
    "find_slots",
    "library",
    "load_kernel",
    "run_demo",
    "wrap",
)
