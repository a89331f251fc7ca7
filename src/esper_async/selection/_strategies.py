"""Bandit strategies: which arm (a ``(slot_name, blueprint_id)`` pair) to try next.

Every strategy follows the small :class:`Strategy` protocol: ``select`` an arm among those offered,
``update`` it with a reward, and round-trip its whole state (RNG included) through a JSON-ready
``state_dict``. Arms are learned lazily: an arm is registered the first time it is offered or
updated, so the set of legal arms may change from one decision to the next.

Per-arm statistics live in numpy arrays indexed through a dict, so a decision costs one dict look-up
per offered arm and a handful of vector operations (a few microseconds at 64 arms).

Each strategy draws randomness only from its own ``numpy.random.Generator``, seeded explicitly, so
a run is reproducible from its seed; decay and windows count updates, not wall-clock time.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._exceptions import NoLegalArmError, SelectionError

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


class UCB1(_MeanEstimator):
    """UCB1 (Auer et al. 2002): play each arm once, then ``argmax mean + c·sqrt(2 ln t / n)``.

    :param c: exploration weight (1 is the textbook value for rewards in [0, 1]).
    :param seed: RNG seed (UCB1 draws nothing, but the seed is kept for a uniform interface).
    """

    name = "ucb1"

    def __init__(self, c: float = 1.0, *, seed: int = 0) -> None:
        super().__init__(seed)
        self.c = float(c)

    def _params(self) -> dict[str, Any]:
        return {"c": self.c}

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """The untried arm offered first, else the arm with the highest upper bound."""
        rows = self._rows(arms)
        # An untried arm has 1/n = inf, so its bound is inf and argmax picks the first of them.
        # (t >= 2 keeps log(t) > 0, so inf never meets 0; at t = 1 one arm is tried, and the
        # choice is the same.)
        log_t = 2.0 * math.log(max(self._total, 2))
        score = self._mean[rows] + self.c * np.sqrt(log_t * self._inv[rows])
        return arms[int(score.argmax())]


class DiscountedUCB(_MeanEstimator):
    """Discounted UCB (Garivier & Moulines 2011) for rewards whose means drift.

    Every update first multiplies all counts and sums by ``gamma``, so an observation ``k`` updates
    old weighs ``gamma**k``; the bound is ``mean_g + c·sqrt(2 ln n_g / N_g)``
    (``_g``: discounted) with ``n_g`` the sum of discounted counts. ``gamma = 1`` is UCB1.

    :param gamma: discount per update, in (0, 1].
    :param c: exploration weight.
    :param seed: RNG seed (unused by the rule; kept for a uniform interface).
    :raises SelectionError: if ``gamma`` is outside (0, 1].
    """

    name = "discounted_ucb"

    def __init__(self, gamma: float = 0.99, c: float = 1.0, *, seed: int = 0) -> None:
        if not 0.0 < gamma <= 1.0:
            raise SelectionError(f"discounted_ucb: gamma must be in (0, 1], got {gamma}")
        super().__init__(seed)
        self.gamma = float(gamma)
        self.c = float(c)
        self._n_all = 0.0  # the sum of discounted counts

    def _params(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "c": self.c}

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Discount every arm's statistics by ``gamma``, then add ``reward`` to ``arm``'s."""
        value = _check_reward(self.name, arm, reward)
        row = self._row(arm)
        n = len(self._keys)
        self._count[:n] *= self.gamma
        self._sum[:n] *= self.gamma
        self._count[row] += 1.0
        self._sum[row] += value
        self._total += 1
        self._n_all = self.gamma * self._n_all + 1.0
        self._refresh(slice(0, n))

    def _refresh(self, rows: slice | int) -> None:
        super()._refresh(rows)
        self._n_all = float(self._count[: len(self._keys)].sum())

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """The never-played (or fully forgotten) arm offered first, else the highest bound."""
        rows = self._rows(arms)
        log_n = 2.0 * math.log(max(self._n_all, 2.0))
        score = self._mean[rows] + self.c * np.sqrt(log_n * self._inv[rows])
        return arms[int(score.argmax())]


