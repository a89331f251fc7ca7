"""``PerformanceTracker``: what each (slot, blueprint) pair has done in real training.

For every pair the tracker keeps the seed's counterfactual contribution (validation loss and
accuracy with the seed against the same batch with the seed's alpha set to 0), the loss change over
each seed's life, its latency, memory and parameter cost, and how its lives ended (fossilized or
culled). Statistics are kept twice: over a sliding window of the latest observations, and as a
discounted mean (weight ``discount**k`` for the observation ``k`` records old), so drift in the
host shows up. The tracker persists as JSON with an atomic write and is restored on resume.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from .._files import read_regular, write_atomic
from ..errors import SelectionError

__all__ = ("PairSummary", "PerformanceTracker", "SeedOutcome")

_log = structlog.get_logger(__name__)

#: Bumped when the persisted layout changes; older files are refused rather than misread.
STATE_VERSION = 1
#: Largest tracker state read (bytes): a state holds a bounded window per arm.
MAX_STATE_BYTES = 64 * 2**20


class SeedOutcome(StrEnum):
    """How a seed's life ended."""

    FOSSILIZED = "fossilized"
    CULLED = "culled"


@dataclass(frozen=True)
class PairSummary:
    """What is known about one (slot, blueprint) pair; ``None`` where nothing was recorded.

    Contributions are ``loss_without - loss_with`` (positive: the seed helps); accuracy deltas are
    ``acc_with - acc_without``; loss improvements are ``loss_before - loss_after`` over a life.
    ``window_*`` figures are means over the sliding window, ``discounted_contribution`` the
    discounted mean over all observations.
    """

    slot: str
    blueprint_id: str
    observations: int
    window_contribution: float | None
    discounted_contribution: float | None
    window_accuracy_delta: float | None
    lives: int
    fossilized: int
    culled: int
    mean_loss_improvement: float | None
    mean_latency_ms: float | None
    peak_memory_bytes: int | None
    param_count: int | None
    last_updated: float | None

    @property
    def fossilize_rate(self) -> float | None:
        """Share of finished lives that ended fossilized."""
        return self.fossilized / self.lives if self.lives else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping of every field and :attr:`fossilize_rate`."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["fossilize_rate"] = self.fossilize_rate
        return out


@dataclass
class _PairStats:
    window: int
    contributions: deque[float] = field(default_factory=deque)
    accuracy_deltas: deque[float] = field(default_factory=deque)
    loss_improvements: deque[float] = field(default_factory=deque)
    latencies_ms: deque[float] = field(default_factory=deque)
    observations: int = 0
    discounted_sum: float = 0.0
    discounted_weight: float = 0.0
    fossilized: int = 0
    culled: int = 0
    peak_memory_bytes: int | None = None
    param_count: int | None = None
    last_updated: float | None = None

    def __post_init__(self) -> None:
        for name in ("contributions", "accuracy_deltas", "loss_improvements", "latencies_ms"):
            setattr(self, name, deque(getattr(self, name), maxlen=self.window))

    def to_json(self) -> dict[str, Any]:
        return {
            "contributions": list(self.contributions),
            "accuracy_deltas": list(self.accuracy_deltas),
            "loss_improvements": list(self.loss_improvements),
            "latencies_ms": list(self.latencies_ms),
            "observations": self.observations,
            "discounted_sum": self.discounted_sum,
            "discounted_weight": self.discounted_weight,
            "fossilized": self.fossilized,
            "culled": self.culled,
            "peak_memory_bytes": self.peak_memory_bytes,
            "param_count": self.param_count,
            "last_updated": self.last_updated,
        }


