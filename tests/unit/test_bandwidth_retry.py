"""Token bucket and the pacer (the one retry loop), with time stepped by a fake clock (no sleeping)."""

from __future__ import annotations

import anyio
import pytest

from asyncdepo.errors import AuthError, OffsetMismatchError, RateLimitedError, TransientError
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.pacer import Pacer, RetryEvent, RetryPolicy, Verdict, retry_call, should_retry
from tests.fakeclock import FakeClock


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
    policy = RetryPolicy(attempts=4, base=1.0, cap=100.0)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RateLimitedError("slow down", retry_after=7.0, status=429)
        if calls < 4:
            raise TransientError("boom")
        return "ok"

    assert await retry_call(flaky, policy, clock=clock, rng=lambda: 1.0) == "ok"
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
        await retry_call(denied, RetryPolicy(), clock=clock)
    assert calls == 1 and clock.slept == []


async def test_retry_gives_up_after_attempts() -> None:
    clock = FakeClock()

    async def down() -> None:
        raise TransientError("503")

    with pytest.raises(TransientError):
        await retry_call(down, RetryPolicy(attempts=3), clock=clock, rng=lambda: 0.5)
    assert len(clock.slept) == 2


async def test_deadline_ends_retries_before_the_wait_would_pass_it() -> None:
    clock = FakeClock()
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("503", status=503)

    pacer = Pacer(RetryPolicy(attempts=100, base=1.0, cap=8.0, deadline=20.0), clock=clock, rng=lambda: 1.0)
    with pytest.raises(TransientError):
        await pacer.call(down)
    # waits 1, 2, 4, 8 (15 s in all); the next 8 s would end past 20 s: no fifth wait
    assert clock.slept == [1.0, 2.0, 4.0, 8.0] and calls == 5


async def test_retry_after_is_capped_and_reported_with_its_reason() -> None:
    clock = FakeClock()
    seen: list[RetryEvent] = []
    calls = 0

    async def busy() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RateLimitedError("slow down", retry_after=3600.0, status=429)
        if calls == 2:
            raise TransientError("bad gateway", status=502)
        return "ok"

    pacer = Pacer(RetryPolicy(max_retry_after=60.0), clock=clock, rng=lambda: 0.0, on_retry=seen.append)
    assert await pacer.call(busy) == "ok"
    assert clock.slept == [60.0, 0.0]
    assert [(e.attempt, e.reason) for e in seen] == [(1, "429"), (2, "5xx")]


async def test_tokens_are_held_during_attempts_and_released_during_waits() -> None:
    clock = FakeClock()
    tokens = anyio.CapacityLimiter(1)
    held_in_wait: list[int] = []

    class Watch(FakeClock):
        async def sleep(self, seconds: float) -> None:
            held_in_wait.append(int(tokens.borrowed_tokens))
            await super().sleep(seconds)

    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        assert tokens.borrowed_tokens == 1  # the attempt runs holding the token
        if calls < 3:
            raise TransientError("reset")

    await Pacer(RetryPolicy(), tokens=tokens, clock=Watch()).call(flaky)
    assert calls == 3 and held_in_wait == [0, 0] and clock.slept == []


async def test_a_classifier_decides_and_groups_are_unwrapped() -> None:
    clock = FakeClock()

    def no_offsets(exc: BaseException) -> Verdict:
        return Verdict(False, reason="offset") if isinstance(exc, OffsetMismatchError) else should_retry(exc)

    async def grouped() -> None:
        raise ExceptionGroup("task group", [OffsetMismatchError("moved", offset=5)])

    with pytest.raises(OffsetMismatchError):  # the leaf, not the group
        await Pacer(classify=no_offsets, clock=clock).call(grouped)
    assert clock.slept == []
