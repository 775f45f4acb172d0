"""The root of a run: walk -> bounded stream -> N workers, job-level hooks, per-run retries, the report.

Structure (one anyio task group): a walker task streams batches of items, already checked against the
journal, through a memory object stream of ``2 * transfers`` items; ``transfers`` workers each take
one item at a time and send it (``transfer.send_item``); a ticker polls the statistics for the
renderers. Backpressure is the stream's capacity: the walker waits when workers are busy, so memory
does not grow with the number of files. Requests in flight are capped by a CapacityLimiter of
``min(transfers, features.max_concurrency)``, buffered bytes by the BufferPool.

Retries at the run level (``--retries K``): after the pass, items that failed transiently are sent again
in up to K more rounds, paced by the same retry loop as requests and items
(:class:`~asyncdepo.transport.pacer.Pacer`). A pass consumes batches of items from any source — the walk,
the names of the items a retry round takes again, or a watch (:mod:`asyncdepo.engine.watch`: files as
they become complete) — so other feeders (a coordinator) reuse it.

What the pass checks besides sending (vanished sources, unreadable directories, ``--checksum``, names a
target cannot store, a full disk that stops the run) lives in :mod:`asyncdepo.engine.checks`.

Cancellation (Ctrl-C) cancels the task group; cleanup is shielded: the journal is flushed, the adapter's
``finish(ok=False)`` runs (it aborts job-level state such as a lock unless told to keep it), and the
job is marked ``interrupted`` so ``asyncdepo resume`` can continue it.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Item
from asyncdepo.engine.checks import (
    check_name,
    content_check,
    discard_changed,
    disk_full_failure,
    fail_item,
    same_content,
    sweep_vanished,
    walk_failed,
)
from asyncdepo.engine.journal import VANISHED, Journal
from asyncdepo.engine.packed import send_packed
from asyncdepo.engine.pipeline import BufferPool
from asyncdepo.engine.prehash import not_started, prehash
from asyncdepo.engine.report import RunReport, _fill, _ticker, describe
from asyncdepo.engine.sessions import send_sessions
from asyncdepo.engine.source import walk
from asyncdepo.engine.transfer import Run, send_item
from asyncdepo.engine.units import Units
from asyncdepo.engine.watch import Watch
from asyncdepo.engine.watch import refuse as refuse_watch
from asyncdepo.errors import (
    SourceVanishedError,
    TransientError,
    UsageError,
)
from asyncdepo.events import ItemSkipped, JobFinished, JobStarted, Reporter, printable
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.pacer import SYSTEM_CLOCK, Clock, Pacer, RetryPolicy, first_leaf


def _hashes(config: EngineConfig, adapter: Adapter) -> tuple[str, ...]:
    f = adapter.features
    return config.digests([*f.item_digests, *([f.server_digest] if f.server_digest else [])])


def target_identity(adapter: Adapter, config: EngineConfig) -> str:
    ident = adapter.describe()
    return ident + ("#zstd" if config.compress else "")


def _make_run(config: EngineConfig, adapter: Adapter, reporter: Reporter, journal: Journal, job: str,
              clock: Clock = SYSTEM_CLOCK) -> Run:
    f = adapter.features
    transfers = min(config.transfers, f.max_concurrency or config.transfers)
    chunk = config.chunk_size
    if f.max_part_size:
        chunk = min(chunk, f.max_part_size)
    config = config.replace(chunk_size=max(chunk, f.min_part_size))
    capacity = max(config.memory_bound(), 2 * config.chunk_size)
    io = config.io_threads or max(4, 2 * (os.cpu_count() or 2))
    return Run(config=config, adapter=adapter, reporter=reporter, journal=journal, job=job,
               pool=BufferPool(capacity, reporter.stats), io=anyio.CapacityLimiter(io),
               slots=anyio.CapacityLimiter(transfers),
               bucket=TokenBucket(config.bwlimit) if config.bwlimit else None,
               hashes=_hashes(config, adapter), clock=clock)


#: what the walk hands a worker: the item, its saved writer state, and (``--checksum``) the digest its
#: content must still have for it to be skipped
Entry = tuple[Item, dict[str, Any] | None, tuple[str, str] | None]


Batches = AsyncIterator[list[Item]]


class PassFn(Protocol):
    """A pass over batches of items: :func:`_pass` sends them here; a cluster coordinator
    (:mod:`asyncdepo.engine.cluster`) hands them to workers."""

    def __call__(self, run: Run, batches: Batches, report: RunReport, skip: set[str],
                 digests: dict[str, dict[str, str]], *, count: bool = True) -> Awaitable[None]: ...


async def walked(run: Run, root: Path, report: RunReport) -> Batches:
    """The walk of ``root`` under the run's filters, as batches (skipped entries reported as warnings; a
    directory that cannot be read, or an entry that cannot be stat'ed, is a failure of the run)."""
    cfg = run.config
    unreadable: list[tuple[str, str]] = []

    def warn(rel: str, why: str) -> None:
        run.reporter.warning(f"skipped {printable(rel)}: {why}")

    async for batch in walk(root, cfg.include, cfg.exclude, cfg.follow_symlinks, warn,
                            on_error=lambda rel, why: unreadable.append((rel, why))):
        for rel, why in unreadable:
            await walk_failed(run, rel, why, report)
        unreadable.clear()
        yield batch
    for rel, why in unreadable:
        await walk_failed(run, rel, why, report)