class SlidingWindowUCB(_MeanEstimator):
    """Sliding-window UCB (Garivier & Moulines 2011): UCB1 over the last ``window`` updates only.

    An arm that drops out of the window counts as untried again, so it is re-explored.

    :param window: how many of the latest updates count (at least 1).
    :param c: exploration weight.
    :param seed: RNG seed (unused by the rule; kept for a uniform interface).
    :raises SelectionError: if ``window`` is below 1.
    """

    name = "sliding_window_ucb"

    def __init__(self, window: int = 500, c: float = 1.0, *, seed: int = 0) -> None:
        if int(window) < 1:
            raise SelectionError(f"sliding_window_ucb: window must be at least 1, got {window}")
        super().__init__(seed)
        self.window = int(window)
        self.c = float(c)
        self._history: deque[tuple[int, float]] = deque()

    def _params(self) -> dict[str, Any]:
        return {"window": self.window, "c": self.c}

    def _extra_state(self) -> dict[str, Any]:
        return {"history": [[r, v] for r, v in self._history]}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._history = deque((int(r), float(v)) for r, v in state["history"])

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Add ``reward`` to ``arm``'s window statistics and evict the oldest update if full."""
        value = _check_reward(self.name, arm, reward)
        row = self._row(arm)
        self._history.append((row, value))
        self._count[row] += 1.0
        self._sum[row] += value
        self._refresh(row)
        if len(self._history) > self.window:
            old_row, old_value = self._history.popleft()
            self._count[old_row] -= 1.0
            # Subtracting leaves rounding residue; an empty arm's sum is exactly zero.
            self._sum[old_row] = self._sum[old_row] - old_value if self._count[old_row] else 0.0
            self._refresh(old_row)
        self._total += 1

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """The offered arm with no update in the window first, else the highest bound."""
        rows = self._rows(arms)
        log_t = 2.0 * math.log(max(min(self._total, self.window), 2))
        score = self._mean[rows] + self.c * np.sqrt(log_t * self._inv[rows])
        return arms[int(score.argmax())]


