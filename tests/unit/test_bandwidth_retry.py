"""Token bucket and retry policy, with time stepped by a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.pacer import RetryPolicy, retry_call
from asyncdepo.errors import AuthError, RateLimitedError, TransientError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_bucket_caps_rate_over_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, burst=100_000, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        await bucket.acquire(100_000)  # 5 MB in all
    # the bucket starts empty: 5 MB at 1 MB/s take 5 s, not a second less
    assert clock.now == pytest.approx(5.0, rel=1e-6)


async def test_bucket_grants_requests_larger_than_burst_in_slices() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock, sleep=clock.sleep)
    await bucket.acquire(1100)
    assert clock.now == pytest.approx(1.1)
    assert max(clock.slept) <= 0.1 + 1e-9


async def test_bucket_refills_while_idle_only_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=1000, clock=clock, sleep=clock.sleep)
    await bucket.acquire(1000)
    assert sum(clock.slept) == pytest.approx(1.0)
    clock.slept.clear()
    clock.now += 10  # idle: refills only up to the burst
    await bucket.acquire(1000)
    assert clock.slept == []
    await bucket.acquire(500)
    assert sum(clock.slept) == pytest.approx(0.5)


async def test_bwlimit_within_3_percent_over_the_run_and_any_10s_window() -> None:
    """8 workers push 200 MB at 20 MB/s in 16 MiB chunks and 1 MiB stream blocks, as a run would: the
    bytes granted stay within 3 % of the limit over the run and over every 10 s window after the first
    second (a bucket that started with a second of credit averaged 1.1x here)."""
    import anyio

    rate = 20e6
    clock = FakeClock()
    bucket = TokenBucket(rate, clock=clock, sleep=clock.sleep)
    grants: list[tuple[float, int]] = []  # (time, bytes) of every request granted

    async def acquire(n: int) -> None:
        await bucket.acquire(n)
        grants.append((clock.now, n))

    left = [200_000_000]

    async def worker(size: int) -> None:
        while left[0] > 0:
            n = min(size, left[0])
            left[0] -= n
            await acquire(n)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(worker, 16 << 20 if i % 2 else 1 << 20)
    total = sum(n for _, n in grants)
    assert total == 200_000_000
    assert total / clock.now <= rate * 1.03 and total / clock.now >= rate * 0.97
    # every 10 s window that starts after the first second, in 0.1 s steps; a chunk counts when granted
    start = 1.0
    while start + 10 <= clock.now:
        window = sum(n for t, n in grants if start < t <= start + 10)
        assert window <= rate * 10 * 1.03, (start, window / 10 / rate)
        start += 0.1


async def test_retry_full_jitter_and_retry_after() -> None:
    clock = FakeClock()
    policy = RetryPolicy(attempts=4, base=1.0, cap=100.0, rng=lambda: 1.0, sleep=clock.sleep)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RateLimitedError("slow down", retry_after=7.0, status=429)
        if calls < 4:
            raise TransientError("boom")
        return "ok"

    assert await retry_call(flaky, policy) == "ok"
    # Retry-After honoured, then 1*2**1, 1*2**2 (rng=1.0 gives the top of the jitter window)
    assert clock.slept == [7.0, 2.0, 4.0]


async def test_retry_stops_at_once_on_permanent_errors() -> None:
    clock = FakeClock()
    calls = 0

    async def denied() -> None:
        nonlocal calls
        calls += 1
        raise AuthError("bad token", status=401)

    with pytest.raises(AuthError):
        await retry_call(denied, RetryPolicy(sleep=clock.sleep))
    assert calls == 1 and clock.slept == []


async def test_retry_gives_up_after_attempts() -> None:
    clock = FakeClock()

    async def down() -> None:
        raise TransientError("503")

    with pytest.raises(TransientError):
        await retry_call(down, RetryPolicy(attempts=3, rng=lambda: 0.5, sleep=clock.sleep))
    assert len(clock.slept) == 2
