"""The worker side of a job on a Dask cluster: what one batch task runs (the coordinator is
:mod:`asyncdepo.engine.cluster`). Imported only on workers and by a coordinator: ``asyncdepo`` itself never
needs dask.

A batch task (:func:`run_batch`, in one of the worker's task threads) hands its :class:`Batch` to the
worker's :class:`_Runtime` for the run and waits for the per-item results. One runtime per worker process and
run of a job: an event loop in a thread of its own (an anyio blocking portal, uvloop when installed) that holds the
adapter, entered once so connections are reused from batch to batch, and the engine's bounds, shared by every
batch the worker runs at once: the buffer pool, the I/O threads, ``--transfers`` items and request slots, the
worker's share of ``--bwlimit``. Items go through the same engine path as on one node
(:func:`~asyncdepo.engine.transfer.send_item`), recording into a :class:`~asyncdepo.engine.ledger.MemoryLedger`
instead of the journal.

An adapter that moves files in sessions (``Features.sessions``: EMPIAR over ascp) runs
:func:`~asyncdepo.engine.sessions.send_sessions` on the batch instead, grouped by session group as on one node;
the worker's sessions at once (``--transfers``, and with ``--max-requests`` a lease of the job-wide semaphore
each) are shared by the batches it runs together, and each session gets its share of the worker's part of
``--bwlimit``.

What goes back to the coordinator:

* the task's result, one :class:`ItemResult` per item (the item's journal row, digests, bytes sent, the
  error of a failure as a :class:`WireError` the coordinator rebuilds, so a full disk or a vanished source
  is handled there as on one node), what the adapter learned for the job's end (``Adapter.handback``), and
  the error that ended a session batch early (a refused login: ``fatal``);
* progress, every ``TICK`` seconds and at each ledger flush, as a Dask event on the job's topic
  (``Worker.log_event``): bytes moved per item, items in and out, retries by reason, item events
  (started, retrying, messages) and the rows of the items that changed, so the coordinator journals upload
  locations as they appear;
* a checkpoint per batch in a Dask ``Variable`` (the batch's rows, set at each ledger flush, before the
  event): if the worker dies, Dask runs the batch again elsewhere and that run starts from the checkpoint —
  the upload locations, UploadIds and parts the dead worker had — so the adapters' resume (tus HEAD, S3
  ListParts, the part file's size) sends only what the target does not hold, and items finished there are
  not sent or counted again.

A full disk stops the worker's batches of the job at once (the disk is the job's target: every worker
writes to it), and :func:`stop_job` does the same on every worker when the coordinator stops the run: the
items not finished come back ``left`` (their rows say what the target holds, part files stay for resume),
and batches that start afterwards send nothing.

Secrets never travel in a task: the adapter's :meth:`~asyncdepo.contract.Adapter.handoff` reaches the workers
through :class:`SecretChannel`, a worker plugin whose ``repr`` names only the job; it is unregistered (and
the runtime closed) when the run ends. Runtimes and handoffs are keyed by the run's channel, so a later run
of the same job never finds an earlier run's runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
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
from asyncdepo.engine.cluster_wire import Batch, BatchResult, ItemResult, JobSpec, WireError, checkpoint_name
from asyncdepo.engine.ledger import CHUNKS, MemoryLedger
from asyncdepo.engine.scheduler import _make_run
from asyncdepo.engine.sessions import send_sessions, sessions_at_once
from asyncdepo.engine.transfer import Run, send_item
from asyncdepo.errors import DiskFullError, UsageError
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


# -- the secret channel ------------------------------------------------------------------------------------
_HANDOFFS: dict[str, dict[str, Any]] = {}  # channel -> the run's handoff
_STOPPED: set[str] = set()  # channels whose run stopped (stop_job): their batches send nothing more
_LOCK = threading.Lock()


class SecretChannel(WorkerPlugin):  # type: ignore[misc]  # distributed is untyped
    """Carries an adapter's handoff to every worker, present and future, outside the task graph.

    ``repr`` names the job only. Installed on a worker, it keeps the handoff in this process's memory under
    the run's ``channel`` (the plugin's name); on teardown (the run ended and the coordinator unregistered it,
    a later run of the job swept it, or the worker closes) it forgets it and closes the run's runtime.
    """

    def __init__(self, job: str, channel: str, data: Mapping[str, Any]) -> None:
        self.job, self.channel = job, channel
        self._data = dict(data)

    def __repr__(self) -> str:
        return f"<asyncdepo handoff of job {self.job}>"

    __str__ = __repr__

    def setup(self, worker: Any) -> None:
        with _LOCK:
            _HANDOFFS[self.channel] = self._data

    def teardown(self, worker: Any) -> None:
        with _LOCK:
            _HANDOFFS.pop(self.channel, None)
            _STOPPED.discard(self.channel)
            runtime = _RUNTIMES.pop(self.channel, None)
        if runtime is not None:
            # closing waits for the runtime's loop: never on the worker's own loop
            threading.Thread(target=runtime.close, name="asyncdepo-close", daemon=True).start()


def stop_job(channel: str) -> None:
    """Run on every worker (``Client.run``) when the coordinator stops the run (a full disk): the run's
    batches here stop at once, and those that start later send nothing. Returns at once."""
    with _LOCK:
        _STOPPED.add(channel)
        runtime = _RUNTIMES.get(channel)
    if runtime is not None:
        runtime.stop_soon()


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
_RUNTIMES: dict[str, _Runtime] = {}  # channel -> the run's runtime in this worker process


class _Runtime:
    """One run's engine in one worker process; see the module docstring."""

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
        self.stopped = False
        self.stop_reason: WireError | None = None  # the full disk on which this worker stopped the run
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
        sessions: AbstractAsyncContextManager[Any] = anyio.CapacityLimiter(
            sessions_at_once(self.base.config, adapter.features))
        if self._semaphore is not None:
            self.base.slots = _JobSlots(self.base.slots, self._semaphore)
            sessions = _JobSlots(sessions, self._semaphore)
        self.sessions = sessions  # a session adapter's sessions at once, shared by the worker's batches
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

    # -- stopping ----------------------------------------------------------------------------------------
    def _stop(self) -> None:
        """On the runtime's loop: stop every batch of the run here (see the module docstring)."""
        self.stopped = True
        for scope in list(self._scopes):
            scope.cancel()

    def stop_soon(self) -> None:
        """:meth:`_stop` from any other thread, without waiting for the runtime's loop."""
        self.stopped = True

        def call() -> None:
            with contextlib.suppress(RuntimeError):  # the runtime closed meanwhile: nothing runs any more
                self.portal.call(self._stop)

        threading.Thread(target=call, name="asyncdepo-stop", daemon=True).start()

    # -- a batch -----------------------------------------------------------------------------------------
    async def batch(self, batch: Batch) -> BatchResult:
        """Send the items of ``batch`` (at most ``--transfers`` items, or sessions, at once across the
        worker's batches); per-item results."""
        if self.stopped:
            return BatchResult(self.name, [ItemResult(i[1], {}, left=True) for i in batch.items],
                               self.adapter.handback(), stopped=self.stop_reason)
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
        results: dict[str, ItemResult] = {}
        todo: list[Item] = []
        for path, rel, size, mtime_ns in batch.items:
            prior = earlier.get(rel)
            if prior and prior.get("state") == "done" and prior.get("size") == size \
                    and prior.get("mtime_ns") == mtime_ns:
                results[rel] = ItemResult(rel, dict(rows[rel]), earlier=True)
            else:
                todo.append(Item(path, rel, size, mtime_ns))
        fatal: WireError | None = None
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self.adapter.features.sessions:
                    fatal = await self._sessions(run, ledger, todo, batch.rate, results)
                else:
                    async with anyio.create_task_group() as tg:
                        for item in todo:
                            token = object()
                            await self.items.acquire_on_behalf_of(token)
                            tg.start_soon(self._one, run, ledger, item, batch.known.get(item.rel), token,
                                          results)
            finally:
                self._scopes.discard(scope)
        if scope.cancel_called and not self.stopped:
            self.send()
            raise UsageError("the job ended while this batch was sent")
        await ledger.flush()
        self.send()  # the last bytes and events go ahead of the result
        for item in todo:
            if item.rel in results:
                continue
            row = ledger.row(item.rel)
            if row.get("state") == "done":  # sessions settle their items in the ledger
                results[item.rel] = ItemResult(item.rel, row, sent=self._sent.pop(item.rel, 0))
            elif scope.cancel_called or fatal is not None:
                results[item.rel] = ItemResult(item.rel, row, left=True)
        return BatchResult(self.name, list(results.values()), self.adapter.handback(), fatal, self.stop_reason)

    async def _one(self, run: Run, ledger: MemoryLedger, item: Item, known: dict[str, str] | None, token: object,
                   results: dict[str, ItemResult]) -> None:
        rel = item.rel
        try:
            saved = (await ledger.lookup(run.job, [rel])).get(rel, {}).get("remote")
            await send_item(run, item, saved, known)
            results[rel] = ItemResult(rel, ledger.row(rel), sent=self._sent.pop(rel, 0))
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which records the failure
            self._sent.pop(rel, None)
            results[rel] = ItemResult(rel, ledger.row(rel), error=WireError.of(exc))
            if isinstance(first_leaf(exc), DiskFullError) and not self.stopped:
                # as on one node, the first full disk stops the run: here at once, then everywhere
                self.stop_reason = WireError.of(exc)
                self._stop()
        finally:
            self.items.release_on_behalf_of(token)

    async def _sessions(self, run: Run, ledger: MemoryLedger, todo: list[Item], rate: float | None,
                        results: dict[str, ItemResult]) -> WireError | None:
        """The batch's items in sessions (``send_sessions``, with this worker's share of ``--bwlimit``);
        returns the error that ended them early (a refused login), if any."""
        run = dataclasses.replace(run, config=run.config.replace(bwlimit=rate))

        async def entries() -> AsyncIterator[tuple[Item, dict[str, Any] | None]]:
            for item in todo:
                yield item, (await ledger.lookup(run.job, [item.rel])).get(item.rel, {}).get("remote")

        async def fail(item: Item, exc: BaseException) -> None:
            results[item.rel] = ItemResult(item.rel, ledger.row(item.rel), error=WireError.of(exc))

        try:
            await send_sessions(run, entries(), fail, slots=self.sessions)
        except Exception as exc:  # noqa: BLE001 - an AuthError: the coordinator decides (fallback, or the end)
            return WireError.of(exc)
        return None

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
        existing = _RUNTIMES.get(spec.channel)
        if existing is not None:
            return existing
        handoff = _HANDOFFS.get(spec.channel)
        if handoff is None:
            raise UsageError(f"job {spec.job}: this worker never received the job's credentials (the "
                             "coordinator ended, or the worker joined without its plugins)")
        runtime = _RUNTIMES[spec.channel] = _Runtime(spec, worker, handoff)
        runtime.stopped = spec.channel in _STOPPED
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
    """The batch task: send ``batch`` with the worker's runtime for the run; per-item results.

    :raises UsageError: the run's secret channel is not on this worker.
    """
    runtime = _runtime(spec)
    result: BatchResult = runtime.portal.call(runtime.batch, batch)
    return result
