"""The pieces every strategy shares: the :class:`Strategy` protocol, arm keys, and the
bookkeeping base that maps arms to rows of per-arm numpy arrays and persists them.

Per-arm statistics live in numpy arrays indexed through a dict, so a decision costs one dict look-up
per offered arm (none when the same tuple of arms is offered again) and a handful of vector
operations. Each strategy draws randomness only from its own seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import NoLegalArmError, SelectionError

__all__ = ("ArmKey", "Context", "Strategy")

#: An arm: ``(slot_name, blueprint_id)``. Strategies accept any hashable key whose JSON form
#: (tuples become lists) converts back to an equal key.
ArmKey = tuple[str, str]

#: What contextual strategies read: ``{arm: feature vector}``, or an array of shape
#: ``(len(arms), d)`` whose rows follow the offered arms.
Context = Mapping[Hashable, np.ndarray] | np.ndarray

#: Initial capacity of the per-arm arrays; they double when full.
_INITIAL_CAPACITY = 16


@runtime_checkable
class Strategy(Protocol):
    """What the selector needs from a bandit strategy."""

    name: str

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """Choose one of ``arms`` (never an arm that was not offered).

        :param arms: the legal arms, at least one, in a stable order (ties go to the first).
        :param context: per-arm feature vectors, for contextual strategies.
        :raises NoLegalArmError: if ``arms`` is empty.
        """
        ...

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Record the reward observed after playing ``arm`` (``context``: its feature vector)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The whole state, JSON-ready: statistics, parameters and RNG state."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` of the same strategy."""
        ...


def _key_from_json(value: Any) -> Hashable:
    """Turn the JSON form of an arm key back into the key (lists become tuples)."""
    if isinstance(value, list):
        return tuple(_key_from_json(v) for v in value)
    return value  # type: ignore[no-any-return]


def _key_to_json(key: Hashable) -> Any:
    if isinstance(key, tuple):
        return [_key_to_json(k) for k in key]
    return key


def _check_reward(strategy: str, arm: Hashable, reward: float) -> float:
    value = float(reward)
    if not math.isfinite(value):
        raise SelectionError(f"{strategy}: reward for arm {arm!r} must be finite, got {reward!r}")
    return value


