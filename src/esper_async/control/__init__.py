"""Control: what to grow, where and when.

A :class:`Controller` reads each epoch's :class:`EpochReport` (losses, per-slot health signals,
counterfactual measurements of blended seeds) and returns :class:`Decision` s — germinate a
blueprint in a slot, start blending, fossilize, cull, release. :class:`HeuristicController` is the
default: plateau detection and health signals, with the blueprint chosen by a bandit selector
(:mod:`esper_async.selection`).
"""

from ._controller import Controller as Controller
from ._controller import ControllerConfig as ControllerConfig
from ._controller import Counterfactual as Counterfactual
from ._controller import Cull as Cull
from ._controller import Decision as Decision
from ._controller import EpochReport as EpochReport
from ._controller import Fossilize as Fossilize
from ._controller import Germinate as Germinate
from ._controller import HeuristicController as HeuristicController
from ._controller import Release as Release
from ._controller import StartBlending as StartBlending
from ._controller import plateaued as plateaued
from ._record import report_from_json as report_from_json
from ._record import report_to_json as report_to_json

__all__ = (
    "Controller",
    "ControllerConfig",
    "Counterfactual",
    "Cull",
    "Decision",
    "EpochReport",
    "Fossilize",
    "Germinate",
    "HeuristicController",
    "Release",
    "StartBlending",
    "plateaued",
    "report_from_json",
    "report_to_json",
)
