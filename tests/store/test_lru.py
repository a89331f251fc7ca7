from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esper_async.store import ByteLRU


def test_hits_misses_and_recency() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(10, len)
    assert lru.put("a", b"xxxx")
    assert lru.put("b", b"yyyy")
    assert lru.get("a") == b"xxxx"  # "a" is now the most recent
    assert lru.get("zz") is None
    assert lru.put("c", b"zzzz")  # 12 > 10: evicts "b", the least recent
    assert "b" not in lru and "a" in lru and "c" in lru
    stats = lru.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 1, 1)
    assert stats.nbytes == 8 and stats.entries == 2 and stats.capacity_bytes == 10
    assert stats.hit_rate == pytest.approx(0.5)


def test_value_larger_than_capacity_is_not_cached() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(4, len)
    assert lru.put("small", b"ab")
    assert not lru.put("big", b"abcde")
    assert "big" not in lru and "small" in lru


def test_zero_capacity_caches_nothing_and_negative_is_rejected() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(0, len)
    assert not lru.put("a", b"a")
    assert lru.get("a") is None
    with pytest.raises(ValueError, match="capacity_bytes"):
        ByteLRU(-1, len)


def test_replacing_a_key_updates_its_size_and_discard_where() -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(100, len)
    lru.put("a", b"x" * 10)
    lru.put("a", b"x" * 30)
    lru.put("b", b"y" * 5)
    assert lru.nbytes == 35 and len(lru) == 2
    assert lru.discard_where(lambda _k, v: v.startswith(b"x")) == 1
    assert lru.nbytes == 5 and lru.pop("b") == b"y" * 5 and lru.pop("b") is None
    lru.put("c", b"z")
    lru.clear()
    assert len(lru) == 0 and lru.nbytes == 0


@given(
    capacity=st.integers(0, 64),
    ops=st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 40)), max_size=60),
)
def test_never_exceeds_capacity_and_keeps_the_most_recent(
    capacity: int, ops: list[tuple[str, int]]
) -> None:
    lru: ByteLRU[str, bytes] = ByteLRU(capacity, len)
    for key, size in ops:
        cached = lru.put(key, b"v" * size)
        assert lru.nbytes <= capacity
        assert lru.nbytes == sum(len(v) for k in "abcdef" if (v := _peek(lru, k)) is not None)
        assert cached == (size <= capacity)
        if cached:
            assert key in lru


def _peek(lru: ByteLRU[str, bytes], key: str) -> bytes | None:
    return lru._items[key][0] if key in lru else None
