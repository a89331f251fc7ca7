"""Bandit strategies: which arm (a ``(slot_name, blueprint_id)`` pair) to try next.

Every strategy follows the small :class:`Strategy` protocol: ``select`` an arm among those offered,
``update`` it with a reward, and round-trip its whole state (RNG included) through a JSON-ready
``state_dict``. Arms are learned lazily: an arm is registered the first time it is offered or
updated, so the set of legal arms may change from one decision to the next.

Per-arm statistics live in numpy arrays indexed through a dict, so a decision costs one dict look-up
per offered arm and a handful of vector operations (microseconds at 64 arms).

Each strategy draws randomness only from its own ``numpy.random.Generator``, seeded explicitly, so
a run is reproducible from its seed; decay and windows count updates, not wall-clock time.

The strategies live in ``_ucb.py``, ``_sampling.py`` and ``_linucb.py``; this module gathers them
and keeps the registry that :func:`make_strategy` reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import SelectionError
from ._base import ArmKey, Context, Strategy, _Indexed
from ._linucb import LinUCB
from ._sampling import EpsilonGreedy, Softmax, ThompsonBeta, ThompsonGaussian
from ._ucb import UCB1, DiscountedUCB, SlidingWindowUCB

__all__ = (
    "UCB1",
    "ArmKey",
    "Context",
    "DiscountedUCB",
    "EpsilonGreedy",
    "LinUCB",
    "SlidingWindowUCB",
    "Softmax",
    "Strategy",
    "ThompsonBeta",
    "ThompsonGaussian",
    "make_strategy",
    "strategy_names",
)

#: The registry of strategies, by name. Read-only: pass an instance to use your own strategy.
_REGISTRY: Mapping[str, type[_Indexed]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            UCB1,
            DiscountedUCB,
            SlidingWindowUCB,
            ThompsonBeta,
            ThompsonGaussian,
            EpsilonGreedy,
            Softmax,
            LinUCB,
        )
    }
)


def strategy_names() -> tuple[str, ...]:
    """The names :func:`make_strategy` accepts."""
    return tuple(_REGISTRY)


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy by name.

    :param name: one of :func:`strategy_names` (``"ucb1"``, ``"thompson_beta"``, ...).
    :param kwargs: the strategy's parameters, e.g. ``seed=0, c=2.0``.
    :raises SelectionError: naming the valid choices, if the name or a parameter is unknown.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise SelectionError(
            f"unknown strategy {name!r}; valid names are: {', '.join(sorted(_REGISTRY))}"
        )
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise SelectionError(
            f"strategy {name!r} takes no parameter {', '.join(unknown)}; it takes: "
            f"{', '.join(accepted)}"
        )
    return cls(**kwargs)  # type: ignore[return-value]
