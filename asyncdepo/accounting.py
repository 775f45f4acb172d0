"""The run's counters (rclone's ``fs/accounting`` as the model): workers only add to them, through the
methods below; renderers, ``--json`` snapshots, metrics and the final report read :meth:`Stats.snapshot`
or the attributes. Nothing else assigns to a counter.

Single-threaded: call from the event loop only (worker threads report through the loop).

Counters: ``files_total``/``bytes_total`` (found by the walk or the listing), ``files_done``, ``files_skipped``,
``files_failed``, ``bytes_done`` (bytes of items confirmed or skipped, uncompressed), ``bytes_sent`` (bytes
on the wire, re-sent and compressed bytes included), ``retries`` (and ``retries_by_reason``). Gauges with
high-water marks, so tests can assert the engine's bounds without timing: ``in_flight`` items,
``buffered`` bytes of reserved buffers, ``requests_in_flight``. ``active`` maps each item in flight to
``[size, bytes moved]`` for progress displays.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any


class Stats:
    """Counters of one run; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.files_total = 0
        self.bytes_total = 0
        self.walk_done = False
        self.files_done = 0
        self.files_skipped = 0
        self.files_failed = 0
        self.bytes_done = 0
        self.bytes_sent = 0
        self.retries = 0
        self.retries_by_reason: Counter[str] = Counter()
        self.active: dict[str, list[int]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.buffered = 0
        self.max_buffered = 0
        self.requests_in_flight = 0
        self.max_requests_in_flight = 0

    # -- what the walk or the listing found ----------------------------------------------------------
    def found(self, size: int | None, files: int = 1) -> None:
        """One more item to move (``files`` files in one unit), of ``size`` bytes (None or negative: not
        known)."""
        self.files_total += files
        self.bytes_total += max(0, size or 0)

    def walk_finished(self) -> None:
        self.walk_done = True

    def restart_walk(self) -> None:
        """Forget the totals (a packed stream walks the tree again when it is retried)."""
        self.files_total = self.bytes_total = 0

    # -- items ---------------------------------------------------------------------------------------
    def item_in(self, rel: str, size: int) -> None:
        """``rel`` is in flight."""
        self.active[rel] = [size, 0]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def item_out(self, rel: str) -> None:
        """``rel`` is no longer in flight (done, failed or given back)."""
        if self.active.pop(rel, None) is not None:
            self.in_flight -= 1

    def moved(self, rel: str, n: int) -> None:
        """``n`` bytes of ``rel`` went over the wire (or were received)."""
        self.bytes_sent += n
        slot = self.active.get(rel)
        if slot is not None:
            slot[1] += n

    def done(self, size: int, files: int = 1) -> None:
        """An item of ``size`` bytes (``files`` files in one unit) is confirmed."""
        self.files_done += files
        self.bytes_done += max(0, size)

    def skipped(self, size: int, files: int = 1) -> None:
        """An item of ``size`` bytes (``files`` files in one unit) needed no transfer (unchanged, or the
        archive has it)."""
        self.files_skipped += files
        self.bytes_done += max(0, size)

    def failed(self) -> None:
        self.files_failed += 1

    def requeued(self, n: int) -> None:
        """``n`` failed items are being tried again (an end-of-run retry round)."""
        self.files_failed -= n

    def retried(self, reason: str) -> None:
        """One retry, at any level; ``reason`` is the pacer's short label (``"5xx"``, ``"network"``...)."""
        self.retries += 1
        self.retries_by_reason[reason] += 1

    def packed_progress(self, bytes_done: int, *, finished: bool = False) -> None:
        """A packed stream (one archive of many files) has consumed ``bytes_done`` bytes of the tree; when
        ``finished`` every file found counts as done."""
        self.bytes_done = bytes_done
        if finished:
            self.files_done = self.files_total

    # -- gauges --------------------------------------------------------------------------------------
    def buffer(self, delta: int) -> None:
        """Reserved buffer bytes changed by ``delta``."""
        self.buffered += delta
        self.max_buffered = max(self.max_buffered, self.buffered)

    def request(self, delta: int) -> None:
        """Requests in flight changed by ``delta``."""
        self.requests_in_flight += delta
        self.max_requests_in_flight = max(self.max_requests_in_flight, self.requests_in_flight)

    # -- reading -------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Every counter as a JSON-able dict (what ``--json`` writes each tick and renderers draw)."""
        elapsed = max(1e-9, self.clock() - self.started)
        return {
            "elapsed": round(elapsed, 3),
            "files_total": self.files_total,
            "files_done": self.files_done,
            "files_skipped": self.files_skipped,
            "files_failed": self.files_failed,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "bytes_sent": self.bytes_sent,
            # bytes moved so far of the items in flight (each counted up to its size): progress displays add
            # them to bytes_done so the overall bar moves while a large file is sent, not only when it ends
            "bytes_moving": sum(min(sent, size) for size, sent in self.active.values() if size > 0),
            "rate": self.bytes_sent / elapsed,
            "retries": self.retries,
            "retries_by_reason": dict(self.retries_by_reason),
            "in_flight": self.in_flight,
            "requests_in_flight": self.requests_in_flight,
            "walk_done": self.walk_done,
            "active": {k: v[:] for k, v in list(self.active.items())[:8]},
        }
