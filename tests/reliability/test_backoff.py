from __future__ import annotations

import pytest

from esper_async.errors import CompileError
from esper_async.reliability import Backoff, retry


def test_delays_are_jittered_below_a_growing_capped_ceiling() -> None:
    backoff = Backoff(base_s=1.0, factor=2.0, cap_s=5.0, seed=1)
    assert [backoff.ceiling(n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(0.0 <= d <= 5.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150  # jittered, not fixed


def test_same_seed_same_delays() -> None:
    a, b = Backoff(seed=7), Backoff(seed=7)
    assert [a.delay(n) for n in range(6)] == [b.delay(n) for n in range(6)]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("failures", "attempts", "succeeds"),
    [
        pytest.param(0, 3, True, id="first-try"),
        pytest.param(2, 3, True, id="third-try"),
        pytest.param(3, 3, False, id="exhausted"),
    ],
)
async def test_retry_sleeps_between_attempts(failures: int, attempts: int, succeeds: bool) -> None:
    slept: list[float] = []
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise CompileError("worker died", blueprint="bp")
        return "kernel"

    async def sleep(s: float) -> None:
        slept.append(s)

    backoff = Backoff(base_s=1.0, seed=0)
    if succeeds:
        assert await retry(fn, attempts=attempts, backoff=backoff, retry_on=lambda e: True,
                           sleep=sleep) == "kernel"
    else:
        with pytest.raises(CompileError):
            await retry(fn, attempts=attempts, backoff=backoff, retry_on=lambda e: True,
                        sleep=sleep)
    assert calls == min(failures + 1, attempts)
    assert len(slept) == calls - 1


@pytest.mark.asyncio
async def test_retry_does_not_retry_what_it_should_not() -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("permanent")

    async def sleep(s: float) -> None:
        raise AssertionError("must not sleep")

    with pytest.raises(ValueError):
        await retry(fn, attempts=5, backoff=Backoff(), retry_on=lambda e: False, sleep=sleep)
    assert calls == 1
