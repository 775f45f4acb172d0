"""Events the engine emits, the statistics it keeps, and the sinks that show them.

Workers never print. They emit frozen events (item queued/started/retrying/done/failed/skipped, job
started/finished, messages) to a :class:`Reporter`, and add to the counters of its
:class:`~asyncdepo.accounting.Stats` through its methods (a counter add, no event: a million small files cost
little). A renderer polls ``stats.snapshot()`` a few times a second (the rclone accounting pattern) — rich
progress on a terminal, periodic JSON snapshots with ``--json``, metrics — and receives the item events as
they happen.

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

from asyncdepo.accounting import Stats

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
    reason: str = ""  # the pacer's short label: "5xx", "429", "network", "integrity", ...
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
    size: int = -1  # the item's size when known (metrics count the bytes of failed files)
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
        self.stats.moved(rel, nbytes)

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
