"""Training: the fit loop, and the growth engine it is built on.

:class:`Trainer` runs the whole loop (guarded steps, rollbacks, checkpoints, growth);
:class:`Grower` is the growth engine alone, for a hand-written loop. A :class:`Task` says what a
batch is and what is measured (:class:`ClassificationTask`, :class:`RegressionTask`,
:class:`LanguageModelTask`; :class:`SelfLossTask` and :class:`HFCausalLMTask` for models that
compute their own loss, as Hugging Face's do). See ``docs/training.md``.
"""

from ._flops import FlopLedger as FlopLedger
from ._grower import Grower as Grower
from ._results import FitResult as FitResult
from ._results import GrowthEvent as GrowthEvent
from ._task import ClassificationTask as ClassificationTask
from ._task import HFCausalLMTask as HFCausalLMTask
from ._task import LanguageModelTask as LanguageModelTask
from ._task import RegressionTask as RegressionTask
from ._task import SelfLossTask as SelfLossTask
from ._task import Task as Task
from ._task import TaskError as TaskError
from ._task import move_to_device as move_to_device
from .trainer import Trainer as Trainer

__all__ = (
    "ClassificationTask",
    "FitResult",
    "FlopLedger",
    "Grower",
    "GrowthEvent",
    "HFCausalLMTask",
    "LanguageModelTask",
    "RegressionTask",
    "SelfLossTask",
    "Task",
    "TaskError",
    "Trainer",
    "move_to_device",
)
