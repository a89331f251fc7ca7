"""Circuit breakers: a blueprint that keeps failing is paused for a cool-down.

A breaker is *closed* (calls allowed) until ``threshold`` failures fall within ``window_s``
seconds; then it *opens* for ``cooldown_s`` seconds (calls refused). When the cool-down ends it is
*half-open*: one trial call is allowed; its success closes the breaker, its failure opens it again
for a cool-down twice as long (up to ``max_cooldown_s``). Time comes from an injectable clock, so
tests step it instead of sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

__all__ = ("BreakerBoard", "BreakerConfig", "BreakerState", "CircuitBreaker")

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


class BreakerState(StrEnum):
    """Where a breaker stands."""

    CLOSED = "closed"
    """Calls are allowed; failures are being counted."""
    OPEN = "open"
    """Calls are refused until the cool-down ends."""
    HALF_OPEN = "half_open"
    """The cool-down is over; one trial call decides."""


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of a circuit breaker.

    :ivar threshold: failures within ``window_s`` that open the breaker.
    :ivar window_s: how far back failures count.
    :ivar cooldown_s: how long the breaker stays open the first time.
    :ivar max_cooldown_s: the cool-down doubles after a failed trial, up to this.
    :raises ValueError: if a figure is not positive.
    """

    threshold: int = 3
    window_s: float = 600.0
    cooldown_s: float = 300.0
    max_cooldown_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.threshold < 1 or min(self.window_s, self.cooldown_s, self.max_cooldown_s) <= 0:
            raise ValueError(
                f"a breaker needs threshold >= 1 and positive durations, got {self}"
            )


class CircuitBreaker:
    """One breaker (for one blueprint, say).

    :param name: what it guards, for logs.
    :param config: thresholds.
    :param clock: seconds, monotonic; default :func:`time.monotonic`.
    """

    def __init__(
        self, name: str, config: BreakerConfig | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._failures: deque[float] = deque()
        self._opened_at: float | None = None
        self._cooldown = self.config.cooldown_s
        self._trial = False
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        """The breaker's state now."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at < self._cooldown:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def retry_after(self) -> float:
        """Seconds until a call may be tried again (0 when one may be tried now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._cooldown - self._clock())

    def allow(self) -> bool:
        """Whether a call may start now. In the half-open state only the first caller gets a
        trial; others are refused until it reports."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: close the breaker and forget its failures."""
        if self._opened_at is not None:
            log.info("breaker closed", breaker=self.name)
        self._failures.clear()
        self._opened_at = None
        self._cooldown = self.config.cooldown_s
        self._trial = False

    def record_failure(self, reason: str = "") -> None:
        """A call failed: count it; open the breaker at the threshold or after a failed trial."""
        now = self._clock()
        if self._opened_at is not None:
            # A failed trial (or a late failure while open): open again, for longer.
            if self.state is not BreakerState.OPEN:
                self._cooldown = min(self._cooldown * 2, self.config.max_cooldown_s)
            self._open(now, reason)
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.config.window_s:
            self._failures.popleft()
        if len(self._failures) >= self.config.threshold:
            self._open(now, reason)

    def _open(self, now: float, reason: str) -> None:
        self._opened_at = now
        self._trial = False
        self._failures.clear()
        self.trips += 1
        log.warning(
            "breaker open", breaker=self.name, cooldown_s=self._cooldown, reason=reason,
            trips=self.trips,
        )

    def state_dict(self) -> dict[str, Any]:
        """The breaker's state, with times relative to now (clocks differ between processes)."""
        now = self._clock()
        return {
            "failures_ago": [now - t for t in self._failures],
            "opened_ago": None if self._opened_at is None else now - self._opened_at,
            "cooldown": self._cooldown,
            "trips": self.trips,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (times re-anchored on this clock)."""
        now = self._clock()
        self._failures = deque(now - float(a) for a in state["failures_ago"])
        ago = state["opened_ago"]
        self._opened_at = None if ago is None else now - float(ago)
        self._cooldown = float(state["cooldown"])
        self.trips = int(state["trips"])
        self._trial = False


class BreakerBoard:
    """One :class:`CircuitBreaker` per key (a blueprint id), made on first use.

    :param config: thresholds shared by every breaker.
    :param clock: seconds, monotonic; default :func:`time.monotonic`.
    """

    def __init__(
        self, config: BreakerConfig | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def __getitem__(self, key: str) -> CircuitBreaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(key, self.config, clock=self._clock)
        return breaker

    def allow(self, key: str) -> bool:
        """Whether a call for ``key`` may start now."""
        return self[key].allow()

    def open_keys(self) -> list[str]:
        """Keys whose breaker refuses calls now."""
        return sorted(k for k, b in self._breakers.items() if b.state is BreakerState.OPEN)

    def state_dict(self) -> dict[str, Any]:
        """Every breaker's state, for checkpoints."""
        return {k: b.state_dict() for k, b in self._breakers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._breakers.clear()
        for key, value in state.items():
            self[key].load_state_dict(value)
