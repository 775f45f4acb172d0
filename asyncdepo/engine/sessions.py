"""Sessions: items moved many at a time by one transport session (an ascp run over a ``--file-pair-list``, a
Globus task), for pushes and pulls, journaled and counted per item like every other transfer.

The contract is in :mod:`asyncdepo.contract` ("Sessions"). Here:

* **grouping** — one task cuts the stream of items (the scheduler's journal-checked walk, or a pull's prepared
  listing) into batches: a new batch starts when :meth:`~asyncdepo.contract.Adapter.session_group` changes,
  or the batch holds ``features.session_items`` items, or it would pass ``features.session_bytes``. Batches go
  through a rendezvous stream to ``n`` session workers (``n = min(transfers, features.max_concurrency)``), so at
  most ``n + 2`` batches exist at once: memory is flat in the number of files.
* **one batch** (:func:`_drive`) — runs through the pacer (:class:`~asyncdepo.transport.pacer.Pacer`,
  ``config.request_attempts`` sessions), each session over the items still open. What the adapter reports
  synchronously (:class:`_Tracker`, its :class:`~asyncdepo.contract.SessionProgress`) is settled on the loop
  by a drain task: bytes go to :class:`~asyncdepo.accounting.Stats` at once, each ``done`` is journaled
  (pull: checked and renamed first) and announced, each failure is either kept for the next session
  (transient) or recorded as the item's failure. An AuthError ends the job.
* ``--bwlimit`` is split evenly between the sessions at once and handed to the transport as ``plan.rate``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Features, Fetch, FetchPlan, Item, RemoteItem, SessionPlan
from asyncdepo.engine.transfer import Run
from asyncdepo.errors import AuthError, DepoError, IntegrityError, TransientError, is_transient
from asyncdepo.events import ItemDone, ItemRetrying, ItemStarted, Reporter
from asyncdepo.transport.pacer import Clock, OnRetry, Pacer, RetryEvent, RetryPolicy, first_leaf

X = TypeVar("X")
FLUSH = 0.5  # seconds between journal commits while a session runs (the journal's own batching interval)
Send = Callable[["_Tracker"], Awaitable[None]]


def sessions_at_once(config: EngineConfig, features: Features) -> int:
    """How many sessions run at once: ``--transfers``, capped by the adapter's ``max_concurrency``."""
    return max(1, min(config.transfers, features.max_concurrency or config.transfers))


def session_rate(config: EngineConfig, features: Features) -> float | None:
    """Each session's share of ``--bwlimit`` (bytes/s), or None."""
    return config.bwlimit / sessions_at_once(config, features) if config.bwlimit else None


class _Tracker:
    """The engine's :class:`~asyncdepo.contract.SessionProgress`: ``moved`` counts at once; ``done`` and
    ``failed`` are queued (they are synchronous, journaling is not) and settled by :meth:`drain`. The queue holds
    at most a few entries per item of one session."""

    def __init__(self, moved: Callable[[str, int], None], note: Callable[[Mapping[str, Any]], Awaitable[None]]) -> None:
        self._moved = moved
        self._note = note
        self._queue: collections.deque[tuple[str, str, Any]] = collections.deque()
        self._wake = anyio.Event()
        self._closed = False

    def moved(self, rel: str, n: int) -> None:
        if n:
            self._moved(rel, n)

    def done(self, rel: str, state: Mapping[str, Any] | None = None) -> None:
        self._push(("done", rel, state))

    def failed(self, rel: str, error: DepoError) -> None:
        self._push(("failed", rel, error))

    async def note(self, state: Mapping[str, Any]) -> None:
        await self._note(state)

    def _push(self, entry: tuple[str, str, Any]) -> None:
        self._queue.append(entry)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def drain(self, handle: Callable[[str, str, Any], Awaitable[None]]) -> None:
        """Hand each queued outcome to ``handle`` until :meth:`close` was called and the queue is empty."""
        while True:
            while self._queue:
                kind, rel, value = self._queue.popleft()
                await handle(kind, rel, value)
            if self._closed:
                return
            await self._wake.wait()
            self._wake = anyio.Event()


