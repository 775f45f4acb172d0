"""Where the engine writes what it learns about items: the seam between sending and journaling.

:class:`Ledger` is what a run records item state into: the item path (:mod:`asyncdepo.engine.transfer`)
and the pass (:mod:`asyncdepo.engine.scheduler`) call only these methods. Two implementations:

* :class:`~asyncdepo.engine.journal.Journal` (SQLite, in the process that owns the job);
* :class:`MemoryLedger`: rows and chunk digests in memory, for a process that sends items on someone else's
  behalf (a worker of a cluster): it starts from the rows it is given, keeps every field and chunk digest
  recorded since, and hands them back (:meth:`MemoryLedger.rows`, :meth:`MemoryLedger.take_changed`) for
  the owner to journal. ``flush`` calls
  ``on_flush`` with the rows changed since the last one, so the engine's "must survive a crash now" points
  (an upload location before the first byte of a multi-chunk item) reach the owner at the same moments.

Fields are those of the journal's ``items`` table (``ITEM_FIELDS``); ``remote`` and ``digests`` are JSON-able.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from asyncdepo.engine.journal import ChunkRecord, Journal
from asyncdepo.engine.journalrows import ITEM_FIELDS


class Ledger(Protocol):
    """The item-state surface the item path (:mod:`asyncdepo.engine.transfer`) writes to."""

    async def record(self, jid: str, rel: str, **fields: Any) -> None:
        """Queue an update of the item row."""

    async def flush(self) -> None:
        """Make what was recorded durable (for a journal: committed)."""

    async def lookup(self, jid: str, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Rows for ``rels`` (what was recorded included), keyed by rel."""
        ...

    async def record_chunk(self, jid: str, rel: str, offset: int, length: int, digest: str) -> None:
        """Keep the digest of a chunk the target confirmed."""

    def forget_chunks(self, jid: str, rel: str, start: int = 0) -> None:
        """Drop the item's chunk digests that reach past ``start``."""

    def chunks(self, jid: str, rel: str, batch: int = 256) -> AsyncIterator[list[ChunkRecord]]:
        """The item's chunk digests in offset order."""
        ...


#: the key under which a row handed back carries the item's chunk digests ([offset, length, digest] lists)
CHUNKS = "_chunks"


class MemoryLedger(Journal):
    """A :class:`Ledger` in memory for one job; see the module docstring. It is a Journal without a
    database (the engine's item path takes a Journal), so every method the item path calls is answered
    from memory; nothing else of the Journal may be used on it.

    :param rows: the rows to start from (rel -> fields, with ``CHUNKS`` for chunk digests), e.g. the owner's
        journal rows of a batch.
    :param on_flush: awaited by :meth:`flush` (and every ``interval`` seconds of records) with the rows
        changed since the previous call; it may raise, which fails the item being recorded.
    """

    def __init__(self, jid: str, rows: Mapping[str, Mapping[str, Any]] | None = None, *,
                 on_flush: Callable[[dict[str, dict[str, Any]]], Awaitable[None]] | None = None,
                 interval: float = 0.5) -> None:
        super().__init__(Path("(memory)"))
        self.jid = jid
        self._rows: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, dict[int, tuple[int, str]]] = {}
        for rel, row in (rows or {}).items():
            fields = dict(row)
            chunks = fields.pop(CHUNKS, None) or ()
            self._rows[rel] = fields
            self._digests[rel] = {int(o): (int(n), str(d)) for o, n, d in chunks}
        self._changed: set[str] = set()
        self._on_flush = on_flush
        self._interval = interval
        self._last = time.monotonic()
        self.kept_state: dict[str, Any] = {}

    async def record(self, jid: str, rel: str, **fields: Any) -> None:
        unknown = set(fields) - set(ITEM_FIELDS)
        if unknown:
            raise ValueError(f"unknown ledger fields {unknown}")
        self._rows.setdefault(rel, {}).update(fields)
        await self._changed_now(rel)

    async def _changed_now(self, rel: str) -> None:
        self._changed.add(rel)
        if self._on_flush is not None and time.monotonic() - self._last >= self._interval:
            await self.flush()

    async def record_chunk(self, jid: str, rel: str, offset: int, length: int, digest: str) -> None:
        self._digests.setdefault(rel, {})[offset] = (length, digest)
        self._rows.setdefault(rel, {})
        await self._changed_now(rel)

    def forget_chunks(self, jid: str, rel: str, start: int = 0) -> None:
        kept = self._digests.get(rel)
        if kept:
            self._digests[rel] = {o: (n, d) for o, (n, d) in kept.items() if o + n <= start}
            self._rows.setdefault(rel, {})
            self._changed.add(rel)

    async def chunks(self, jid: str, rel: str, batch: int = 256) -> AsyncIterator[list[ChunkRecord]]:
        records = sorted((o, n, d) for o, (n, d) in self._digests.get(rel, {}).items())
        for i in range(0, len(records), batch):
            yield records[i:i + batch]

    async def flush(self) -> None:
        self._last = time.monotonic()
        if self._on_flush is None or not self._changed:
            return
        await self._on_flush(self.take_changed())

    def take_changed(self) -> dict[str, dict[str, Any]]:
        """The rows changed since the last call (copies, chunk digests under ``CHUNKS``), and forget that
        they changed."""
        changed, self._changed = self._changed, set()
        return {rel: self.row(rel) for rel in changed}

    def row(self, rel: str) -> dict[str, Any]:
        """A copy of ``rel``'s row, its chunk digests under ``CHUNKS`` (empty when nothing is known)."""
        out = dict(self._rows.get(rel, {}))
        digests = self._digests.get(rel)
        if digests:
            out[CHUNKS] = [[o, n, d] for o, (n, d) in sorted(digests.items())]
        return out

    def rows(self) -> dict[str, dict[str, Any]]:
        """Copies of every row."""
        return {rel: self.row(rel) for rel in self._rows}

    async def lookup(self, jid: str, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {rel: dict(self._rows[rel]) for rel in rels if rel in self._rows}

    async def failed_transient(self, jid: str, limit: int = 100_000) -> list[str]:
        out = [rel for rel, row in self._rows.items() if row.get("state") == "failed" and row.get("transient")]
        return out[:limit]

    async def set_job_state(self, jid: str, data: dict[str, Any]) -> None:
        self.kept_state = dict(data)

    async def close(self) -> None:
        return None
