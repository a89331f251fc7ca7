"""Seed selection: the performance tracker, bandit strategies and the intelligent selector."""

from ._selector import ArmCost as ArmCost
from ._selector import IntelligentSeedSelector as IntelligentSeedSelector
from ._selector import SlotCandidate as SlotCandidate
from ._selector import estimate_cost as estimate_cost
from ._strategies import UCB1 as UCB1
from ._strategies import ArmKey as ArmKey
from ._strategies import Context as Context
from ._strategies import DiscountedUCB as DiscountedUCB
from ._strategies import EpsilonGreedy as EpsilonGreedy
from ._strategies import LinUCB as LinUCB
from ._strategies import SlidingWindowUCB as SlidingWindowUCB
from ._strategies import Softmax as Softmax
from ._strategies import Strategy as Strategy
from ._strategies import ThompsonBeta as ThompsonBeta
from ._strategies import ThompsonGaussian as ThompsonGaussian
from ._strategies import make_strategy as make_strategy
from ._strategies import strategy_names as strategy_names
from ._tracker import PairSummary as PairSummary
from ._tracker import PerformanceTracker as PerformanceTracker
from ._tracker import SeedOutcome as SeedOutcome

__all__ = (
    "UCB1",
    "ArmCost",
    "ArmKey",
    "Context",
    "DiscountedUCB",
    "EpsilonGreedy",
    "IntelligentSeedSelector",
    "LinUCB",
    "PairSummary",
    "PerformanceTracker",
    "SeedOutcome",
    "SlidingWindowUCB",
    "SlotCandidate",
    "Softmax",
    "Strategy",
    "ThompsonBeta",
    "ThompsonGaussian",
    "estimate_cost",
    "make_strategy",
    "strategy_names",
)