class ThompsonBeta(_Indexed):
    """Thompson sampling with a Beta posterior per arm (success/failure rewards).

    A reward ``r`` in [0, 1] adds ``r`` successes and ``1 - r`` failures (0/1 rewards are the
    Bernoulli case). With ``threshold`` set, any real reward is first turned into 1 if it exceeds
    the threshold, else 0. Each decision draws a fresh sample from every offered arm's posterior.

    :param prior_alpha: prior successes (``> 0``).
    :param prior_beta: prior failures (``> 0``).
    :param threshold: binarise rewards at this value, or ``None`` to require rewards in [0, 1].
    :param seed: RNG seed.
    :raises SelectionError: if a prior count is not positive.
    """

    name = "thompson_beta"
    _ARRAYS = ("_alpha", "_beta")
    _alpha: np.ndarray
    _beta: np.ndarray

    def __init__(
        self,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        threshold: float | None = None,
        *,
        seed: int = 0,
    ) -> None:
        if prior_alpha <= 0 or prior_beta <= 0:
            raise SelectionError(
                f"thompson_beta: prior counts must be positive, got {prior_alpha}, {prior_beta}"
            )
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.threshold = None if threshold is None else float(threshold)
        super().__init__(seed)

    def _params(self) -> dict[str, Any]:
        return {
            "prior_alpha": self.prior_alpha,
            "prior_beta": self.prior_beta,
            "threshold": self.threshold,
        }

    def _array_fill(self, attr: str) -> float:
        return self.prior_alpha if attr == "_alpha" else self.prior_beta

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Add ``reward`` successes and ``1 - reward`` failures to ``arm``'s posterior.

        :raises SelectionError: if the reward is outside [0, 1] and no ``threshold`` is set.
        """
        value = _check_reward(self.name, arm, reward)
        if self.threshold is not None:
            value = 1.0 if value > self.threshold else 0.0
        elif not 0.0 <= value <= 1.0:
            raise SelectionError(
                f"thompson_beta: reward {value} for arm {arm!r} is outside [0, 1]; set "
                "threshold= to binarise real-valued rewards, or use thompson_gaussian"
            )
        row = self._row(arm)
        self._alpha[row] += value
        self._beta[row] += 1.0 - value
        self._total += 1

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """The offered arm whose posterior sample is highest."""
        rows = self._rows(arms)
        k = len(rows)
        # Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b): one gamma call over 2k shapes
        # costs less than Generator.beta over k pairs.
        g = self._rng.standard_gamma(np.concatenate((self._alpha[rows], self._beta[rows])))
        return arms[int((g[:k] / (g[:k] + g[k:])).argmax())]


class ThompsonGaussian(_Indexed):
    """Thompson sampling for real-valued rewards: a Normal posterior on each arm's mean.

    Rewards are modelled as ``N(μ, noise_var)`` with prior ``μ ~ N(prior_mean, prior_var)``; the
    posterior has precision ``1/prior_var + n/noise_var``. Each decision draws fresh samples.

    :param prior_mean: prior mean of every arm.
    :param prior_var: prior variance (``> 0``).
    :param noise_var: reward noise variance (``> 0``).
    :param seed: RNG seed.
    :raises SelectionError: if a variance is not positive.
    """

    name = "thompson_gaussian"
    _ARRAYS = ("_count", "_sum")
    _DERIVED = ("_post_mean", "_post_sd")
    _count: np.ndarray
    _sum: np.ndarray
    _post_mean: np.ndarray
    _post_sd: np.ndarray

    def __init__(
        self,
        prior_mean: float = 0.0,
        prior_var: float = 1.0,
        noise_var: float = 1.0,
        *,
        seed: int = 0,
    ) -> None:
        if prior_var <= 0 or noise_var <= 0:
            raise SelectionError(
                f"thompson_gaussian: variances must be positive, got {prior_var}, {noise_var}"
            )
        self.prior_mean = float(prior_mean)
        self.prior_var = float(prior_var)
        self.noise_var = float(noise_var)
        super().__init__(seed)

    def _array_fill(self, attr: str) -> float:
        if attr == "_post_mean":
            return self.prior_mean
        return math.sqrt(self.prior_var) if attr == "_post_sd" else 0.0

    def _refresh(self, rows: slice | int) -> None:
        precision = 1.0 / self.prior_var + self._count[rows] / self.noise_var
        self._post_mean[rows] = (
            self.prior_mean / self.prior_var + self._sum[rows] / self.noise_var
        ) / precision
        self._post_sd[rows] = 1.0 / np.sqrt(precision)

    def _params(self) -> dict[str, Any]:
        return {
            "prior_mean": self.prior_mean,
            "prior_var": self.prior_var,
            "noise_var": self.noise_var,
        }

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Add ``reward`` to ``arm``'s sufficient statistics."""
        value = _check_reward(self.name, arm, reward)
        row = self._row(arm)
        self._count[row] += 1.0
        self._sum[row] += value
        self._refresh(row)
        self._total += 1

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """The offered arm whose posterior sample of the mean is highest."""
        rows = self._rows(arms)
        sample = self._post_mean[rows] + self._rng.standard_normal(len(rows)) * self._post_sd[rows]
        return arms[int(sample.argmax())]


