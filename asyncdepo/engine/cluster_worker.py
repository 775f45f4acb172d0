"""The worker side of a job on a Dask cluster: what one batch task runs (the coordinator is
:mod:`asyncdepo.engine.cluster`). Imported only on workers and by a coordinator: ``asyncdepo`` itself never
needs dask.

A batch task (:func:`run_batch`, in one of the worker's task threads) hands its :class:`Batch` to the
worker's :class:`_Runtime` for the job and waits for the per-item results. One runtime per worker process and
job: an event loop in a thread of its own (an anyio blocking portal, uvloop when installed) that holds the
adapter, entered once so connections are reused from batch to batch, and the engine's bounds, shared by every
batch the worker runs at once: the buffer pool, the I/O threads, ``--transfers`` items and request slots, the
worker's share of ``--bwlimit``. Items go through the same engine path as on one node
(:func:`~asyncdepo.engine.transfer.send_item`), recording into a :class:`~asyncdepo.engine.ledger.MemoryLedger`
instead of the journal.

What goes back to the coordinator:

* the task's result, one :class:`ItemResult` per item (the item's journal row, digests, bytes sent, the
  error of a failure);
* progress, every ``TICK`` seconds and at each ledger flush, as a Dask event on the job's topic
  (``Worker.log_event``): bytes moved per item, items in and out, retries by reason, item events
  (started, retrying, messages) and the rows of the items that changed, so the coordinator journals upload
  locations as they appear;
* a checkpoint per batch in a Dask ``Variable`` (the batch's rows, set at each ledger flush, before the
  event): if the worker dies, Dask runs the batch again elsewhere and that run starts from the checkpoint —
  the upload locations, UploadIds and parts the dead worker had — so the adapters' resume (tus HEAD, S3
  ListParts, the part file's size) sends only what the target does not hold, and items finished there are
  not sent or counted again.

Secrets never travel in a task: the adapter's :meth:`~asyncdepo.contract.Adapter.handoff` reaches the workers
through :class:`SecretChannel`, a worker plugin whose ``repr`` names only the job; it is unregistered (and
the runtime closed) when the job ends.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from distributed import Semaphore, Variable, get_client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from asyncdepo.accounting import Stats
from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Item
from asyncdepo.engine.ledger import CHUNKS, MemoryLedger
from asyncdepo.engine.report import describe
from asyncdepo.engine.scheduler import _make_run
from asyncdepo.engine.transfer import Run, send_item
from asyncdepo.errors import UsageError, is_transient
from asyncdepo.events import Event, ItemDone, ItemRetrying, ItemStarted, Message, Reporter
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.pacer import first_leaf

#: seconds between progress events of a busy worker
TICK = 0.5
#: item events kept for one progress event at most (a storm of retries must not grow a message unbounded)
MAX_EVENTS = 500
#: events forwarded to the coordinator (done and failed items travel in the results)
FORWARDED: dict[str, type[Event]] = {"item_started": ItemStarted, "item_retrying": ItemRetrying,
                                     "message": Message}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What every batch task of a job shares; secret-free (it is pickled into the task graph).

    :param recipe: builds a fresh, secret-free adapter from the config (e.g. a picklable dataclass of the
        target URL and options); the handoff adds credentials on the worker.
    :param topic: the Dask event topic progress goes to, and the prefix of the batches' checkpoints.
    :param channel: the name of the job's :class:`SecretChannel` plugin.
    :param requests: a job-wide cap on requests in flight (every worker together), held by a Dask
        ``Semaphore`` named ``topic + "-requests"``; None: each worker's ``--transfers`` only.
    """

    job: str
    recipe: Callable[[EngineConfig], Adapter]
    config: EngineConfig
    topic: str
    channel: str
    requests: int | None = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """Items for one task. ``items`` are (path, rel, size, mtime_ns); ``saved`` the journaled ``remote``
    state of those that have one, ``chunks`` their journaled chunk digests ([offset, length, digest]); ``known``
    digests computed before the start; ``rate`` this worker's share of ``--bwlimit`` (bytes/s, None: no
    limit)."""

    key: str
    items: tuple[tuple[str, str, int, int], ...]
    saved: dict[str, Any]
    known: dict[str, dict[str, str]]
    rate: float | None
    chunks: dict[str, list[list[Any]]] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(max(0, i[2]) for i in self.items)


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """The outcome of one item: ``row`` holds the fields to journal; ``error`` is set when it failed."""

    rel: str
    row: dict[str, Any]
    sent: int = 0
    error: str | None = None
    transient: bool = False
    earlier: bool = False  # finished by an earlier run of this batch (on a worker that died since)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    worker: str
    items: list[ItemResult]


