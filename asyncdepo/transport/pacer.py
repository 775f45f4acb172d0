"""The one retry loop: every level that retries (a request, an item, a run) goes through :meth:`Pacer.call`.

Modelled on rclone's ``lib/pacer``: the *loop* (call, classify, wait, call again) lives here once, and the
*decision* whether a failure is worth another try is a classifier kept apart from it (rclone's
``shouldRetry``; ours is :func:`should_retry`, which reads the :mod:`asyncdepo.errors` tree). Errors are
translated into that tree at the transport boundary (:mod:`asyncdepo.transport.failures`) before they get
here, so the loop never looks at an HTTP status or an errno.

What a caller may rely on:

* **Waits** are "full jitter": before retry ``n`` (0-based) the pacer sleeps ``uniform(0, min(cap, base *
  2**n))``; when the server named a wait (``Retry-After``, carried by :class:`~asyncdepo.errors.RateLimitedError`)
  that wait is used instead, capped at ``max_retry_after``.
* **Bounds**: at most ``attempts`` calls in all, and no retry starts once ``deadline`` seconds (waits
  included) would be exceeded; then the last error is raised. A permanent error is raised at once.
* **Tokens**: with ``tokens`` (a CapacityLimiter, e.g. ``--transfers`` request slots, or any async context
  manager that holds a slot while entered) each attempt runs
  holding a token and the waits between attempts hold none, so a backing-off request never blocks others.
* **Time** comes from an injectable :class:`Clock` (``monotonic`` and ``sleep``) and randomness from
  ``rng``: tests step a fake clock instead of sleeping (s3transfer's pattern).
* **Groups**: a failure wrapped in exception groups (task groups wrap) is classified, and re-raised, as its
  first leaf.
* ``on_retry`` is called before each wait with a :class:`RetryEvent` (attempt number, the error, the wait,
  a short reason for metrics); it must be quick and must not raise.
* Cancellation is never caught.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

import anyio

from asyncdepo.errors import (
    IntegrityError,
    OffsetMismatchError,
    RateLimitedError,
    SourceChangedError,
    TransientError,
)

T = TypeVar("T")


class Clock(Protocol):
    """Where the pacer's time comes from (a fake one in tests)."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``anyio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a classifier says of one failure: retry it or not, after how long the server asked for (None:
    the backoff decides), and a short reason used in events and metrics."""

    retry: bool
    after: float | None = None
    reason: str = ""


def first_leaf(exc: BaseException) -> BaseException:
    """The first leaf of nested exception groups (task groups wrap errors), or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def reason_of(exc: BaseException) -> str:
    """A short, stable label for a failure (``"429"``, ``"5xx"``, ``"network"``, ...), for metrics."""
    if isinstance(exc, RateLimitedError):
        return str(exc.status or "rate-limited")
    if isinstance(exc, OffsetMismatchError):
        return "offset"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, SourceChangedError):
        return "source-changed"
    if isinstance(exc, TransientError):
        status = exc.status
        if status is None:
            return "network"
        return "5xx" if status >= 500 else str(status)
    return type(exc).__name__


def should_retry(exc: BaseException) -> Verdict:
    """The default classification, from the errors tree (``errors.is_transient``): transient transfer errors,
    a source that changed while it was read and an integrity failure are retried; everything else is not.
    A RateLimitedError's ``retry_after`` becomes the wait."""
    leaf = first_leaf(exc)
    if isinstance(leaf, (TransientError, SourceChangedError, IntegrityError)):
        after = leaf.retry_after if isinstance(leaf, RateLimitedError) else None
        return Verdict(True, after, reason_of(leaf))
    return Verdict(False, None, reason_of(leaf))


Classify = Callable[[BaseException], Verdict]


@dataclasses.dataclass(frozen=True)
class RetryEvent:
    """Passed to ``on_retry`` before a wait. ``attempt`` counts retries from 1."""

    attempt: int
    error: BaseException
    delay: float
    reason: str


