"""Pull: list the archive's items, download each concurrently with HTTP-Range-style resume, verify, rename.

Each remote item is written to ``OUTDIR/<rel>.asyncdepo-part`` (a shorter hashed name for a name too long
for the suffix: :mod:`asyncdepo.transport.partfiles`) and renamed into place only after its size and the
digests the archive published match, so a file under its real name is always complete.
A re-run skips files already present with the right size (and digest when one is published) and
continues a partial file from its size, re-hashing the prefix it already has.

A full disk (ENOSPC, EDQUOT on a part file) is not retried: the first one stops the pull, the part files
stay for the next run, and the report has one failure saying how much space is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from asyncdepo.accounting import Stats
from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Fetch, PlainGet, RemoteItem
from asyncdepo.digests import FACTORIES, MultiHash, hash_path_sync
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.report import RunReport, _fill, _ticker, describe, disk_full_message
from asyncdepo.engine.sessions import PullSide, fetch_sessions
from asyncdepo.engine.source import selected
from asyncdepo.errors import DiskFullError, IntegrityError, TransientError, UsageError, is_transient
from asyncdepo.events import (
    ItemDone,
    ItemFailed,
    ItemRetrying,
    ItemSkipped,
    ItemStarted,
    JobFinished,
    JobStarted,
    Reporter,
)
from asyncdepo.transport import httpget
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.failures import disk_error
from asyncdepo.transport.pacer import (
    SYSTEM_CLOCK,
    Clock,
    Pacer,
    RetryEvent,
    RetryPolicy,
    Verdict,
    first_leaf,
    should_retry,
)
from asyncdepo.transport.partfiles import SUFFIX, part_path

PART = SUFFIX


def _target(outdir: Path, rel: str) -> Path:
    """``outdir/rel``, refused when ``rel`` would climb out of ``outdir`` (checked on the text: no syscalls)."""
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
        raise UsageError(f"remote path {rel!r} would land outside {outdir}")
    return outdir.joinpath(*parts)


def _known(item: RemoteItem) -> tuple[str, ...]:
    return tuple(a for a in item.digests if a in FACTORIES)


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _start(dest: Path, part: Path, item: RemoteItem, algos: tuple[str, ...]) -> tuple[str, int]:
    """Blocking: ("skip", size) when ``dest`` is already there and right, else ("fetch", offset) from ``part``."""
    have = _size(dest)
    if have is not None and (item.size is None or have == item.size):
        got = hash_path_sync(dest, algos).hexdigests()
        if all(got[a] == item.digests[a] for a in algos):
            return "skip", have
    part.parent.mkdir(parents=True, exist_ok=True)
    return "fetch", _resume_at(part, item)


def _resume_at(part: Path, item: RemoteItem) -> int:
    """Blocking: how much of ``item`` the part file already holds (a part longer than the item is dropped)."""
    offset = _size(part) or 0
    if item.size is not None and offset > item.size:
        part.unlink()
        offset = 0
    return offset


def _finish(part: Path, dest: Path, item: RemoteItem, algos: tuple[str, ...], hasher: MultiHash) -> tuple[int, dict[str, str]]:
    """Blocking: check size and digests of ``part``, then rename it to ``dest``; returns (size, digests)."""
    size = os.stat(part).st_size
    if item.size is not None and size != item.size:
        raise TransientError(f"got {size} of {item.size} bytes")
    got = hasher.hexdigests()
    for a in algos:
        if got[a] != item.digests[a]:
            part.unlink()
            raise IntegrityError(f"{a} mismatch (archive says {item.digests[a]}, received data has {got[a]})")
    os.replace(part, dest)
    return size, got


async def _stream(adapter: Adapter, item: RemoteItem, offset: int, part: Path, hasher: MultiHash, stats: Stats,
                  io: anyio.CapacityLimiter, bucket: TokenBucket | None) -> None:
    """Append ``adapter.read(item, offset)`` to ``part``: each block hashed and written in one thread hop.

    :raises DiskFullError: the disk is full (the part file keeps what was written).
    """
    what = f"write {item.rel}{PART}"
    fd = await anyio.to_thread.run_sync(lambda: os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    try:
        async for data in adapter.read(item, offset):
            block = bytes(data)  # the adapter may reuse its buffer once we ask for more
            if bucket is not None:
                await bucket.acquire(len(block))

            def store(b: bytes = block) -> None:
                hasher.update(b)
                view = memoryview(b)
                try:
                    while view:  # a write may be short (a disk filling up writes what fits first)
                        view = view[os.write(fd, view):]
                except OSError as exc:
                    raise disk_error(what, exc, part.parent) from None

            await anyio.to_thread.run_sync(store, limiter=io)
            stats.moved(item.rel, len(block))
    finally:
        await anyio.to_thread.run_sync(os.close, fd)


@dataclasses.dataclass
class _Job:
    """An item made ready ahead of its worker: where it goes, where it resumes and (maybe) its plain GET."""

    item: RemoteItem
    dest: Path
    offset: int
    spec: PlainGet | None


async def _prepare(adapter: Adapter, item: RemoteItem, dest: Path, io: anyio.CapacityLimiter,
                   lookup: bool = True) -> _Job | int:
    """Look at the disk and ask the archive for the URL (unless not ``lookup``: sessions need none) before a
    worker is free (an int: already present, with that size).

    Run ahead of the workers so that a worker goes straight from one transfer to the next: the lookups
    (a round trip each) and the file checks overlap with other files' bytes.
    """
    algos = _known(item)
    state, offset = await anyio.to_thread.run_sync(_start, dest, part_path(dest), item, algos,
                                                   limiter=io)
    if state == "skip":
        return offset
    spec = None
    if lookup and (item.size is None or offset < item.size):
        try:
            spec = await adapter.plain_get(item)
        except Exception:  # noqa: BLE001 - the worker asks again, under its retry policy, and reports it
            spec = None
    return _Job(item, dest, offset, spec)


async def _fetch(adapter: Adapter, job: _Job, reporter: Reporter, io: anyio.CapacityLimiter,
                 getters: anyio.CapacityLimiter, pacer: Pacer,
                 bucket: TokenBucket | None = None, extra: tuple[str, ...] = ()) -> tuple[int, dict[str, str]]:
    """Download one prepared item through ``pacer``. A plain GET is received, hashed, checked and renamed in
    one thread hop; a retry resumes from what the part file holds and asks for the URL again (a signed URL
    may have expired). Returns the file's size and digests."""
    item, dest = job.item, job.dest
    algos = _known(item)
    part = part_path(dest)
    stats = reporter.stats
    offset, spec = job.offset, job.spec
    retry = False
    damaged = 0

    def verdict(exc: BaseException) -> Verdict:
        # a digest mismatch is fetched again once (damage on the way); more would not change the archive
        nonlocal damaged
        if isinstance(exc, IntegrityError):
            damaged += 1
            if damaged >= 2:
                return Verdict(False, reason="integrity")
        return should_retry(exc)

    async def attempt() -> tuple[int, dict[str, str]]:
        nonlocal offset, spec, retry
        if retry:
            offset = await anyio.to_thread.run_sync(_resume_at, part, item, limiter=io)
            spec = None
        retry = True
        hasher = MultiHash(tuple(dict.fromkeys(algos + extra)))  # --hash adds digests for the report
        if offset:
            await anyio.to_thread.run_sync(functools.partial(hash_path_sync, part, (), into=hasher), limiter=io)
        reporter.emit(ItemStarted(rel=item.rel, size=item.size or -1, offset=offset))
        if spec is None and (item.size is None or offset < item.size):
            spec = await adapter.plain_get(item)
        if spec is not None and not httpget.proxied(spec.url):
            size, got = await httpget.fetch(spec, offset, part, hasher, functools.partial(stats.moved, item.rel),
                                            getters, then=functools.partial(_finish, part, dest, item, algos, hasher),
                                            bucket=bucket)
        else:
            await _stream(adapter, item, offset, part, hasher, stats, io, bucket)
            size, got = await anyio.to_thread.run_sync(_finish, part, dest, item, algos, hasher, limiter=io)
        stats.done(size)
        reporter.emit(ItemDone(rel=item.rel, size=size, sent=size - offset, digests=got))
        return size, got

    def announce(event: RetryEvent) -> None:
        stats.retried(event.reason)
        reporter.emit(ItemRetrying(rel=item.rel, attempt=event.attempt, error=str(event.error),
                                   delay=round(event.delay, 3), reason=event.reason))

    return await pacer.derive(classify=verdict).call(attempt, on_retry=announce)