def _mean(values: deque[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite(name: str, value: float, slot: str, blueprint_id: str) -> float:
    out = float(value)
    if not math.isfinite(out):
        raise SelectionError(
            f"{name} for slot {slot!r}, blueprint {blueprint_id!r} must be finite, got {value!r}"
        )
    return out


class PerformanceTracker:
    """Per-(slot, blueprint) statistics from real training, with windows and discounting.

    :param window: how many of the latest observations the ``window_*`` figures cover (``>= 1``).
    :param discount: weight decay per new observation for the discounted mean, in (0, 1].
    :param clock: returns the current time in seconds; injectable so tests need no sleeping.
    :raises SelectionError: if ``window`` or ``discount`` is out of range.

    Example::

        tracker = PerformanceTracker(window=50, discount=0.9)
        tracker.record_contribution("block2", bp.id, loss_with=0.41, loss_without=0.45,
                                    acc_with=0.88, acc_without=0.86)
        tracker.record_outcome("block2", bp.id, "fossilized", loss_before=0.9, loss_after=0.4)
        tracker.save(run_dir / "selection_tracker.json")
    """

    def __init__(
        self,
        *,
        window: int = 50,
        discount: float = 0.9,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if int(window) < 1:
            raise SelectionError(f"tracker window must be at least 1, got {window}")
        if not 0.0 < discount <= 1.0:
            raise SelectionError(f"tracker discount must be in (0, 1], got {discount}")
        self.window = int(window)
        self.discount = float(discount)
        self._clock = clock
        self._pairs: dict[tuple[str, str], _PairStats] = {}

    def _stats(self, slot: str, blueprint_id: str) -> _PairStats:
        key = (str(slot), str(blueprint_id))
        stats = self._pairs.get(key)
        if stats is None:
            stats = self._pairs[key] = _PairStats(self.window)
        stats.last_updated = float(self._clock())
        return stats

    def record_contribution(
        self,
        slot: str,
        blueprint_id: str,
        *,
        loss_with: float,
        loss_without: float,
        acc_with: float | None = None,
        acc_without: float | None = None,
    ) -> float:
        """Record one counterfactual measurement: the same validation batch with the seed and with
        its alpha set to 0.

        :param slot: the slot's name.
        :param blueprint_id: the seed's blueprint id.
        :param loss_with: validation loss with the seed blended in.
        :param loss_without: validation loss on the same batch with alpha = 0.
        :param acc_with: accuracy with the seed, if measured (both or neither).
        :param acc_without: accuracy with alpha = 0, if measured.
        :returns: the contribution, ``loss_without - loss_with``.
        :raises SelectionError: if a figure is not finite, or only one accuracy is given.
        """
        contribution = _finite("loss_without", loss_without, slot, blueprint_id) - _finite(
            "loss_with", loss_with, slot, blueprint_id
        )
        if (acc_with is None) != (acc_without is None):
            raise SelectionError(
                f"slot {slot!r}, blueprint {blueprint_id!r}: give both acc_with and acc_without, "
                "or neither"
            )
        stats = self._stats(slot, blueprint_id)
        stats.contributions.append(contribution)
        if acc_with is not None and acc_without is not None:
            stats.accuracy_deltas.append(
                _finite("acc_with", acc_with, slot, blueprint_id)
                - _finite("acc_without", acc_without, slot, blueprint_id)
            )
        stats.observations += 1
        stats.discounted_sum = self.discount * stats.discounted_sum + contribution
        stats.discounted_weight = self.discount * stats.discounted_weight + 1.0
        return contribution

    def record_cost(
        self,
        slot: str,
        blueprint_id: str,
        *,
        latency_ms: float | None = None,
        memory_bytes: int | None = None,
        param_count: int | None = None,
    ) -> None:
        """Record what a seed costs: forward latency, memory (the peak is kept), parameter count.

        :raises SelectionError: if a figure is negative or not finite.
        """
        stats = self._stats(slot, blueprint_id)
        for name, value in (
            ("latency_ms", latency_ms),
            ("memory_bytes", memory_bytes),
            ("param_count", param_count),
        ):
            if value is not None and not _finite(name, value, slot, blueprint_id) >= 0:
                raise SelectionError(
                    f"{name} for slot {slot!r}, blueprint {blueprint_id!r} must be >= 0, got "
                    f"{value!r}"
                )
        if latency_ms is not None:
            stats.latencies_ms.append(float(latency_ms))
        if memory_bytes is not None:
            stats.peak_memory_bytes = max(stats.peak_memory_bytes or 0, int(memory_bytes))
        if param_count is not None:
            stats.param_count = int(param_count)

    def record_outcome(
        self,
        slot: str,
        blueprint_id: str,
        outcome: SeedOutcome | str,
        *,
        loss_before: float,
        loss_after: float,
    ) -> None:
        """Record how a seed's life ended and the training loss change over that life.

        :param outcome: ``"fossilized"`` or ``"culled"``.
        :param loss_before: training loss when the seed germinated.
        :param loss_after: training loss when it was fossilized or culled.
        :raises SelectionError: if the outcome is unknown or a loss is not finite.
        """
        try:
            result = SeedOutcome(outcome)
        except ValueError as exc:
            raise SelectionError(
                f"unknown seed outcome {outcome!r}; use one of "
                f"{', '.join(o.value for o in SeedOutcome)}"
            ) from exc
        improvement = _finite("loss_before", loss_before, slot, blueprint_id) - _finite(
            "loss_after", loss_after, slot, blueprint_id
        )
        stats = self._stats(slot, blueprint_id)
        stats.loss_improvements.append(improvement)
        if result is SeedOutcome.FOSSILIZED:
            stats.fossilized += 1
        else:
            stats.culled += 1
        _log.debug(
            "seed outcome recorded",
            slot=slot,
            blueprint=blueprint_id,
            outcome=result.value,
            loss_improvement=improvement,
        )

    def pair(self, slot: str, blueprint_id: str) -> PairSummary | None:
        """The summary of one pair, or ``None`` if nothing was recorded for it."""
        stats = self._pairs.get((slot, blueprint_id))
        return None if stats is None else self._summarise(slot, blueprint_id, stats)

    def summary(self) -> dict[tuple[str, str], PairSummary]:
        """A summary for every pair with a record, keyed by ``(slot, blueprint_id)``."""
        return {key: self._summarise(*key, stats) for key, stats in sorted(self._pairs.items())}

    @staticmethod
    def _summarise(slot: str, blueprint_id: str, s: _PairStats) -> PairSummary:
        return PairSummary(
            slot=slot,
            blueprint_id=blueprint_id,
            observations=s.observations,
            window_contribution=_mean(s.contributions),
            discounted_contribution=(
                s.discounted_sum / s.discounted_weight if s.discounted_weight else None
            ),
            window_accuracy_delta=_mean(s.accuracy_deltas),
            lives=s.fossilized + s.culled,
            fossilized=s.fossilized,
            culled=s.culled,
            mean_loss_improvement=_mean(s.loss_improvements),
            mean_latency_ms=_mean(s.latencies_ms),
            peak_memory_bytes=s.peak_memory_bytes,
            param_count=s.param_count,
            last_updated=s.last_updated,
        )

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole state, JSON-ready."""
        return {
            "version": STATE_VERSION,
            "window": self.window,
            "discount": self.discount,
            "pairs": [
                {"slot": slot, "blueprint_id": bp, **stats.to_json()}
                for (slot, bp), stats in sorted(self._pairs.items())
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this tracker's records with those of ``state`` (from :meth:`state_dict`).

        The window and discount of ``state`` are adopted.

        :raises SelectionError: if the state has another version or is malformed.
        """
        if state.get("version") != STATE_VERSION:
            raise SelectionError(
                f"tracker state version {state.get('version')!r} is not supported (this build "
                f"reads {STATE_VERSION})"
            )
        try:
            window = int(state["window"])
            discount = float(state["discount"])
            pairs: dict[tuple[str, str], _PairStats] = {}
            for row in state["pairs"]:
                fields = {k: v for k, v in row.items() if k not in ("slot", "blueprint_id")}
                pairs[(str(row["slot"]), str(row["blueprint_id"]))] = _PairStats(window, **fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise SelectionError(f"malformed tracker state: {exc!r}") from exc
        self.window, self.discount, self._pairs = window, discount, pairs

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state as JSON atomically: a temp file in the same folder, fsync, rename.

        :raises SelectionError: if the file cannot be written (the previous file is untouched).
        """
        target = Path(path)
        data = json.dumps(self.state_dict(), sort_keys=True).encode()
        try:
            write_atomic(target, data)  # a temporary created O_EXCL | O_NOFOLLOW, then renamed
        except OSError as exc:
            raise SelectionError(f"could not save the tracker to {target}: {exc}") from exc

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> PerformanceTracker:
        """Read a tracker written by :meth:`save`.

        :raises SelectionError: if the file is missing, unreadable, not a regular file, larger
            than :data:`MAX_STATE_BYTES`, or not a tracker state.
        """
        try:
            state = json.loads(read_regular(path, cap=MAX_STATE_BYTES).decode("utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SelectionError(f"could not load a tracker from {path}: {exc}") from exc
        if not isinstance(state, dict):
            raise SelectionError(f"{path} does not hold a tracker state")
        tracker = cls(clock=clock)
        tracker.load_state_dict(state)
        return tracker

    def __len__(self) -> int:
        return len(self._pairs)
