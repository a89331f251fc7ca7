"""LinUCB: the contextual strategy, over each slot's health-signal features."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from ..errors import NoLegalArmError, SelectionError
from ._base import Context, _check_reward, _Indexed

__all__ = ("LinUCB",)


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