async def named(run: Run, root: Path, rels: list[str], report: RunReport) -> Batches:
    """Items named by ``rels`` (relative to ``root``), stat'ed afresh; a name that no longer exists fails
    as a vanished source."""
    for i in range(0, len(rels), 256):
        out = []
        for rel in rels[i:i + 256]:
            p = root / rel if root.is_dir() else root
            try:
                st = p.stat()
            except (FileNotFoundError, NotADirectoryError):
                await fail_item(run, Item(str(p), rel, 0, 0), SourceVanishedError(f"{rel}: {VANISHED}"), report)
                continue
            except OSError as exc:
                await walk_failed(run, rel, f"cannot stat: {exc.strerror}", report)
                continue
            out.append(Item(str(p), rel, st.st_size, st.st_mtime_ns))
        yield out


async def _items(run: Run, batches: Batches, count: bool, skip: set[str],
                 digests: dict[str, dict[str, str]]) -> AsyncIterator[Entry]:
    """The items of ``batches`` that still need sending, with their saved state and, with ``--checksum``,
    the digest their content must still have to be skipped (``count``: they are new to the run's totals).
    Every item that goes on is marked as walked by this run (how :func:`checks.sweep_vanished` tells the
    journal's rows whose file is gone)."""
    stats = run.reporter.stats
    number = run.journal.runs.get(run.job, 0)
    async for batch in batches:
        if run.journal.broken is not None:
            break  # the journal's disk is full: no item starts that it could not record (the run fails)
        rows = await run.journal.lookup(run.job, [i.rel for i in batch])
        for item in batch:
            if count:
                stats.found(item.size)
            row = rows.get(item.rel)
            same = row is not None and row.get("size") == item.size and row.get("mtime_ns") == item.mtime_ns
            if item.rel in skip:
                await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns,
                                         state="done", digests=digests.get(item.rel), error=None, walked=number)
                stats.skipped(item.size)
                run.reporter.emit(ItemSkipped(rel=item.rel, size=item.size, reason="archive already has it"))
                continue
            if same and row is not None and row.get("state") == "done":
                if not run.config.checksum:
                    stats.skipped(item.size)
                    run.reporter.emit(ItemSkipped(rel=item.rel, size=item.size,
                                                  reason="unchanged since last run"))
                    continue
                # the worker hashes it: skipped only if the content is the same
                yield item, None, content_check(row.get("digests") or {})
                continue
            if row is not None and not same:
                # changed since it was recorded: what an unfinished earlier attempt left on the target is
                # removed (its journaled upload; for S3 also one the journal never learned of), the old state
                # forgotten, and the file sent again from zero
                unfinished = row.get("state") != "done"
                if unfinished and row.get("remote"):
                    await discard_changed(run, item.rel, row["remote"])
                await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns,
                                         state="queued", offset=0, remote=None, error=None, walked=number)
                run.journal.forget_chunks(run.job, item.rel)
                if unfinished:  # no state to restore, but an earlier attempt began: S3 looks for its uploads
                    yield item, {}, None
                    continue
                row = None
            elif row is not None:
                await run.journal.record(run.job, item.rel, walked=number)
            else:
                await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns,
                                         state="queued", walked=number)
            yield item, (row or {}).get("remote") if row else None, None
    if count:
        stats.walk_finished()


async def _checked(run: Run, entries: AsyncIterator[Entry], report: RunReport
                   ) -> AsyncIterator[tuple[Item, dict[str, Any] | None]]:
    """The entries that still go to a session, after the checks a worker makes before sending one item: a name
    the target cannot store fails alone, and with ``--checksum`` a file whose content is unchanged is skipped."""
    async for item, saved, check in entries:
        try:
            if not run.features.any_name:
                check_name(item.rel, run.adapter.describe())
            if check is not None and await same_content(run, item, check):
                continue
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on with the other items
            await fail_item(run, item, exc, report)
            continue
        yield item, saved