OnRetry = Callable[[RetryEvent], None]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How many tries, how long the waits, how long in all (see the module docstring)."""

    attempts: int = 5
    base: float = 0.2
    cap: float = 10.0
    max_retry_after: float = 120.0
    deadline: float | None = None

    def delay(self, retry: int, after: float | None, rng: Callable[[], float]) -> float:
        """Seconds to wait before retry number ``retry`` (0-based); ``after`` is a wait the server named."""
        if after is not None:
            return min(max(0.0, after), self.max_retry_after)
        # 2.0 ** n, not 2 ** n: an int power is typed Any (a negative n gives a float)
        return rng() * min(self.cap, self.base * 2.0**retry)


class Pacer:
    """Calls a coroutine function until it succeeds, fails permanently, or the policy's bounds are reached.

    :param policy: attempts, backoff and deadline.
    :param classify: the retry decision (default :func:`should_retry`).
    :param tokens: a limiter held during each attempt (not during waits).
    :param on_retry: told about every retry (events, counters).
    :param clock: time source; :param rng: a uniform [0, 1) source for the jitter.
    """

    def __init__(self, policy: RetryPolicy | None = None, *, classify: Classify = should_retry,
                 tokens: AbstractAsyncContextManager[Any] | None = None, on_retry: OnRetry | None = None,
                 clock: Clock = SYSTEM_CLOCK, rng: Callable[[], float] = random.random) -> None:
        self.policy = policy or RetryPolicy()
        self.classify = classify
        self.tokens = tokens
        self.on_retry = on_retry
        self.clock = clock
        self.rng = rng

    def derive(self, *, attempts: int | None = None, classify: Classify | None = None) -> Pacer:
        """A pacer like this one (same clock, tokens and hooks) with another number of attempts or another
        classifier."""
        policy = self.policy if attempts is None else dataclasses.replace(self.policy, attempts=attempts)
        return Pacer(policy, classify=classify or self.classify, tokens=self.tokens, on_retry=self.on_retry,
                     clock=self.clock, rng=self.rng)

    async def call(self, fn: Callable[[], Awaitable[T]], *, on_retry: OnRetry | None = None) -> T:
        """``await fn()`` under the policy; ``on_retry`` (in addition to the pacer's own) hears each retry.

        :raises: the last failure (its first leaf, when wrapped in groups) once it is permanent or the
            bounds are reached.
        """
        policy, clock = self.policy, self.clock
        started = clock.monotonic()
        retries = 0
        while True:
            try:
                if self.tokens is None:
                    return await fn()
                async with self.tokens:
                    return await fn()
            except Exception as exc:  # noqa: BLE001 - classified below; cancellation is not an Exception
                leaf = first_leaf(exc)
                verdict = self.classify(leaf)
                if not verdict.retry or retries + 1 >= policy.attempts:
                    raise _plain(exc, leaf) from None
                wait = policy.delay(retries, verdict.after, self.rng)
                if policy.deadline is not None and clock.monotonic() - started + wait > policy.deadline:
                    raise _plain(exc, leaf) from None
                retries += 1
                event = RetryEvent(retries, leaf, wait, verdict.reason)
                for hook in (self.on_retry, on_retry):
                    if hook is not None:
                        hook(event)
                await clock.sleep(wait)


def _plain(exc: Exception, leaf: BaseException) -> BaseException:
    """The error to raise when giving up: the leaf of a group (DepoErrors are what callers expect), else
    the exception itself."""
    return leaf if isinstance(exc, BaseExceptionGroup) and isinstance(leaf, Exception) else exc


async def retry_call(fn: Callable[[], Awaitable[T]], policy: RetryPolicy | None = None, *,
                     on_retry: OnRetry | None = None, clock: Clock = SYSTEM_CLOCK,
                     rng: Callable[[], float] = random.random) -> T:
    """``Pacer(policy).call(fn)``: for one-off calls that need no tokens or classifier of their own."""
    return await Pacer(policy, clock=clock, rng=rng).call(fn, on_retry=on_retry)


__all__ = (
    "SYSTEM_CLOCK", "Classify", "Clock", "OnRetry", "Pacer", "RetryEvent", "RetryPolicy",
    "SystemClock", "Verdict", "first_leaf", "reason_of", "retry_call", "should_retry",
)
