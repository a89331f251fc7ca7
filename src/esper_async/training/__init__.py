"""Training: the fit loop, and the growth engine it is built on.

:class:`Trainer` runs the whole loop (guarded steps, rollbacks, checkpoints, growth);
see ``docs/architecture.md`` for the layers below it.
"""

from ._results import FitResult as FitResult
from ._results import GrowthEvent as GrowthEvent
from .trainer import Trainer as Trainer

__all__ = ("FitResult", "GrowthEvent", "Trainer")
