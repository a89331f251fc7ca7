"""Randomised strategies: Thompson sampling (Beta and Gaussian), epsilon-greedy and softmax."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from ..errors import SelectionError
from ._base import Context, _check_reward, _Indexed, _MeanEstimator

__all__ = ("EpsilonGreedy", "Softmax", "ThompsonBeta", "ThompsonGaussian")


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