@dataclasses.dataclass
class _Hooks(Generic[X]):
    """What differs between a push batch and a pull batch (:func:`_drive` is the same for both).

    ``open(items, last)`` opens a session over the open items and returns its ``send``/``fetch``; ``done``
    settles an item the session completed (may raise DepoError: a pull's check failed); ``fail`` records an
    item's final failure; ``salvage`` says whether an item the failed session did not report is complete
    anyway (a pull part of full size); ``moved``/``note`` as :class:`~asyncdepo.contract.SessionProgress`.
    """

    open: Callable[[list[X], bool], Awaitable[Send]]
    done: Callable[[X, Mapping[str, Any] | None], Awaitable[None]]
    fail: Callable[[X, BaseException], Awaitable[None]]
    moved: Callable[[str, int], None]
    note: Callable[[list[X], Mapping[str, Any]], Awaitable[None]]
    out: Callable[[str], None]
    flush: Callable[[], Awaitable[None]]
    salvage: Callable[[X], Awaitable[bool]] | None = None


async def _drive(pending: dict[str, X], hooks: _Hooks[X], pacer: Pacer, on_retry: OnRetry) -> None:
    """Move the items of one batch through sessions until each is done or failed (see the module docstring).

    :raises AuthError: a session's credentials were refused (the job ends).
    """
    retry: dict[str, DepoError] = {}  # open items whose last session failed them transiently
    damaged: collections.Counter[str] = collections.Counter()
    busy: set[str] = set()
    tries = 0

    async def failed(rel: str, err: DepoError) -> None:
        x = pending.get(rel)
        if x is None:
            return
        if isinstance(err, IntegrityError):
            damaged[rel] += 1  # damage on the way is fetched again once; twice is the archive's copy
            again = damaged[rel] < 2
        else:
            again = is_transient(err)
        if again:
            retry[rel] = err
        else:
            del pending[rel]
            hooks.out(rel)
            await hooks.fail(x, err)

    async def settle(rel: str, state: Mapping[str, Any] | None) -> None:
        x = pending.get(rel)
        if x is None or rel in busy:
            return
        busy.add(rel)
        try:
            await hooks.done(x, state)
        except DepoError as err:
            busy.discard(rel)
            await failed(rel, err)
            return
        busy.discard(rel)
        retry.pop(rel, None)
        pending.pop(rel, None)
        hooks.out(rel)

    async def attempt() -> None:
        nonlocal tries
        tries += 1
        retry.clear()
        send = await hooks.open(list(pending.values()), tries >= pacer.policy.attempts)

        async def note(state: Mapping[str, Any]) -> None:
            await hooks.note(list(pending.values()), state)

        tracker = _Tracker(hooks.moved, note)
        error: BaseException | None = None

        async def flusher() -> None:
            # a session may go quiet for long (one large file): what it settled is committed meanwhile, so a
            # kill loses at most the last FLUSH seconds, as elsewhere in the engine
            while True:
                await anyio.sleep(FLUSH)
                await hooks.flush()

        async with anyio.create_task_group() as outer:
            outer.start_soon(flusher)
            async with anyio.create_task_group() as tg:
                async def handle(kind: str, rel: str, value: Any) -> None:
                    if kind == "done":
                        tg.start_soon(settle, rel, value)  # a pull's check hashes in a thread: several at once
                    else:
                        await failed(rel, value)

                tg.start_soon(tracker.drain, handle)
                try:
                    await send(tracker)
                except Exception as exc:  # noqa: BLE001 - classified below
                    error = first_leaf(exc)
                finally:
                    tracker.close()
            outer.cancel_scope.cancel()
        async with anyio.create_task_group() as tg:
            for rel in [r for r in pending if r not in retry]:
                if error is None:
                    tg.start_soon(settle, rel, None)  # the session succeeded: what it did not report is there
                elif hooks.salvage is not None and await hooks.salvage(pending[rel]):
                    tg.start_soon(settle, rel, None)
        if error is not None:
            if isinstance(error, AuthError):
                raise error
            if not isinstance(error, DepoError) or not is_transient(error):
                for rel in [r for r in pending if r not in retry]:
                    await failed(rel, error if isinstance(error, DepoError) else DepoError(str(error)))
            else:
                for rel in pending:
                    retry.setdefault(rel, error)
        if pending:
            raise next(iter(retry.values()), TransientError("the session left items open"))

    try:
        await pacer.call(attempt, on_retry=on_retry)
    except AuthError:
        raise
    except Exception as exc:  # noqa: BLE001 - the pacer gave up: the items still open fail with their error
        leaf = first_leaf(exc)
        for rel in list(pending):
            x = pending.pop(rel)
            hooks.out(rel)
            await hooks.fail(x, retry.get(rel) or leaf)
    finally:
        for rel in pending:
            hooks.out(rel)