class EpsilonGreedy(_MeanEstimator):
    """ε-greedy: a uniformly random offered arm with probability ε, else the best mean.

    After ``t`` decisions ε is ``max(min_epsilon, epsilon * decay**t)``; ``decay = 1`` keeps it.

    :param epsilon: initial exploration probability, in [0, 1].
    :param decay: multiplicative decay per decision, in (0, 1].
    :param min_epsilon: floor of ε.
    :param initial_value: the mean assumed for arms never played.
    :param seed: RNG seed.
    :raises SelectionError: if a probability or the decay is out of range.
    """

    name = "epsilon_greedy"

    def __init__(
        self,
        epsilon: float = 0.1,
        decay: float = 1.0,
        min_epsilon: float = 0.0,
        initial_value: float = 0.0,
        *,
        seed: int = 0,
    ) -> None:
        if not (0.0 <= epsilon <= 1.0 and 0.0 <= min_epsilon <= 1.0 and 0.0 < decay <= 1.0):
            raise SelectionError(
                "epsilon_greedy: need 0 <= epsilon, min_epsilon <= 1 and 0 < decay <= 1, got "
                f"epsilon={epsilon}, min_epsilon={min_epsilon}, decay={decay}"
            )
        self.initial_value = float(initial_value)
        super().__init__(seed)
        self.epsilon = float(epsilon)
        self.decay = float(decay)
        self.min_epsilon = float(min_epsilon)

    def _params(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "decay": self.decay,
            "min_epsilon": self.min_epsilon,
            "initial_value": self.initial_value,
        }

    @property
    def current_epsilon(self) -> float:
        """The exploration probability of the next decision."""
        return max(self.min_epsilon, self.epsilon * self.decay**self._decisions)

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """A random offered arm with probability ε, else the offered arm with the best mean."""
        eps = self.current_epsilon
        rows = self._rows(arms)
        if self._rng.random() < eps:
            return arms[int(self._rng.integers(len(rows)))]
        return arms[int(self._mean[rows].argmax())]


class Softmax(_MeanEstimator):
    """Softmax (Boltzmann) exploration: play arm ``i`` with probability ∝ ``exp(mean_i / tau)``.

    :param tau: temperature (``> 0``); high explores, low exploits.
    :param initial_value: the mean assumed for arms never played.
    :param seed: RNG seed.
    :raises SelectionError: if ``tau`` is not positive.
    """

    name = "softmax"

    def __init__(self, tau: float = 1.0, initial_value: float = 0.0, *, seed: int = 0) -> None:
        if tau <= 0:
            raise SelectionError(f"softmax: tau must be positive, got {tau}")
        self.initial_value = float(initial_value)
        super().__init__(seed)
        self.tau = float(tau)

    def _params(self) -> dict[str, Any]:
        return {"tau": self.tau, "initial_value": self.initial_value}

    def select(self, arms: Sequence[Hashable], context: Context | None = None) -> Hashable:
        """An offered arm drawn from the Boltzmann distribution over empirical means."""
        rows = self._rows(arms)
        means = self._mean[rows]
        # Subtracting the max keeps exp() from overflowing; it does not change the distribution.
        weights = np.exp((means - means.max()) / self.tau)
        cumulative = np.cumsum(weights)
        pick = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return arms[min(pick, len(rows) - 1)]


