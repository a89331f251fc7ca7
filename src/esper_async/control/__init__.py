"""Control: what to grow, where and when.

A :class:`Controller` reads each epoch's :class:`EpochReport` (losses, per-slot health signals,
counterfactual measurements of blended seeds) and returns :class:`Decision` s — germinate a
blueprint in a slot, start blending, fossilize, cull, release, or (with
``ControllerConfig(width_growth=True)``) widen a slot's host and end its trial.
:class:`HeuristicController` is the default: plateau detection and health signals, with the
blueprint chosen by a bandit selector (:mod:`esper_async.selection`).
"""

from ._controller import WIDEN_ARM as WIDEN_ARM
from ._controller import Controller as Controller
from ._controller import ControllerConfig as ControllerConfig
from ._controller import Counterfactual as Counterfactual
from ._controller import Cull as Cull
from ._controller import Decision as Decision
from ._controller import EndWidthTrial as EndWidthTrial
from ._controller import EpochReport as EpochReport
from ._controller import Fossilize as Fossilize
from ._controller import Germinate as Germinate
from ._controller import GrowWidth as GrowWidth
from ._controller import HeuristicController as HeuristicController
from ._controller import Release as Release
from ._controller import StartBlending as StartBlending
from ._controller import plateaued as plateaued
from ._protocol import MarginController as MarginController
from ._protocol import StatefulController as StatefulController
from ._protocol import WidthController as WidthController
from ._record import report_from_json as report_from_json
from ._record import report_to_json as report_to_json

__all__ = (
    "WIDEN_ARM",
    "Controller",
    "ControllerConfig",
    "Counterfactual",
    "Cull",
    "Decision",
    "EndWidthTrial",
    "EpochReport",
    "Fossilize",
    "Germinate",
    "GrowWidth",
    "HeuristicController",
    "MarginController",
    "Release",
    "StartBlending",
    "StatefulController",
    "WidthController",
    "plateaued",
    "report_from_json",
    "report_to_json",
)