async def _grouped(entries: AsyncIterator[X], key: Callable[[X], str], size: Callable[[X], int], features: Features,
                   workers: int, run_batch: Callable[[list[X]], Awaitable[None]]) -> None:
    """Cut ``entries`` into batches (see the module docstring) and run them on ``workers`` workers."""
    send, recv = anyio.create_memory_object_stream[list[X]](0)
    limit = features.session_bytes

    async def grouper() -> None:
        async with send:
            batch: list[X] = []
            total, current = 0, ""
            async for entry in entries:
                k, s = key(entry), max(0, size(entry))
                if batch and (k != current or len(batch) >= features.session_items
                              or (limit is not None and total + s > limit)):
                    await send.send(batch)
                    batch, total = [], 0
                batch.append(entry)
                total += s
                current = k
            if batch:
                await send.send(batch)

    async def worker(stream: Any) -> None:
        async with stream:
            async for batch in stream:
                await run_batch(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(grouper)
        async with recv:
            for _ in range(workers):
                tg.start_soon(worker, recv.clone())


def _label(rels: list[str]) -> str:
    return rels[0] if len(rels) == 1 else f"{rels[0]} (+{len(rels) - 1} more in its session)"


def _pacer(config: EngineConfig, clock: Clock, attempts: int | None = None) -> Pacer:
    return Pacer(RetryPolicy(attempts=attempts or config.request_attempts, base=1.0, cap=30.0), clock=clock)


def _retrying(reporter: Reporter, label: str) -> OnRetry:
    def hook(event: RetryEvent) -> None:
        reporter.stats.retried(event.reason)
        reporter.emit(ItemRetrying(rel=label, attempt=event.attempt, error=str(event.error),
                                   delay=round(event.delay, 3), reason=event.reason))
    return hook


# -- push ---------------------------------------------------------------------------------------------------

async def send_sessions(run: Run, entries: AsyncIterator[tuple[Item, dict[str, Any] | None]],
                        fail: Callable[[Item, BaseException], Awaitable[None]], *,
                        slots: AbstractAsyncContextManager[Any] | None = None) -> None:
    """Send the journal-checked items of a pass (the scheduler's ``_items``) in sessions; ``fail`` records an
    item's failure (journal, statistics, event, report). ``slots``, when given, is held by each session: calls
    that share it (a cluster worker's batches, which run at once) run ``sessions_at_once`` sessions together,
    not each that many.

    :raises AuthError: a session's credentials were refused.
    """
    features, stats, reporter = run.features, run.reporter.stats, run.reporter
    workers = sessions_at_once(run.config, features)
    rate = session_rate(run.config, features)

    async def batch(entries: list[tuple[Item, dict[str, Any] | None]]) -> None:
        async with slots or contextlib.nullcontext():
            await one(entries)

    async def one(entries: list[tuple[Item, dict[str, Any] | None]]) -> None:
        pending = {item.rel: item for item, _ in entries}
        saved = {item.rel: dict(s) for item, s in entries if s}
        for item in pending.values():
            await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns, state="partial")
        # committed before a byte moves: a run killed mid-session leaves rows that say what it started (a
        # file that vanishes before the resume is then found and failed, and what the target holds of it
        # cleaned: checks.sweep_vanished); one commit per session
        await run.journal.flush()

        async def open_(items: list[Item], last: bool) -> Send:
            plan = SessionPlan(tuple(items), {i.rel: saved[i.rel] for i in items if i.rel in saved}, rate, last)
            writer = await run.adapter.open_session(plan)
            # what the adapter started for the job (e.g. an archive entry) must survive a kill from here on
            await run.journal.set_job_state(run.job, run.adapter.job_state())
            return writer.send

        def moved(rel: str, n: int) -> None:
            item = pending.get(rel)
            if item is not None and rel not in stats.active:
                stats.item_in(rel, item.size)
                reporter.emit(ItemStarted(rel=rel, size=item.size, offset=0))
            stats.moved(rel, n)

        async def note(items: list[Item], state: Mapping[str, Any]) -> None:
            for item in items:
                saved[item.rel] = dict(state)
                await run.journal.record(run.job, item.rel, remote=dict(state))
            await run.journal.flush()

        async def done(item: Item, state: Mapping[str, Any] | None) -> None:
            sent = stats.active.get(item.rel, [0, 0])[1]
            await run.journal.record(run.job, item.rel, state="done", offset=item.size, error=None, transient=0,
                                     remote=dict(state) if state else saved.get(item.rel))
            stats.done(item.size)
            reporter.emit(ItemDone(rel=item.rel, size=item.size, sent=sent, digests={}))

        hooks = _Hooks(open_, done, fail, moved, note, stats.item_out, run.journal.flush)
        await _drive(pending, hooks, _pacer(run.config, run.clock), _retrying(reporter, _label(list(pending))))

    await _grouped(entries, lambda e: run.adapter.session_group(e[0]), lambda e: e[0].size, features, workers,
                   batch)