class LinUCB(_Indexed):
    """Disjoint LinUCB (Li et al. 2010): a ridge regression of reward on context per arm.

    The score of arm ``a`` with features ``x`` is ``θ_a·x + alpha·sqrt(xᵀ A_a⁻¹ x)`` with
    ``A_a = l2_lambda·I + Σ x xᵀ``; ``A_a⁻¹`` is kept up to date by Sherman-Morrison (O(d²) an
    update). In the selector, ``x`` is the slot's health-signal vector.

    :param alpha: exploration weight.
    :param l2_lambda: ridge regularisation (``> 0``).
    :param n_features: the context dimension, or ``None`` to take it from the first context.
    :param seed: RNG seed (unused by the rule; kept for a uniform interface).
    :raises SelectionError: if ``l2_lambda`` is not positive.
    """

    name = "linucb"
    contextual = True
    _ARRAYS = ("_a_inv", "_b", "_theta")
    _a_inv: np.ndarray
    _b: np.ndarray
    _theta: np.ndarray

    def __init__(
        self,
        alpha: float = 1.0,
        l2_lambda: float = 1.0,
        n_features: int | None = None,
        *,
        seed: int = 0,
    ) -> None:
        if l2_lambda <= 0:
            raise SelectionError(f"linucb: l2_lambda must be positive, got {l2_lambda}")
        self.alpha = float(alpha)
        self.l2_lambda = float(l2_lambda)
        self.n_features = None if n_features is None else int(n_features)
        super().__init__(seed)

    @property
    def _d(self) -> int:
        # Until the first context fixes n_features, the arrays are built with d = 1 and rebuilt.
        return self.n_features or 1

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "l2_lambda": self.l2_lambda, "n_features": self.n_features}

    def _array_shape(self, attr: str) -> tuple[int, ...]:
        return (self._d, self._d) if attr == "_a_inv" else (self._d,)

    def _init_row(self, row: int) -> None:
        self._a_inv[row] = np.eye(self._d) / self.l2_lambda

    def _features(self, arm: Hashable, x: Any) -> np.ndarray:
        vec = np.asarray(x, dtype=np.float64).reshape(-1)
        if self.n_features is None:
            self.n_features = int(vec.shape[0])
            for attr in self._ARRAYS:
                setattr(self, attr, self._new_array(attr, self._capacity))
            for row in range(len(self._keys)):
                self._init_row(row)
        if vec.shape[0] != self.n_features:
            raise SelectionError(
                f"linucb: arm {arm!r} has {vec.shape[0]} context features, expected "
                f"{self.n_features}"
            )
        return vec

    def _contexts(
        self,
        arms: Sequence[Hashable],
        context: Context | None,
    ) -> np.ndarray:
        if context is None:
            raise SelectionError(
                "linucb is contextual: pass context={arm: feature vector} to select()"
            )
        if isinstance(context, np.ndarray):
            x = np.asarray(context, dtype=np.float64)
            if x.ndim != 2 or x.shape[0] != len(arms):
                raise SelectionError(
                    f"linucb: a context array must have shape (len(arms), d) = ({len(arms)}, d), "
                    f"got {x.shape}"
                )
            self._features(arms[0], x[0])
        else:
            try:
                first = self._features(arms[0], context[arms[0]])
                x = np.stack([first, *(np.asarray(context[a], dtype=np.float64) for a in arms[1:])])
            except KeyError as exc:
                raise SelectionError(f"linucb: no context given for arm {exc.args[0]!r}") from exc
            except ValueError as exc:
                raise SelectionError(f"linucb: context vectors differ in shape: {exc}") from exc
        if x.shape[1:] != (self.n_features,):
            raise SelectionError(
                f"linucb: contexts have shape {x.shape[1:]}, expected ({self.n_features},)"
            )
        return x

    def select(
        self,
        arms: Sequence[Hashable],
        context: Context | None = None,
    ) -> Hashable:
        """The offered arm with the highest upper confidence bound for its context.

        :param context: ``{arm: features}``, or an array of shape ``(len(arms), d)`` whose rows
            follow ``arms``.
        :raises SelectionError: if ``context`` is missing, lacks an arm, or has the wrong size.
        """
        if not arms:
            raise NoLegalArmError("linucb: select() was offered no arms")
        x = self._contexts(arms, context)
        rows = self._rows(arms)
        a_inv_x = np.matmul(self._a_inv[rows], x[:, :, None])[:, :, 0]
        width = np.sqrt(np.maximum((x * a_inv_x).sum(axis=1), 0.0))
        score = (self._theta[rows] * x).sum(axis=1) + self.alpha * width
        return arms[int(score.argmax())]

    def update(self, arm: Hashable, reward: float, context: np.ndarray | None = None) -> None:
        """Add ``(context, reward)`` to ``arm``'s regression.

        :raises SelectionError: if ``context`` is missing or has the wrong size.
        """
        value = _check_reward(self.name, arm, reward)
        if context is None:
            raise SelectionError(f"linucb: update() of arm {arm!r} needs its context vector")
        x = self._features(arm, context)
        row = self._row(arm)
        a_inv = self._a_inv[row]
        a_inv_x = a_inv @ x
        a_inv -= np.outer(a_inv_x, a_inv_x) / (1.0 + x @ a_inv_x)
        self._b[row] += value * x
        self._theta[row] = a_inv @ self._b[row]
        self._total += 1


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
