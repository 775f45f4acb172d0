"""Events the engine emits, the statistics it keeps, and the sinks that show them.

Workers never print. They emit frozen events (item queued/started/retrying/done/failed/skipped, job
started/finished, messages) to a :class:`Reporter`, and add byte counts to its :class:`Stats`
(a counter add, no event: a million small files cost little). A renderer polls ``stats.snapshot()``
a few times a second (the rclone accounting pattern) — rich progress on a terminal, periodic JSON
snapshots with ``--json`` — and receives the item events as they happen.

Secrets never reach an event: adapters put none in their messages, and ``JsonSink`` writes only the
fields declared here.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

log = logging.getLogger("asyncdepo")


def printable(name: str) -> str:
    """``name`` as it can be shown and written as JSON: a byte that is not UTF-8 (a surrogate escape, as
    ``os.fsdecode`` gives it for file names) appears as ``\\xNN``; every other name is returned as it is."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def printable_tree(value: Any) -> Any:
    """``value`` (JSON-like) with every string made :func:`printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): printable_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_tree(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; ``kind`` is the JSON ``event`` field."""

    kind = "event"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["event"] = self.kind
        return data


@dataclasses.dataclass(frozen=True, slots=True)
class JobStarted(Event):
    job: str
    source: str
    target: str
    resumed: bool
    kind = "job_started"


@dataclasses.dataclass(frozen=True, slots=True)
class ItemStarted(Event):
    rel: str
    size: int
    offset: int
    kind = "item_started"


@dataclasses.dataclass(frozen=True, slots=True)
class ItemRetrying(Event):
    rel: str
    attempt: int
    error: str
    delay: float
    kind = "item_retrying"


@dataclasses.dataclass(frozen=True, slots=True)
class ItemDone(Event):
    rel: str
    size: int
    sent: int
    digests: dict[str, str]
    kind = "item_done"


@dataclasses.dataclass(frozen=True, slots=True)
class ItemSkipped(Event):
    rel: str
    size: int
    reason: str
    kind = "item_skipped"


@dataclasses.dataclass(frozen=True, slots=True)
class ItemFailed(Event):
    rel: str
    error: str
    transient: bool
    kind = "item_failed"


@dataclasses.dataclass(frozen=True, slots=True)
class Message(Event):
    level: str
    text: str
    kind = "message"


@dataclasses.dataclass(frozen=True, slots=True)
class JobFinished(Event):
    job: str
    report: dict[str, Any]
    kind = "job_finished"


class Stats:
    """Counters the workers add to and renderers poll. Single-threaded (event loop) use only.

    ``in_flight`` / ``buffered`` are gauges with high-water marks (``max_in_flight``,
    ``max_buffered``) so tests can assert the engine's bounds without timing.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.files_total = 0
        self.bytes_total = 0
        self.walk_done = False
        self.files_done = 0
        self.files_skipped = 0
        self.files_failed = 0
        self.bytes_done = 0  # bytes of the items (uncompressed), confirmed or skipped
        self.bytes_sent = 0  # bytes on the wire (compressed, re-sent included)
        self.retries = 0
        self.active: dict[str, list[int]] = {}  # rel -> [size, done]
        self.in_flight = 0
        self.max_in_flight = 0
        self.buffered = 0
        self.max_buffered = 0
        self.requests_in_flight = 0
        self.max_requests_in_flight = 0

    def item_in(self, rel: str, size: int) -> None:
        self.active[rel] = [size, 0]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def item_out(self, rel: str) -> None:
        if self.active.pop(rel, None) is not None:
            self.in_flight -= 1

    def add_sent(self, rel: str, n: int) -> None:
        self.bytes_sent += n
        slot = self.active.get(rel)
        if slot is not None:
            slot[1] += n

    def buffer(self, delta: int) -> None:
        self.buffered += delta
        self.max_buffered = max(self.max_buffered, self.buffered)

    def request(self, delta: int) -> None:
        self.requests_in_flight += delta
        self.max_requests_in_flight = max(self.max_requests_in_flight, self.requests_in_flight)

    def snapshot(self) -> dict[str, Any]:
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
            "walk_done": self.walk_done,
            "active": {k: v[:] for k, v in list(self.active.items())[:8]},
        }


class Sink:
    """Receives events; ``tick`` is called a few times a second with a stats snapshot."""

    def emit(self, event: Event) -> None:  # pragma: no cover - interface
        pass

    def tick(self, snapshot: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter:
    """What the engine and adapters talk to: events out to the sinks, counters in ``stats``."""

    def __init__(self, sinks: list[Sink] | None = None, stats: Stats | None = None) -> None:
        self.sinks = list(sinks or [])
        self.stats = stats or Stats()
        self.listeners: list[Callable[[Event], None]] = []

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)
        for fn in self.listeners:
            fn(event)

    def message(self, text: str, level: str = "info") -> None:
        self.emit(Message(level=level, text=text))

    def warning(self, text: str) -> None:
        self.message(text, "warning")

    def progress(self, rel: str, nbytes: int) -> None:
        """Count ``nbytes`` moved for ``rel`` (for adapters that move bytes themselves, e.g. ascp)."""
        self.stats.add_sent(rel, nbytes)

    def tick(self) -> None:
        snap = self.stats.snapshot()
        for sink in self.sinks:
            sink.tick(snap)

    def close(self) -> None:
        """A last tick (so the display's last frame shows the end, not the state of the tick before it), then
        close the sinks."""
        self.tick()
        for sink in self.sinks:
            sink.close()


class JsonSink(Sink):
    """One JSON object per line: every event, plus a ``snapshot`` line per tick."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def _write(self, obj: dict[str, Any]) -> None:
        try:
            line = orjson.dumps(obj)
        except TypeError:  # a file name that is not UTF-8 (JSON strings cannot hold its bytes): escaped
            line = orjson.dumps(printable_tree(obj))
        self.stream.write(line.decode() + "\n")
        self.stream.flush()

    def emit(self, event: Event) -> None:
        data = event.to_json()
        data["t"] = round(time.time(), 3)
        self._write(data)

    def tick(self, snapshot: dict[str, Any]) -> None:
        self._write({"event": "snapshot", "t": round(time.time(), 3), **snapshot})


class LogSink(Sink):
    """Item failures, retries and messages as log lines (for non-terminal, non-JSON runs)."""

    def emit(self, event: Event) -> None:
        if isinstance(event, Message):
            log.log(logging.WARNING if event.level == "warning" else logging.INFO, "%s", event.text)
        elif isinstance(event, ItemFailed):
            log.error("failed: %s: %s", printable(event.rel), printable(event.error))
        elif isinstance(event, ItemRetrying):
            log.warning("retrying %s (attempt %d, in %.1fs): %s", printable(event.rel), event.attempt,
                        event.delay, printable(event.error))


class CollectSink(Sink):
    """Keeps every event and snapshot in memory (tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.snapshots: list[dict[str, Any]] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def tick(self, snapshot: dict[str, Any]) -> None:
        self.snapshots.append(snapshot)

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]