def checkpoint_name(spec: JobSpec, batch_key: str) -> str:
    return f"{spec.topic}-{batch_key}"


# -- the secret channel ------------------------------------------------------------------------------------
_HANDOFFS: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()


class SecretChannel(WorkerPlugin):  # type: ignore[misc]  # distributed is untyped
    """Carries an adapter's handoff to every worker, present and future, outside the task graph.

    ``repr`` names the job only. Installed on a worker, it keeps the handoff in this process's memory; on
    teardown (the job ended and the coordinator unregistered it, or the worker closes) it forgets it and
    closes the job's runtime.
    """

    def __init__(self, job: str, data: Mapping[str, Any]) -> None:
        self.job = job
        self._data = dict(data)

    def __repr__(self) -> str:
        return f"<asyncdepo handoff of job {self.job}>"

    __str__ = __repr__

    def setup(self, worker: Any) -> None:
        with _LOCK:
            _HANDOFFS[self.job] = self._data

    def teardown(self, worker: Any) -> None:
        with _LOCK:
            _HANDOFFS.pop(self.job, None)
            runtime = _RUNTIMES.pop(self.job, None)
        if runtime is not None:
            # closing waits for the runtime's loop: never on the worker's own loop
            threading.Thread(target=runtime.close, name="asyncdepo-close", daemon=True).start()


# -- progress ----------------------------------------------------------------------------------------------
class _TapStats(Stats):
    """The worker's counters; what moves is also kept as deltas for the next progress event."""

    def __init__(self) -> None:
        super().__init__()
        self.d_in: dict[str, int] = {}
        self.d_moved: Counter[str] = Counter()
        self.d_out: list[str] = []
        self.d_retries: Counter[str] = Counter()

    def item_in(self, rel: str, size: int) -> None:
        super().item_in(rel, size)
        self.d_in[rel] = size

    def moved(self, rel: str, n: int) -> None:
        super().moved(rel, n)
        self.d_moved[rel] += n

    def item_out(self, rel: str) -> None:
        super().item_out(rel)
        self.d_out.append(rel)

    def retried(self, reason: str) -> None:
        super().retried(reason)
        self.d_retries[reason] += 1

    def drain(self) -> dict[str, Any]:
        out = {"in": self.d_in, "moved": dict(self.d_moved), "out": self.d_out, "retries": dict(self.d_retries)}
        self.d_in, self.d_moved, self.d_out, self.d_retries = {}, Counter(), [], Counter()
        return out


class _JobSlots:
    """Request slots: this worker's (``--transfers``) and a lease of the job-wide Dask semaphore, held
    together for one request attempt. Leases of a worker that dies expire on the scheduler."""

    def __init__(self, local: AbstractAsyncContextManager[Any], semaphore: Any) -> None:
        self.local, self.semaphore = local, semaphore

    async def __aenter__(self) -> None:
        await self.local.__aenter__()
        try:
            while True:
                # shielded, one second at a time: a lease granted while the task is cancelled is not lost
                with anyio.CancelScope(shield=True):
                    got = await anyio.to_thread.run_sync(lambda: self.semaphore.acquire(timeout=1.0))
                if got:
                    try:
                        await anyio.lowlevel.checkpoint_if_cancelled()
                    except BaseException:
                        await self._give_back()
                        raise
                    return
                await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await self.local.__aexit__(None, None, None)
            raise

    async def _give_back(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.semaphore.release)

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._give_back()
        finally:
            await self.local.__aexit__(None, None, None)


