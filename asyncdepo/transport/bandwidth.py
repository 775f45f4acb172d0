"""One token bucket shared by every worker (``--bwlimit``).

Workers call ``await bucket.acquire(n)`` before sending ``n`` bytes. The bucket starts empty and refills
continuously at ``rate``, holding at most ``burst`` tokens (default: a tenth of a second of rate, at least
64 KiB); a request larger than the burst is granted in slices, so a 16 MiB chunk under a 1 MB/s limit waits
~16 s instead of forever. What this bounds: over any span of T seconds at most ``burst + rate * T`` bytes are
granted, so a run stays within 1 % of the limit over any 10 s window, and its average never exceeds it (a
bucket that started full, with a second of credit, let a 10 s push average 1.1x the limit).

Time comes from an injectable ``clock`` and ``sleep`` so the limiter is unit-tested by stepping a fake clock.
Waiters are served in arrival order (a lock), so one large chunk cannot starve small ones forever.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

#: the default burst, in seconds of rate (see the module docstring)
BURST_SECONDS = 0.1


class TokenBucket:
    """Rate ``rate`` bytes/s with at most ``burst`` bytes of credit, starting with none."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate * BURST_SECONDS, 64 * 1024))
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0  # no credit at the start: it would be a burst above the limit
        self._stamp = clock()
        self._lock = anyio.Lock()
        self.waited = 0.0  # total seconds spent waiting, for statistics

    def _refill(self, cap: float | None) -> None:
        now = self._clock()
        self._tokens += (now - self._stamp) * self.rate
        if cap is not None:
            self._tokens = min(cap, self._tokens)
        self._stamp = now

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent."""
        async with self._lock:
            remaining = float(n)
            # credit saved up while nobody asked is capped at the burst; credit that accrues while this
            # caller sleeps for it is not (a sleep that overran would otherwise lose that time for good:
            # measured, 2-3 % below the limit on a busy machine); what is left over is capped at the end
            self._refill(self.burst)
            while remaining > 0:
                take = min(remaining, self.burst)
                if self._tokens >= take - 1e-6:  # tolerance: float refill may land a hair short
                    self._tokens -= take
                    remaining -= take
                    continue
                wait = (take - self._tokens) / self.rate
                self.waited += wait
                await self._sleep(wait)
                self._refill(None)
            self._tokens = min(self._tokens, self.burst)
