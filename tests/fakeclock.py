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


class ManualClock:
    """A clock that moves only when the test calls :meth:`advance`; ``sleep`` waits for that. For code whose
    waits must not end by themselves (a watch settling files while a writer is still at work)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._moved: anyio.Event | None = None

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        while self.now < until:
            if self._moved is None:
                self._moved = anyio.Event()
            await self._moved.wait()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        moved, self._moved = self._moved, None
        if moved is not None:
            moved.set()
