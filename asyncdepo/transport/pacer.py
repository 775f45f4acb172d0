"""Backoff with full jitter, Retry-After honoured, transient/permanent classification.

The policy takes its clock, sleep and random source as parameters so tests step time instead of sleeping
(the s3transfer pattern). ``retry_call`` is the per-request level of the three retry levels; the engine
uses the same policy per item.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from asyncdepo.errors import RateLimitedError, is_transient

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the n-th retry waits uniform(0, min(cap, base * 2**n)) seconds
    ("full jitter"), or the server's Retry-After when it gave one (capped at ``max_retry_after``)."""

    attempts: int = 5
    base: float = 0.2
    cap: float = 10.0
    max_retry_after: float = 120.0
    rng: Callable[[], float] = random.random
    sleep: Sleep = anyio.sleep

    def delay(self, retry: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based) after ``exc``."""
        if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        # 2.0 ** n, not 2 ** n: an int power is typed Any (a negative n gives a float)
        return self.rng() * min(self.cap, self.base * 2.0**retry)


OnRetry = Callable[[int, BaseException, float], None]


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy | None = None,
    *,
    on_retry: OnRetry | None = None,
) -> T:
    """``await fn()``, retrying transient failures (``errors.is_transient``) under ``policy``.

    :raises: the last exception when attempts run out, or at once when it is permanent.
    """
    policy = policy or RetryPolicy()
    retry = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not is_transient(exc) or retry + 1 >= policy.attempts:
                raise
            wait = policy.delay(retry, exc)
            if on_retry is not None:
                on_retry(retry + 1, exc, wait)
            retry += 1
            await policy.sleep(wait)
