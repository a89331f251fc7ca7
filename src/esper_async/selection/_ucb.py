"""Upper-confidence-bound strategies: UCB1, and discounted and sliding-window UCB for drift."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import SelectionError
from ._base import Context, _check_reward, _MeanEstimator

__all__ = ("UCB1", "DiscountedUCB", "SlidingWindowUCB")


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