# -- pull ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PullSide:
    """What a pull gives its sessions: where the files go and how an item is checked and recorded.

    :param root: the output directory (``FetchPlan.root``).
    :param check: blocking: check ``fetch.part`` against the item's size and published digests and rename it
        into place; returns (size, digests). Raises DepoError (TransientError: short; IntegrityError: the part
        was deleted).
    :param done: record a checked item (journal, statistics, event).
    :param fail: record an item's final failure.
    :param note: journal resume state for items.
    :param flush: commit what was journaled.
    :param limiter: threads for checks (hashing).
    """

    root: Path
    check: Callable[[Fetch], tuple[int, dict[str, str]]]
    done: Callable[[Fetch, int, dict[str, str]], Awaitable[None]]
    fail: Callable[[Fetch, BaseException], Awaitable[None]]
    note: Callable[[list[Fetch], Mapping[str, Any]], Awaitable[None]]
    flush: Callable[[], Awaitable[None]]
    limiter: anyio.CapacityLimiter


async def fetch_sessions(adapter: Any, reporter: Reporter, fetches: AsyncIterator[Fetch], side: PullSide,
                         config: EngineConfig, clock: Clock) -> None:
    """Fetch the prepared items of a pull in sessions (``adapter.open_fetch_session``).

    A pull session is tried ``request_attempts x (1 + retries)`` times: it is one request that resumes where it
    stopped, and ``--retries`` adds rounds as it does for a push.

    :raises AuthError: a session's credentials were refused.
    """
    features, stats = adapter.features, reporter.stats
    workers = sessions_at_once(config, features)
    rate = session_rate(config, features)
    attempts = config.request_attempts * (1 + config.retries)

    async def batch(items: list[Fetch]) -> None:
        pending = {f.item.rel: f for f in items}

        async def open_(open_items: list[Fetch], last: bool) -> Send:
            reader = await adapter.open_fetch_session(FetchPlan(side.root, tuple(open_items), rate, last))
            fetch: Send = reader.fetch
            return fetch

        def moved(rel: str, n: int) -> None:
            f = pending.get(rel)
            if f is not None and rel not in stats.active:
                stats.item_in(rel, f.item.size if f.item.size is not None else -1)
                reporter.emit(ItemStarted(rel=rel, size=f.item.size or -1, offset=f.offset))
            stats.moved(rel, n)

        async def done(f: Fetch, state: Mapping[str, Any] | None) -> None:
            size, digests = await anyio.to_thread.run_sync(side.check, f, limiter=side.limiter)
            await side.done(f, size, digests)

        async def salvage(f: Fetch) -> bool:
            # the transport may have found a complete part and said nothing of it before failing elsewhere
            def full() -> bool:
                try:
                    return f.item.size is not None and f.part.stat().st_size == f.item.size
                except OSError:
                    return False
            return await anyio.to_thread.run_sync(full, limiter=side.limiter)

        hooks = _Hooks(open_, done, side.fail, moved, side.note, stats.item_out, side.flush, salvage)
        await _drive(pending, hooks, _pacer(config, clock, attempts), _retrying(reporter, _label(list(pending))))

    await _grouped(fetches, lambda f: adapter.session_group(_as_item(f.item)), lambda f: f.item.size or 0,
                   features, workers, batch)


def _as_item(item: RemoteItem) -> Item:
    """A remote item as ``session_group`` takes it (only ``rel`` and ``size`` are meaningful)."""
    return Item("", item.rel, item.size if item.size is not None else -1, 0)
