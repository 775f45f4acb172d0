"""A clock whose time moves only when something sleeps on it: the pacer and the token bucket are tested by
stepping time, never by sleeping."""

from __future__ import annotations

import anyio


class FakeClock:
    """``monotonic()`` (also callable as ``clock()``) and ``sleep()``; every wait is recorded in ``slept``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()
