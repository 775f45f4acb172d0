"""The coordinator's books of a job on a Dask cluster (see :mod:`asyncdepo.engine.cluster`).

The batches out on the cluster and which of their items are recorded, the per-worker counts, and the
workers' progress events (bytes moved, items in flight, retries, item events, journal rows) applied in
order to the run's :class:`~asyncdepo.accounting.Stats`, events and journal. Each item is recorded exactly
once: a row or result for an item already finished is ignored.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, TypeAlias

import anyio
import anyio.abc

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Item
from asyncdepo.engine.checks import fail_item, failed
from asyncdepo.engine.cluster_setup import ClusterOptions
from asyncdepo.engine.cluster_wire import JobSpec
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.transfer import Run
from asyncdepo.errors import DepoError, DiskFullError, SourceVanishedError
from asyncdepo.events import ItemDone

#: a recipe builds a fresh, secret-free adapter on a worker (it is pickled into the tasks)
Recipe = Callable[[EngineConfig], Adapter]


@dataclasses.dataclass
class Held:
    """A batch out on the cluster: its items (for the results) and which are recorded already."""

    key: str
    items: dict[str, Item]
    finished: set[str] = dataclasses.field(default_factory=set)


#: the stream into the coordinator's fallback sessions: items with their journaled state
Lane: TypeAlias = anyio.abc.ObjectSendStream[tuple[Item, dict[str, Any] | None]]


class Books:
    """The coordinator's books of one job: what is out on the cluster, per-worker counts, and the
    workers' progress applied to the run's journal, Stats and events (base of the coordinator)."""

    def __init__(self, client: Any, recipe: Recipe, options: ClusterOptions) -> None:
        self.client, self.recipe, self.options = client, recipe, options
        self.run: Run | None = None
        self.spec: JobSpec | None = None
        self.held: dict[str, Held] = {}
        self.owner: dict[str, Held] = {}  # rel -> its batch, for the items out on the cluster
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.wake = anyio.Event()
        self.lock = anyio.Lock()
        self.workers: dict[str, dict[str, int]] = {}
        #: job-wide figures for the report: workers seen, batches handed out, most items held at once, items
        #: the coordinator sent itself over the adapter's fallback route
        self.figures: dict[str, int] = {"workers": 0, "batches": 0, "max_items_held": 0}
        self.channel: str | None = None
        self.fallback: Adapter | None = None
        self.lane: Lane | None = None  # the pass's stream into the fallback sessions
        self.refused: DepoError | None = None  # the workers' login was refused: the rest goes to the fallback
        self.stopping = False
        self._live: tuple[float, int] = (0.0, 1)

    # -- progress from the workers -------------------------------------------------------------------
    def _heard(self, event: tuple[float, dict[str, Any]]) -> None:
        self.inbox.append(event[1])
        self.wake.set()

    async def listen(self) -> None:
        """Apply the workers' progress as it arrives (a task for the whole job)."""
        while True:
            await self.wake.wait()
            self.wake = anyio.Event()
            await self.drain()

    async def drain(self) -> None:
        """Apply every progress event received so far, in order."""
        async with self.lock:
            while self.inbox:
                await self._apply(self.inbox.popleft())

    def _worker(self, name: str) -> dict[str, int]:
        if name not in self.workers:
            self.workers[name] = {"files": 0, "bytes": 0, "bytes_sent": 0, "failed": 0, "batches": 0}
            self.figures["workers"] = len(self.workers)
        return self.workers[name]

    async def _apply(self, msg: dict[str, Any]) -> None:
        from asyncdepo.engine.cluster_worker import FORWARDED

        run = self.run
        assert run is not None
        stats, reporter = run.reporter.stats, run.reporter
        counts = self._worker(str(msg.get("from")))
        for rel, size in (msg.get("in") or {}).items():
            held = self.owner.get(rel)
            if held is not None and rel not in held.finished and rel not in stats.active:
                stats.item_in(rel, size)
        for rel, n in (msg.get("moved") or {}).items():
            stats.moved(rel, n)
            counts["bytes_sent"] += n
        for reason, n in (msg.get("retries") or {}).items():
            for _ in range(n):
                stats.retried(reason)
        for data in msg.get("events") or ():
            cls = FORWARDED.get(str(data.pop("event", "")))
            if cls is not None:
                data.pop("t", None)
                reporter.emit(cls(**data))
        for key, rows in (msg.get("rows") or {}).items():
            held = self.held.get(key)
            if held is None:
                continue  # the batch's result came first: it is recorded already
            for rel, row in rows.items():
                if rel in held.finished or rel not in held.items:
                    continue
                if row.get("state") == "done":
                    await self._done(held, rel, row, str(msg.get("from")))
                elif row:
                    await self._journal(rel, row)
        # items the worker is done with stay in flight here until their result is recorded

    async def _done(self, held: Held, rel: str, row: dict[str, Any], worker: str, sent: int | None = None) -> None:
        """Record ``rel`` confirmed; ``sent``: its bytes on the wire (default: what progress reported)."""
        run = self.run
        assert run is not None
        item = held.items[rel]
        stats = run.reporter.stats
        held.finished.add(rel)
        await self._journal(rel, row)
        stats.done(item.size)
        moved = stats.active.get(rel, [0, 0])[1] if sent is None else sent
        run.reporter.emit(ItemDone(rel=rel, size=item.size, sent=moved, digests=dict(row.get("digests") or {})))
        stats.item_out(rel)
        counts = self._worker(worker)
        counts["files"] += 1
        counts["bytes"] += max(0, item.size)

    async def _lost(self, held: Held, rel: str, error: str, transient: bool, report: RunReport,
                    worker: str | None) -> None:
        """``rel`` came back without an outcome (its batch was lost: the run's retry rounds send it again when
        ``transient``)."""
        run = self.run
        assert run is not None
        held.finished.add(rel)
        await failed(run, held.items[rel], error, transient, report)
        run.reporter.stats.item_out(rel)
        if worker is not None:
            self._worker(worker)["failed"] += 1

    async def _failed(self, held: Held, rel: str, err: DepoError, report: RunReport, worker: str) -> None:
        """A worker failed ``rel`` with ``err``: the coordinator's fallback route takes it, or it is recorded
        as one node records it (a full disk stops the run, a vanished source is discarded)."""
        run = self.run
        assert run is not None
        held.finished.add(rel)
        run.reporter.stats.item_out(rel)
        if self.lane is not None and not isinstance(err, (DiskFullError, SourceVanishedError)):
            await self._fall_back(held.items[rel])
            return
        await fail_item(run, held.items[rel], err, report)
        self._worker(worker)["failed"] += 1

    async def _fall_back(self, item: Item) -> None:
        """Hand ``item`` (with its journaled state) to the coordinator's own sessions over the fallback."""
        run = self.run
        assert run is not None and self.lane is not None
        saved = (await run.journal.lookup(run.job, [item.rel])).get(item.rel, {}).get("remote")
        self.figures["fallback"] = self.figures.get("fallback", 0) + 1
        await self.lane.send((item, saved))

    async def _journal(self, rel: str, row: dict[str, Any]) -> None:
        """Journal a worker's row of ``rel``: its fields, and its chunk digests when it has them."""
        from asyncdepo.engine.ledger import CHUNKS

        run = self.run
        assert run is not None
        fields = dict(row)
        chunks = fields.pop(CHUNKS, None)
        if fields:
            await run.journal.record(run.job, rel, **fields)
        if chunks is not None:
            run.journal.forget_chunks(run.job, rel)
            for offset, length, digest in chunks:
                await run.journal.record_chunk(run.job, rel, offset, length, digest)

    def _forget(self, key: str) -> None:
        held = self.held.pop(key)  # each batch once: after its result, or when the pass gives it up
        active = self.run.reporter.stats.active if self.run is not None else {}
        for rel in held.items:
            if self.owner.get(rel) is held:
                del self.owner[rel]
            if rel not in held.finished and rel in active and self.run is not None:
                self.run.reporter.stats.item_out(rel)  # a batch given up (the pass ended early)
