"""esper_async: asyncio-native morphogenetic training for PyTorch.

A host network trains while seed slots in it receive kernels — compiled, validated sub-networks
built from blueprints — that are blended in and then kept or removed.

The names here are the ones most programs need; everything else lives in the subpackages
(``esper_async.control``, ``.seeds``, ``.compiler``, ``.store``, ``.reliability``, ``.surgery``,
``.telemetry``, ``.distributed``, ``.runtime``; apps in ``esper_async.apps``), and every error in
:mod:`esper_async.errors`. :class:`KernelStore` is imported on first use, so that
``import esper_async`` does not load SQLite support.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .blueprints import Blueprint as Blueprint
from .blueprints import SlotContract as SlotContract
from .blueprints import SlotKind as SlotKind
from .blueprints import library as library
from .compiler import BlueprintCompiler as BlueprintCompiler
from .control import ControllerConfig as ControllerConfig
from .control import EpochReport as EpochReport
from .control import HeuristicController as HeuristicController
from .errors import EsperError as EsperError
from .kernels import Kernel as Kernel
from .kernels import export_kernel as export_kernel
from .kernels import load_kernel as load_kernel
from .reliability import ReliabilityConfig as ReliabilityConfig
from .seeds import SeedSlot as SeedSlot
from .seeds import SeedState as SeedState
from .seeds import export_model as export_model
from .seeds import wrap as wrap
from .surgery import SurgeryPolicyConfig as SurgeryPolicyConfig
from .telemetry import Telemetry as Telemetry
from .training import ClassificationTask as ClassificationTask
from .training import FitResult as FitResult
from .training import Grower as Grower
from .training import LanguageModelTask as LanguageModelTask
from .training import RegressionTask as RegressionTask
from .training import Task as Task
from .training import Trainer as Trainer

if TYPE_CHECKING:
    from .store import KernelStore as KernelStore

from .telemetry import quiet_by_default as _quiet_by_default

_quiet_by_default()  # silent unless the program configures logging (see docs/training.md)

__version__ = "0.1.0"

__all__ = (
    "Blueprint",
    "BlueprintCompiler",
    "ClassificationTask",
    "ControllerConfig",
    "EpochReport",
    "EsperError",
    "FitResult",
    "Grower",
    "HeuristicController",
    "Kernel",
    "KernelStore",
    "LanguageModelTask",
    "RegressionTask",
    "ReliabilityConfig",
    "SeedSlot",
    "SeedState",
    "SlotContract",
    "SlotKind",
    "SurgeryPolicyConfig",
    "Task",
    "Telemetry",
    "Trainer",
    "export_kernel",
    "export_model",
    "library",
    "load_kernel",
    "wrap",
)

#: Names imported on first access: ``name -> module``.
_LAZY = {"KernelStore": ".store"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'esper_async' has no attribute {name!r}")
