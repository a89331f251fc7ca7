"""Retries with jittered exponential backoff.

The delay before retry ``n`` (from 0) is drawn uniformly from ``[0, min(cap, base·factor^n)]``
("full jitter"): many callers that failed together do not retry together. The generator is
seeded, so a run's delays are reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import structlog

__all__ = ("Backoff", "retry")

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays between retries.

    :ivar base_s: the cap of the first delay.
    :ivar factor: growth of the cap per retry.
    :ivar cap_s: the largest delay.
    :ivar seed: seeds the jitter.
    :raises ValueError: if a figure is negative or ``factor < 1``.
    """

    base_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0 or self.factor < 1:
            raise ValueError(f"backoff needs base_s, cap_s >= 0 and factor >= 1, got {self}")
        self._rng = random.Random(self.seed)

    def ceiling(self, attempt: int) -> float:
        """The largest delay before retry ``attempt`` (0-based)."""
        return min(self.cap_s, self.base_s * self.factor**attempt)

    def delay(self, attempt: int) -> float:
        """A jittered delay before retry ``attempt``: uniform in ``[0, ceiling(attempt)]``."""
        return self._rng.uniform(0.0, self.ceiling(attempt))


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    backoff: Backoff,
    retry_on: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    what: str = "call",
    on_retry: Callable[[BaseException, int, float], None] | None = None,
) -> T:
    """Await ``fn()`` up to ``attempts`` times, sleeping a jittered delay between tries.

    :param fn: makes one attempt.
    :param attempts: the most tries (at least 1).
    :param backoff: the delays.
    :param retry_on: whether an exception is worth another try (others propagate at once).
    :param sleep: how to wait (injectable so tests do not sleep).
    :param what: a name for logs.
    :param on_retry: called with the exception, the attempt (from 1) and the delay before each
        retry.
    :raises Exception: the last attempt's exception, or the first one ``retry_on`` rejects.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return await fn()
        except Exception as exc:
            if attempt + 1 >= attempts or not retry_on(exc):
                raise
            delay = backoff.delay(attempt)
            log.warning(
                "retrying", what=what, attempt=attempt + 1, delay_s=round(delay, 3),
                error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            if on_retry is not None:
                on_retry(exc, attempt + 1, delay)
            await sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
