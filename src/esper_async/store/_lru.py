"""An in-memory least-recently-used cache bounded by the total size of its values, in bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ("ByteLRU", "LRUStats")

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class LRUStats:
    """A snapshot of an LRU's counters.

    :ivar hits: lookups that found their key.
    :ivar misses: lookups that did not.
    :ivar evictions: entries dropped to make room.
    :ivar entries: entries held now.
    :ivar nbytes: bytes held now.
    :ivar capacity_bytes: the bound on ``nbytes``.
    """

    hits: int
    misses: int
    evictions: int
    entries: int
    nbytes: int
    capacity_bytes: int

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ByteLRU(Generic[K, V]):
    """A dict-like LRU whose values are weighed by ``sizeof``; the total never exceeds capacity.

    Methods never await, so on one event loop each call is atomic. A value larger than the
    whole capacity is not cached (``put`` returns ``False``).

    :param capacity_bytes: the bound on the total size of the values held; 0 disables caching.
    :param sizeof: the size of a value in bytes.
    :raises ValueError: if ``capacity_bytes`` is negative.
    """

    def __init__(self, capacity_bytes: int, sizeof: Callable[[V], int]) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self._capacity = int(capacity_bytes)
        self._sizeof = sizeof
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._nbytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached (does not count as a lookup or refresh recency)."""
        return key in self._items

    @property
    def nbytes(self) -> int:
        """The total size of the values held."""
        return self._nbytes

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recently used), or ``None``; counts a hit or miss."""
        item = self._items.get(key)
        if item is None:
            self._misses += 1
            return None
        self._items.move_to_end(key)
        self._hits += 1
        return item[0]

    def put(self, key: K, value: V) -> bool:
        """Cache ``value`` under ``key``, evicting least recently used entries to make room.

        :returns: whether the value is now cached.
        """
        size = int(self._sizeof(value))
        self.pop(key)
        if size > self._capacity:
            return False
        while self._nbytes + size > self._capacity and self._items:
            _, (_, evicted) = self._items.popitem(last=False)
            self._nbytes -= evicted
            self._evictions += 1
        self._items[key] = (value, size)
        self._nbytes += size
        return True

    def pop(self, key: K) -> V | None:
        """Drop ``key``; the value it held, or ``None``."""
        item = self._items.pop(key, None)
        if item is None:
            return None
        self._nbytes -= item[1]
        return item[0]

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry for which ``predicate(key, value)`` is true; how many were dropped."""
        doomed = [k for k, (v, _) in self._items.items() if predicate(k, v)]
        for key in doomed:
            self.pop(key)
        return len(doomed)

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        self._items.clear()
        self._nbytes = 0

    def stats(self) -> LRUStats:
        """A snapshot of the counters."""
        return LRUStats(
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            entries=len(self._items),
            nbytes=self._nbytes,
            capacity_bytes=self._capacity,
        )