class _Indexed:
    """Shared bookkeeping: arm → row index, per-arm float arrays that grow, a seeded RNG.

    Subclasses name their per-arm arrays in ``_ARRAYS`` (and their shape past the arm axis in
    ``_array_shape``); the rows of an arm never move once it is registered.
    """

    name = "indexed"
    #: Whether ``select`` needs ``context``.
    contextual = False
    #: Per-arm arrays that are persisted.
    _ARRAYS: tuple[str, ...] = ()
    #: Per-arm arrays computed from the persisted ones (rebuilt on load, never saved).
    _DERIVED: tuple[str, ...] = ()

    def __init__(self, seed: int) -> None:
        self._seed = int(seed)
        self._rng = np.random.default_rng(self._seed)
        self._index: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []
        self._capacity = _INITIAL_CAPACITY
        self._total = 0  # updates seen
        self._decisions = 0  # selects made
        # The last tuple of arms offered and its rows: a run offers the same arms many times in a
        # row, and looking 64 tuple keys up costs more than the whole decision rule.
        self._last_arms: tuple[Hashable, ...] | None = None
        self._last_rows = np.empty(0, dtype=np.intp)
        for attr in self._ARRAYS + self._DERIVED:
            setattr(self, attr, self._new_array(attr, self._capacity))

    def _array_shape(self, attr: str) -> tuple[int, ...]:
        return ()

    def _array_fill(self, attr: str) -> float:
        return 0.0

    def _new_array(self, attr: str, rows: int) -> np.ndarray:
        return np.full((rows, *self._array_shape(attr)), self._array_fill(attr), dtype=np.float64)

    def _register(self, arm: Hashable) -> int:
        row = len(self._keys)
        if row == self._capacity:
            self._capacity *= 2
            for attr in self._ARRAYS + self._DERIVED:
                old = getattr(self, attr)
                new = self._new_array(attr, self._capacity)
                new[:row] = old[:row]
                setattr(self, attr, new)
        self._index[arm] = row
        self._keys.append(arm)
        self._init_row(row)
        return row

    def _init_row(self, row: int) -> None:
        """Set a fresh arm's row (hook; arrays start at their fill value)."""

    def _refresh(self, rows: slice | int) -> None:
        """Recompute the derived arrays of ``rows`` from the persisted ones (hook)."""

    def _rows(self, arms: Sequence[Hashable]) -> np.ndarray:
        """The rows of ``arms`` (registering new ones), counted as one decision."""
        if not arms:
            raise NoLegalArmError(f"{self.name}: select() was offered no arms")
        self._decisions += 1
        # Tuples are immutable, so an equal tuple has the same rows (rows never move).
        if arms is self._last_arms or (type(arms) is tuple and arms == self._last_arms):
            return self._last_rows
        try:
            rows = np.fromiter(map(self._index.__getitem__, arms), dtype=np.intp, count=len(arms))
        except KeyError:
            rows = np.fromiter(map(self._row, arms), dtype=np.intp, count=len(arms))
        if type(arms) is tuple:
            self._last_arms, self._last_rows = arms, rows
        return rows

    def _row(self, arm: Hashable) -> int:
        row = self._index.get(arm)
        return self._register(arm) if row is None else row

    # -- persistence ---------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state` wrote (hook)."""

    def state_dict(self) -> dict[str, Any]:
        """The whole state, JSON-ready: statistics, parameters and RNG state."""
        n = len(self._keys)
        return {
            "name": self.name,
            "params": self._params(),
            "seed": self._seed,
            "rng": self._rng.bit_generator.state,
            "arms": [_key_to_json(k) for k in self._keys],
            "total": self._total,
            "decisions": self._decisions,
            "arrays": {attr: getattr(self, attr)[:n].tolist() for attr in self._ARRAYS},
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` of a strategy of the same kind.

        :raises SelectionError: if the state belongs to another strategy or is malformed.
        """
        if state.get("name") != self.name:
            raise SelectionError(
                f"cannot load a {state.get('name')!r} state into a {self.name!r} strategy"
            )
        previous = self._params()
        try:
            # Parameters first: they may fix the arrays' shapes (LinUCB's feature count).
            for key, value in state["params"].items():
                if key not in previous:
                    raise KeyError(f"unknown parameter {key!r}")
                setattr(self, key, value)
            keys = [_key_from_json(k) for k in state["arms"]]
            n = len(keys)
            capacity = max(_INITIAL_CAPACITY, 1 << max(n - 1, 0).bit_length())
            arrays = {}
            for attr in self._ARRAYS:
                arr = self._new_array(attr, capacity)
                if n:
                    arr[:n] = np.asarray(state["arrays"][attr], dtype=np.float64)
                arrays[attr] = arr
            rng = np.random.default_rng(int(state["seed"]))
            rng.bit_generator.state = state["rng"]
            total, decisions = int(state["total"]), int(state["decisions"])
            self._load_extra_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            for key, value in previous.items():
                setattr(self, key, value)
            raise SelectionError(f"malformed {self.name} state: {exc!r}") from exc
        self._seed = int(state["seed"])
        self._rng = rng
        self._total = total
        self._decisions = decisions
        self._keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self._capacity = capacity
        self._last_arms, self._last_rows = None, np.empty(0, dtype=np.intp)
        for attr, arr in arrays.items():
            setattr(self, attr, arr)
        for attr in self._DERIVED:
            setattr(self, attr, self._new_array(attr, capacity))
        self._refresh(slice(0, n))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params}, arms={len(self._keys)})"


class _MeanEstimator(_Indexed):
    """Running count and sum per arm, and from them the mean and ``1/count`` (``inf`` if 0)."""

    _ARRAYS = ("_count", "_sum")
    _DERIVED = ("_mean", "_inv")
    _count: np.ndarray
    _sum: np.ndarray
    _mean: np.ndarray
    _inv: np.ndarray
    #: The mean assumed for an arm never played.
    initial_value = 0.0

    def _array_fill(self, attr: str) -> float:
        if attr == "_inv":
            return math.inf
        return self.initial_value if attr == "_mean" else 0.0

    def _refresh(self, rows: slice | int) -> None:
        count = self._count[rows]
        played = count > 0
        safe = np.where(played, count, 1.0)
        self._mean[rows] = np.where(played, self._sum[rows] / safe, self.initial_value)
        self._inv[rows] = np.where(played, 1.0 / safe, math.inf)

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Record ``reward`` for ``arm``; ``context`` is ignored.

        :raises SelectionError: if the reward is not finite.
        """
        value = _check_reward(self.name, arm, reward)
        row = self._row(arm)
        self._count[row] += 1.0
        self._sum[row] += value
        self._mean[row] = self._sum[row] / self._count[row]
        self._inv[row] = 1.0 / self._count[row]
        self._total += 1

    def means(self, arms: Sequence[Hashable]) -> np.ndarray:
        """Empirical mean reward of each arm (``initial_value`` where it was never played)."""
        return np.array(
            [self._mean[self._index[a]] if a in self._index else self.initial_value for a in arms]
        )