# -- the runtime -------------------------------------------------------------------------------------------
_RUNTIMES: dict[str, _Runtime] = {}


class _Runtime:
    """One job's engine in one worker process; see the module docstring."""

    def __init__(self, spec: JobSpec, worker: Any, handoff: Mapping[str, Any]) -> None:
        self.spec = spec
        self.name = str(worker.name if worker.name is not None else worker.address)
        self._log_event: Callable[[str, Any], None] = worker.log_event
        self._client = get_client()  # the worker's client (this runs in a task thread)
        self._semaphore = (Semaphore(max_leases=spec.requests, name=spec.topic + "-requests")
                           if spec.requests else None)
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}
        self._events: list[dict[str, Any]] = []
        self._sent: dict[str, int] = {}
        self._scopes: set[anyio.CancelScope] = set()
        self._rate: float | None = None
        self._bucket: TokenBucket | None = None
        self._send_lock = threading.Lock()
        options: dict[str, Any] = {}
        try:
            import uvloop  # noqa: F401

            options["use_uvloop"] = True
        except ImportError:  # pragma: no cover
            pass
        self._cm: AbstractContextManager[anyio.from_thread.BlockingPortal] = \
            anyio.from_thread.start_blocking_portal("asyncio", options)
        self.portal = self._cm.__enter__()
        try:
            self.portal.call(self._open, handoff)
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise
        self.portal.start_task_soon(self._tick)

    async def _open(self, handoff: Mapping[str, Any]) -> None:
        spec = self.spec
        adapter = spec.recipe(spec.config)
        adapter.take_handoff(handoff)
        await adapter.__aenter__()
        self.adapter = adapter
        self.stats = _TapStats()
        self.reporter = Reporter([], self.stats)
        self.reporter.listeners.append(self._heard)
        # the engine's bounds, as on one node; the per-batch ledger and rate are put in per batch
        self.base = _make_run(spec.config, adapter, self.reporter, MemoryLedger(spec.job), spec.job)
        if self._semaphore is not None:
            self.base.slots = _JobSlots(self.base.slots, self._semaphore)
        self.items = anyio.CapacityLimiter(self.base.config.transfers)

    def _heard(self, event: Event) -> None:
        if isinstance(event, ItemDone):
            self._sent[event.rel] = event.sent
        elif event.kind in FORWARDED and len(self._events) < MAX_EVENTS:
            self._events.append(event.to_json())

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(TICK)
            self.send()

    def send(self) -> None:
        """One progress event with everything that moved since the last one (nothing when idle)."""
        with self._send_lock:
            moved = self.stats.drain()
            rows, self._rows = self._rows, {}
            events, self._events = self._events, []
            if not (rows or events or any(moved.values())):
                return
            msg = {"from": self.name, **moved, "rows": rows, "events": events}
            self._log_event(self.spec.topic, msg)

    def _bucket_for(self, rate: float | None) -> TokenBucket | None:
        if rate != self._rate:
            self._rate = rate
            self._bucket = TokenBucket(rate) if rate else None
        return self._bucket

    async def batch(self, batch: Batch) -> BatchResult:
        """Send the items of ``batch`` (at most ``--transfers`` items at once across the worker's batches)."""
        spec = self.spec
        checkpoint = Variable(checkpoint_name(spec, batch.key), client=self._client)
        earlier: dict[str, dict[str, Any]] = await anyio.to_thread.run_sync(_read, checkpoint)
        rows: dict[str, dict[str, Any]] = {rel: {"remote": remote} for rel, remote in batch.saved.items()}
        for rel, chunks in batch.chunks.items():
            rows.setdefault(rel, {})[CHUNKS] = chunks
        for rel, row in earlier.items():
            rows.setdefault(rel, {}).update(row)

        async def publish(changed: dict[str, dict[str, Any]]) -> None:
            await anyio.to_thread.run_sync(checkpoint.set, ledger.rows())
            self._rows.setdefault(batch.key, {}).update(changed)
            self.send()

        ledger = MemoryLedger(spec.job, rows, on_flush=publish, interval=TICK)
        run = dataclasses.replace(self.base, journal=ledger, bucket=self._bucket_for(batch.rate))
        results: list[ItemResult] = []
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with anyio.create_task_group() as tg:
                    for path, rel, size, mtime_ns in batch.items:
                        item = Item(path, rel, size, mtime_ns)
                        prior = earlier.get(rel)
                        if prior and prior.get("state") == "done" and prior.get("size") == size \
                                and prior.get("mtime_ns") == mtime_ns:
                            results.append(ItemResult(rel, dict(rows[rel]), earlier=True))
                            continue
                        token = object()
                        await self.items.acquire_on_behalf_of(token)
                        tg.start_soon(self._one, run, ledger, item, batch, token, results)
                await ledger.flush()
            finally:
                self._scopes.discard(scope)
                self.send()  # the last bytes and events go ahead of the result
        if scope.cancel_called:
            raise UsageError("the job ended while this batch was sent")
        return BatchResult(self.name, results)

    async def _one(self, run: Run, ledger: MemoryLedger, item: Item, batch: Batch, token: object,
                   results: list[ItemResult]) -> None:
        rel = item.rel
        try:
            saved = (await ledger.lookup(run.job, [rel])).get(rel, {}).get("remote")
            await send_item(run, item, saved, batch.known.get(rel))
            results.append(ItemResult(rel, ledger.row(rel), sent=self._sent.pop(rel, 0)))
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which records the failure
            err = first_leaf(exc)
            self._sent.pop(rel, None)
            results.append(ItemResult(rel, ledger.row(rel), error=describe(err), transient=is_transient(err)))
        finally:
            self.items.release_on_behalf_of(token)

    async def _close(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.adapter.__aexit__(None, None, None)

    def close(self) -> None:
        """Cancel the batches still running, close the adapter, stop the loop (from any thread but the
        runtime's)."""
        try:
            self.portal.call(self._close)
        finally:
            self._cm.__exit__(None, None, None)


def _read(checkpoint: Any) -> dict[str, dict[str, Any]]:
    """The checkpoint of an earlier run of the batch (empty: this is the first).

    :raises TimeoutError: the coordinator did not create it (it always does before submitting).
    """
    value = checkpoint.get(timeout=30)
    return dict(value) if isinstance(value, dict) else {}


def _runtime(spec: JobSpec) -> _Runtime:
    worker = get_worker()
    with _LOCK:
        existing = _RUNTIMES.get(spec.job)
        if existing is not None:
            return existing
        handoff = _HANDOFFS.get(spec.job)
        if handoff is None:
            raise UsageError(f"job {spec.job}: this worker never received the job's credentials (the "
                             "coordinator ended, or the worker joined without its plugins)")
        runtime = _RUNTIMES[spec.job] = _Runtime(spec, worker, handoff)
        return runtime


def warm(recipe: Callable[[EngineConfig], Adapter], config: EngineConfig) -> None:
    """Run on every worker as the job starts: the engine and the adapter's modules are imported then (a
    throwaway adapter is built, never entered), not while the first batch waits (measured: ~0.4 s)."""
    import gc

    import asyncdepo.engine.pipeline  # noqa: F401

    recipe(config)
    # what is imported now lives as long as the worker: out of the collector's sight, as the CLI does, so
    # full collections during a transfer do not walk dask's and our modules again and again
    gc.freeze()


def run_batch(spec: JobSpec, batch: Batch) -> BatchResult:
    """The batch task: send ``batch`` with the worker's runtime for the job; per-item results.

    :raises UsageError: the job's secret channel is not on this worker.
    """
    runtime = _runtime(spec)
    result: BatchResult = runtime.portal.call(runtime.batch, batch)
    return result