def _check(part: Path, dest: Path, item: RemoteItem, extra: tuple[str, ...]) -> tuple[int, dict[str, str]]:
    """Blocking: a part a session delivered, hashed, checked and renamed into place (as :func:`_finish`)."""
    algos = _known(item)
    return _finish(part, dest, item, algos, hash_path_sync(part, tuple(dict.fromkeys(algos + extra))))


async def _disk_full(err: DiskFullError, out: Path, rels: set[str], stats: Stats, report: RunReport) -> None:
    """The one failure of a pull stopped by a full disk: what is missing, and the part files kept."""

    def kept() -> tuple[int, int]:
        sizes = [_size(_part_of(out, rel)) for rel in rels]
        return sum(1 for n in sizes if n), sum(n or 0 for n in sizes)

    files, size = await anyio.to_thread.run_sync(kept)
    need = max(0, stats.bytes_total - stats.bytes_done - size)
    message = disk_full_message(err, need, stats.walk_done, (files, size))
    where = err.path or str(out)
    report.stopped = "disk full"
    stats.failed()
    report.failures.append((where, message))  # in the report only: it is the pull's failure, not a file's


def _part_of(out: Path, rel: str) -> Path:
    dest = _target(out, rel)
    return part_path(dest)


async def pull(adapter: Adapter, outdir: Path | str, config: EngineConfig | None = None, *,
               reporter: Reporter | None = None, tick: float = 0.5, bucket: TokenBucket | None = None,
               clock: Clock = SYSTEM_CLOCK, journal_path: Path | None = None,
               argv: list[str] | None = None) -> RunReport:
    """Fetch every item ``adapter.list_remote()`` yields into ``outdir``; failures are in the report.

    Three stages: the lister, ``transfers`` preparers (disk check, URL lookup) and ``transfers`` workers,
    joined by bounded streams, so memory does not grow with the number of items. An adapter with
    ``features.pull_sessions`` gets the prepared items in sessions (:func:`~asyncdepo.engine.sessions.fetch_sessions`)
    instead of workers.

    The pull is a job of kind ``pull`` in the journal (``journal_path``, else ``config.journal_path``, else the
    default): its id comes from the adapter's ``describe()`` and OUTDIR, each item is journaled as it is done,
    skipped (``done``) or failed, and ``argv`` — the secret-free command — is what ``asyncdepo resume JOB``
    reruns. What is already on disk is found again by the disk check, so a resumed pull moves only what is
    missing.
    """
    config = config or EngineConfig()
    if config.compress is not None:
        raise UsageError("--compress applies to pushes; a pull writes what the archive holds")
    reporter = reporter or Reporter()
    out = Path(outdir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport(ok=False, job_id="", bwlimit=config.bwlimit)
    started = time.monotonic()
    io = anyio.CapacityLimiter(max(4, 2 * (os.cpu_count() or 2)))
    getters = anyio.CapacityLimiter(config.transfers)  # one thread per transfer doing a plain GET
    stats = reporter.stats
    # a pull item is one request that resumes where it stopped: its tries are those of a request and an
    # item together
    pacer = Pacer(RetryPolicy(attempts=config.request_attempts * max(1, config.item_attempts)), clock=clock)
    if bucket is None and config.bwlimit:
        bucket = TokenBucket(config.bwlimit)  # --bwlimit caps the whole pull, as it caps a push
    extra = tuple(a for a in config.digests() if a in FACTORIES)
    sessions = adapter.features.pull_sessions
    journal = await Journal.open(journal_path or config.journal_path)
    jid = ""

    full: list[DiskFullError] = []  # the first full-disk error stops the pull
    stopped_in_flight: set[str] = set()

    async def failed(item: RemoteItem, exc: BaseException) -> None:
        msg = describe(exc)
        transient = is_transient(first_leaf(exc))
        stats.failed()
        report.failures.append((item.rel, msg.splitlines()[0]))
        reporter.emit(ItemFailed(rel=item.rel, error=msg, transient=transient, size=item.size or -1))
        await journal.record(jid, item.rel, size=item.size or 0, mtime_ns=0, state="failed",
                             error=msg.splitlines()[0], transient=int(transient))

    async def fetched(item: RemoteItem, size: int, digests: dict[str, str] | None) -> None:
        await journal.record(jid, item.rel, size=size, mtime_ns=0, state="done", offset=size, digests=digests,
                             error=None, transient=0)

    async def session_done(f: Fetch, size: int, digests: dict[str, str]) -> None:
        sent = stats.active.get(f.item.rel, [0, 0])[1]
        stats.done(size)
        reporter.emit(ItemDone(rel=f.item.rel, size=size, sent=sent, digests=digests))
        await fetched(f.item, size, digests)

    async def session_note(fetches: list[Fetch], state: Any) -> None:
        for f in fetches:
            await journal.record(jid, f.item.rel, size=f.item.size or 0, mtime_ns=0, remote=dict(state))
        await journal.flush()

    side = PullSide(out, lambda f: _check(f.part, _target(out, f.item.rel), f.item, extra), session_done,
                    lambda f, exc: failed(f.item, exc), session_note, journal.flush, io)
    try:
        async with adapter:
            jid, existed = await journal.open_job("pull", adapter.describe(), str(out), argv or [])
            report.job_id = jid
            reporter.emit(JobStarted(job=jid, source=adapter.describe(), target=str(out), resumed=existed))
            send, recv = anyio.create_memory_object_stream[RemoteItem](config.transfers)
            ready_send, ready_recv = anyio.create_memory_object_stream[_Job](config.transfers)

            async def lister() -> None:
                async with send:
                    async for item in adapter.list_remote():
                        if not selected(item.rel, config.include, config.exclude):
                            continue
                        stats.found(item.size)
                        await send.send(item)
                stats.walk_finished()

            async def preparer(items: Any, ready: Any) -> None:
                async with items, ready:
                    async for item in items:
                        try:
                            job = await _prepare(adapter, item, _target(out, item.rel), io, lookup=not sessions)
                        except Exception as exc:  # noqa: BLE001 - this item fails, the pull goes on
                            await failed(item, exc)
                            continue
                        if isinstance(job, int):
                            stats.skipped(job)
                            reporter.emit(ItemSkipped(rel=item.rel, size=job, reason="already present"))
                            await fetched(item, job, None)
                        else:
                            await ready.send(job)

            async def worker(jobs: Any) -> None:
                async with jobs:
                    async for job in jobs:
                        stats.item_in(job.item.rel, job.item.size or -1)
                        try:
                            size, got = await _fetch(adapter, job, reporter, io, getters, pacer, bucket, extra)
                        except Exception as exc:  # noqa: BLE001 - this item fails, the pull goes on
                            err = first_leaf(exc)
                            if not isinstance(err, DiskFullError):
                                await failed(job.item, exc)
                            elif not full:  # no more room: stop, one message for the whole pull
                                full.append(err)
                                stopped_in_flight.update(stats.active)
                                inner.cancel_scope.cancel()
                        else:
                            await fetched(job.item, size, got)
                        finally:
                            stats.item_out(job.item.rel)

            async def prepared(jobs: Any) -> AsyncIterator[Fetch]:
                async with jobs:
                    async for job in jobs:
                        yield Fetch(job.item, part_path(job.dest), job.offset)

            async with anyio.create_task_group() as tg:
                tg.start_soon(_ticker, reporter, tick)
                async with anyio.create_task_group() as inner:
                    inner.start_soon(lister)
                    async with recv, ready_send, ready_recv:
                        for _ in range(config.transfers):
                            inner.start_soon(preparer, recv.clone(), ready_send.clone())
                            if not sessions:
                                inner.start_soon(worker, ready_recv.clone())
                        if sessions:
                            inner.start_soon(fetch_sessions, adapter, reporter, prepared(ready_recv.clone()), side,
                                             config, clock)
                tg.cancel_scope.cancel()
            if full:
                await _disk_full(full[0], out, stopped_in_flight, stats, report)
            report.summary = await adapter.finish(not report.failures) or {}
    except BaseException as exc:
        if isinstance(first_leaf(exc), anyio.get_cancelled_exc_class()) or isinstance(exc, KeyboardInterrupt):
            report.interrupted = True
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if jid:
                ok = not report.failures and not report.interrupted
                await journal.set_job(jid, "done" if ok else ("interrupted" if report.interrupted else "failed"))
            await journal.close()
        _fill(report, reporter, started)
        report.ok = not report.failures
        reporter.tick()  # a last snapshot, with the final counts, for progress, --json and metrics
        reporter.emit(JobFinished(job=report.job_id, report=report.to_json()))
    return report