def items_to_send(run: Run, batches: Batches, report: RunReport, count: bool, skip: set[str],
                  digests: dict[str, dict[str, str]]) -> AsyncIterator[tuple[Item, dict[str, Any] | None]]:
    """The items of a pass that still need sending, with their journaled state, after the checks made before
    an item is sent (for feeders of other workers: sessions, a cluster)."""
    return _checked(run, _items(run, batches, count, skip, digests), report)


async def _pass(run: Run, batches: Batches, report: RunReport, skip: set[str],
                digests: dict[str, dict[str, str]], *, count: bool = True,
                stop: anyio.Event | None = None) -> None:
    """One pass over the items of ``batches`` with ``transfers`` workers fed through a bounded stream;
    stopped early when the target's disk is full (``report.stopped``); once ``stop`` is set, items not yet
    started are left alone (the next run finds them). An adapter that moves many items per
    session gets them through :func:`~asyncdepo.engine.sessions.send_sessions` instead."""
    if run.features.sessions:
        await send_sessions(run, _checked(run, _items(run, batches, count, skip, digests), report),
                            lambda item, exc: fail_item(run, item, exc, report))
        return
    workers = run.config.transfers
    send, recv = anyio.create_memory_object_stream[Entry](2 * workers)

    async def feeder() -> None:
        async with send:
            async for entry in _items(run, batches, count, skip, digests):
                await send.send(entry)

    async def worker(stream: Any) -> None:
        async with stream:
            async for item, saved, check in stream:
                if stop is not None and stop.is_set():
                    continue
                try:
                    if not run.features.any_name:
                        check_name(item.rel, run.adapter.describe())
                    if check is not None and await same_content(run, item, check):
                        continue
                    await send_item(run, item, saved, digests.get(item.rel))
                except Exception as exc:  # noqa: BLE001 - recorded; the run goes on with the other items
                    await fail_item(run, item, exc, report)
                    if report.stopped:
                        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(feeder)
        async with recv:
            for _ in range(workers):
                tg.start_soon(worker, recv.clone())
    if report.stop_error is not None:
        await disk_full_failure(run, report)
        report.stop_error = None


async def push(source: Path | str, adapter: Adapter, config: EngineConfig | None = None, *,
               reporter: Reporter | None = None, journal_path: Path | None = None,
               argv: list[str] | None = None, tick: float = 0.5, clock: Clock = SYSTEM_CLOCK,
               kind: str = "push", passes: PassFn | None = None,
               watch: Watch | None = None) -> RunReport:
    """Push ``source`` (a directory or one file) through ``adapter``; see the module docstring. ``clock``
    paces every retry of the run (tests pass one that steps time). ``kind`` names the job in the journal
    (``asyncdepo resume`` reruns ``argv`` for ``push``; an archive's own kind resumes through its command).
    ``passes`` replaces the local pass (:func:`_pass`), e.g. by one that hands the items to the workers of
    a cluster. With ``watch`` the run goes on, sending files as they become complete, until ``watch.stop()``
    (see :mod:`asyncdepo.engine.watch`; its pass is the local one); a target with ``Features.watch_units``
    takes each batch as a unit of its own (:mod:`asyncdepo.engine.units`), and its ``finish`` closes each
    unit instead of the run.

    :raises UsageError: the source is missing or unreadable, or ``watch`` was given for a target that takes
        the whole source at once (before anything is sent).
    Item failures do not raise: they are in the report (``ok`` False) and the journal.
    """
    config = config or EngineConfig()
    reporter = reporter or Reporter()
    root = Path(source).absolute()
    from asyncdepo.engine.source import check_source

    await anyio.to_thread.run_sync(check_source, root)
    if watch is not None:
        refuse_watch(adapter.features)
    journal = await Journal.open(journal_path or config.journal_path)
    started = time.monotonic()
    report = RunReport(ok=False, job_id="", bwlimit=config.bwlimit)
    ok = False
    try:
        # the job's lock is taken before anything touches the target: a second run of it stops here
        job, existed = await journal.open_job(kind, str(root), target_identity(adapter, config), argv or [])
        async with adapter:
            report.job_id = job
            if existed:
                adapter.restore_job_state(await journal.job_state(job))
            reporter.emit(JobStarted(job=job, source=str(root), target=adapter.describe(), resumed=existed))
            run = _make_run(config, adapter, reporter, journal, job, clock)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_ticker, reporter, tick)
                    await _run_all(run, root, report, passes or _pass, watch)
                    tg.cancel_scope.cancel()
                ok = not report.failures and not report.interrupted
            finally:
                with anyio.CancelScope(shield=True):
                    await journal.flush()
                    try:
                        if watch is None or not adapter.features.watch_units:  # else each unit was finished
                            report.summary = await adapter.finish(ok) or {}
                    except Exception as exc:  # noqa: BLE001 - finish() failing fails the run, reported
                        report.failures.append(("(job)", describe(exc).splitlines()[0]))
                        ok = False
                    await journal.set_job_state(job, adapter.job_state())
    except BaseException as exc:
        err = first_leaf(exc)
        if isinstance(err, anyio.get_cancelled_exc_class()) or isinstance(exc, KeyboardInterrupt):
            report.interrupted = True
            raise
        if isinstance(exc, BaseExceptionGroup):
            raise err from None  # a DepoError from prepare/finish, not a group, for the caller
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if report.job_id:
                state = "done" if ok and not report.failures else ("interrupted" if report.interrupted else "failed")
                await journal.set_job(report.job_id, state)
            await journal.close()
            if journal.broken is not None:  # the run's one failure for it (see journal's module docstring)
                reporter.stats.failed()
                report.failures.append(("(journal)", describe(journal.broken)))
            _fill(report, reporter, started)
            report.ok = ok and not report.failures
            reporter.tick()  # a last snapshot, with the final counts, for progress, --json and metrics
            reporter.emit(JobFinished(job=report.job_id, report=report.to_json()))
    return report


class _Unfinished(TransientError):
    """Items of the run failed transiently: the run level tries them again."""


def _requeue(run: Run, report: RunReport, rels: set[str]) -> None:
    """Failed items ``rels`` are being sent again: out of the report's failures and the failed count."""
    before = len(report.failures)
    report.failures = [(r, e) for r, e in report.failures if r not in rels]
    run.reporter.stats.requeued(before - len(report.failures))


async def _run_all(run: Run, root: Path, report: RunReport, passes: PassFn,
                   watch: Watch | None = None) -> None:
    if watch is not None:
        # files as they become complete, until the watch is stopped; a transient failure is offered again
        # by the watch's next rescan (its backoff), not by rounds at the end
        run.durable = True
        if run.features.watch_units:  # each batch a unit of its own (a gypsum version)
            units = Units(run, root, report,
                          send=lambda batches, skip, digests: _pass(run, batches, report, skip, digests),
                          fail=lambda item, exc: fail_item(run, item, exc, report))
            await units.watch(watch, requeue=lambda rels: _requeue(run, report, rels))
            return
        await watch.run(root, config=run.config, journal=run.journal, job=run.job, reporter=run.reporter,
                        consume=lambda batches, stop: _pass(run, batches, report, set(), {}, stop=stop),
                        requeue=lambda rels: _requeue(run, report, rels))
        report.interrupted = report.interrupted or watch.cut_short
        return
    if run.features.packed:
        await send_packed(run, root, report)
        return
    skip: set[str] = set()
    digests: dict[str, dict[str, str]] = {}
    if run.features.needs_digests_before_start:
        listed, unreadable = await prehash(run, root)
        if unreadable:
            await not_started(run, unreadable, report)
            return
        digests = {item.rel: d for item, d in listed}
        skip = await run.request("(start)", lambda: run.adapter.prepare(listed), attempts=3)
        await run.journal.set_job_state(run.job, run.adapter.job_state())
        del listed
    elif run.features.sessions:
        if run.config.compress is not None:
            raise UsageError("--compress does not apply to this target: its transport reads the files itself")
        # the job-level start (e.g. an archive entry); its state must survive a kill before any byte moves
        await run.adapter.prepare([])
        await run.journal.set_job_state(run.job, run.adapter.job_state())
    first = True

    async def one_round() -> None:
        """The first pass over the walk, then a round over what failed transiently; raises _Unfinished
        while something is left for another round."""
        nonlocal first
        if first:
            first = False
            await passes(run, walked(run, root, report), report, skip, digests)
            if report.stopped or run.journal.broken is not None:
                return  # the disk is full: nothing more can be written in this run
            await sweep_vanished(run, root, report)
        else:
            again = await run.journal.failed_transient_walked(run.job, run.journal.runs.get(run.job, 0))
            run.reporter.message(f"retrying {len(again)} item(s) that failed transiently")
            _requeue(run, report, set(again))
            await passes(run, named(run, root, again, report), report, skip, digests, count=False)
            if report.stopped or run.journal.broken is not None:
                return
        left = await run.journal.failed_transient_walked(run.job, run.journal.runs.get(run.job, 0), limit=1)
        if left:
            raise _Unfinished("some items failed transiently")

    rounds = Pacer(RetryPolicy(attempts=run.config.retries + 1, base=1.0, cap=30.0), clock=run.clock)
    try:
        await rounds.call(one_round)
    except _Unfinished:
        pass  # what is still failed is in the report and the journal
