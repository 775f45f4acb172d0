"""Sending one item: the multipart, chunked and stream modes, and the request and item levels of retry.

Both levels go through the one retry loop, :class:`~asyncdepo.transport.pacer.Pacer`:

* per request (:meth:`Run.request`, ``run.requests``): backoff with full jitter, Retry-After honoured, a
  deadline, each attempt inside a request slot (``--transfers`` requests in flight at most; a request that
  backs off holds no slot). A chunk whose request failed transiently is resent from the offset the server
  confirms (``writer.resync()`` at the start of the next attempt), so a dropped connection re-sends at most
  the rest of one chunk;
* per item (:func:`send_item`, ``run.items``): when a request runs out of attempts, or the source changed,
  the item is reopened from its journaled state (or from zero when the file changed).

Every retry is counted (``stats.retried``) and announced (:class:`~asyncdepo.events.ItemRetrying`) by
:meth:`Run.retrying`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import anyio

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Chunk, ChunkWriter, Features, Item, Part, PartInfo
from asyncdepo.digests import MultiHash, digest_bytes
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.partstream import hash_parts
from asyncdepo.engine.pipeline import BufferPool, ChunkStream, FileSource, RawReader, ZstdReader, read_small
from asyncdepo.engine.prefix import Journaled, PrefixChangedError, check_cut_chunk, hash_prefix
from asyncdepo.errors import (
    OffsetMismatchError,
    PermanentError,
    SourceChangedError,
    SourceError,
    SourceVanishedError,
)
from asyncdepo.events import ItemDone, ItemRetrying, ItemStarted, Reporter
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.pacer import (
    SYSTEM_CLOCK,
    Classify,
    Clock,
    OnRetry,
    Pacer,
    RetryEvent,
    RetryPolicy,
    Verdict,
    first_leaf,
    should_retry,
)

T = TypeVar("T")

#: the digest journaled for every chunk a target confirmed (so a resume can check what the target holds):
#: the cheapest one at hand. Only chunks of items larger than one chunk are journaled; a smaller item is
#: simply re-sent when its state is in doubt.
CHUNK_DIGEST = "xxh3"

#: no single request (with its retries and waits) may take longer than this
REQUEST_DEADLINE = 900.0


@dataclasses.dataclass
class Run:
    """Everything one run shares: config, adapter, bounds, journal, reporting and the pacers of the request
    and item levels (both built on one clock, so tests can step time). ``journal`` is the SQLite journal,
    or on a cluster's worker a :class:`~asyncdepo.engine.ledger.MemoryLedger` (rows in memory)."""

    config: EngineConfig
    adapter: Adapter
    reporter: Reporter
    journal: Journal
    job: str
    pool: BufferPool
    io: anyio.CapacityLimiter
    slots: AbstractAsyncContextManager[Any]  # request slots: a CapacityLimiter, or a cluster's job-wide ones
    bucket: TokenBucket | None
    hashes: tuple[str, ...]
    clock: Clock = SYSTEM_CLOCK
    #: commit the journal when an item is done, before it is announced (a watch: a kill at any moment
    #: must not make the next run send a file again; one run's batching would lose up to half a second)
    durable: bool = False
    requests: Pacer = dataclasses.field(init=False)
    items: Pacer = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        cfg = self.config
        self.requests = Pacer(RetryPolicy(attempts=cfg.request_attempts, deadline=REQUEST_DEADLINE),
                              classify=_request_verdict, tokens=self.slots, clock=self.clock)
        self.items = Pacer(RetryPolicy(attempts=cfg.item_attempts, base=0.5, cap=30.0), clock=self.clock)

    @property
    def features(self) -> Features:
        return self.adapter.features

    def retrying(self, rel: str) -> OnRetry:
        """The retry hook for ``rel``: count the retry by reason and announce it."""
        stats, emit = self.reporter.stats, self.reporter.emit

        def hook(event: RetryEvent) -> None:
            stats.retried(event.reason)
            emit(ItemRetrying(rel=rel, attempt=event.attempt, error=str(event.error),
                              delay=round(event.delay, 3), reason=event.reason))
        return hook

    async def throttle(self, n: int) -> None:
        if self.bucket is not None and n:
            await self.bucket.acquire(n)

    async def request(self, rel: str, fn: Callable[[], Awaitable[T]], *, attempts: int | None = None,
                      classify: Classify | None = None) -> T:
        """``await fn()`` through the request pacer (see the module docstring); ``classify`` replaces the
        request level's retry decision for this call."""
        stats = self.reporter.stats

        async def counted() -> T:
            stats.request(+1)
            try:
                return await fn()
            finally:
                stats.request(-1)

        pacer = self.requests
        if attempts is not None or classify is not None:
            pacer = pacer.derive(attempts=attempts, classify=classify)
        return await pacer.call(counted, on_retry=self.retrying(rel))


def _request_verdict(exc: BaseException) -> Verdict:
    """Request level: as :func:`should_retry`, except that a server holding another offset is left to the
    item level, which reopens the item from the server's state (a repeated request would meet the same
    offset), and so is a file that changed: the item level reads its size and mtime again (a repeated
    request would check the file against the same old ones). Chunk sends resync instead:
    :func:`_chunk_verdict`."""
    if isinstance(exc, OffsetMismatchError):
        return Verdict(False, reason="offset")
    if isinstance(first_leaf(exc), SourceChangedError):
        return Verdict(False, reason="source-changed")
    return should_retry(exc)


def _chunk_verdict(exc: BaseException) -> Verdict:
    """A chunk send resyncs with the server before it retries, so another offset is worth a retry, unless
    the server went back before the chunk (the upload was replaced or truncated): that is the item level's."""
    if isinstance(exc, _Rewound):
        return Verdict(False, reason="offset")
    return should_retry(exc)


class _Rewound(OffsetMismatchError):
    """The server holds less than the start of the chunk being resent."""


def _part_size(run: Run, size: int) -> int:
    f = run.features
    part = max(run.config.chunk_size, f.min_part_size, math.ceil(size / f.max_parts) if size > 0 else 0)
    return min(part, f.max_part_size) if f.max_part_size else part


def _mode(run: Run, item: Item) -> str:
    f = run.features
    if f.multipart and (item.size < 0 or item.size > _part_size(run, item.size)):
        return "multipart"
    if f.chunked or f.multipart:
        return "chunked"
    return "stream"


def _remote_item(run: Run, item: Item) -> Item:
    """The item as the target sees it: ``.zst`` appended and size unknown when compressing."""
    if run.config.compress is None:
        return item
    return dataclasses.replace(item, rel=item.rel + ".zst", size=-1)


async def _send_chunk(run: Run, item: Item, writer: ChunkWriter, chunk: Chunk) -> None:
    """Send one chunk; after a transient failure, resend only what the server does not confirm."""
    end = chunk.offset + len(chunk.data)
    current = chunk
    retry = False
    stats = run.reporter.stats
    await run.throttle(len(chunk.data))

    async def attempt() -> None:
        nonlocal current, retry
        if retry and run.features.resumable:
            confirmed = await writer.resync()
            if confirmed >= end:
                return  # the lost response had in fact landed
            if confirmed < chunk.offset:
                raise _Rewound(f"{item.rel}: server went back to offset {confirmed} (< {chunk.offset})",
                               offset=confirmed)
            if confirmed != current.offset:
                data = chunk.data[confirmed - chunk.offset:]
                digests = (await anyio.to_thread.run_sync(digest_bytes, data, run.features.chunk_digests,
                                                          limiter=run.io) if run.features.chunk_digests else {})
                current = dataclasses.replace(chunk, offset=confirmed, data=data, digests=digests)
        retry = True
        await writer.write(current)
        stats.moved(item.rel, len(current.data))

    await run.request(item.rel, attempt, classify=_chunk_verdict)


async def _chunked(run: Run, item: Item, writer: ChunkWriter, hasher: MultiHash) -> int:
    """Send the item in order from ``writer.confirmed``; returns the stream's total length."""
    cfg = run.config
    start = writer.confirmed
    if cfg.compress is not None:
        level = cfg.compress[1]

        def opener() -> ZstdReader:
            return ZstdReader(RawReader(item, 0, None, hasher), level, cfg.compress_threads)
        # the stream is made again from the start; the chunks the target holds are checked, not sent
        first, total = 0, None
    else:
        if start > item.size:
            start = 0  # the server holds more than the file has: it is not our upload; start over
        if 0 < start < item.size <= cfg.chunk_size:
            # a file that fits in one request, held in part (a run killed during that request): no digest of
            # those bytes was journaled, so nothing says they are the source's (prefix.py): send it whole
            # again in a new upload; it costs at most one chunk
            raise PrefixChangedError(f"{item.rel}: the target holds {start} of its {item.size} bytes from a "
                                     "request cut short; sent again whole")
        # what the target holds is fed to the whole-file hasher, and checked against the source (prefix.py)
        await hash_prefix(item, start, hasher, run.journal.chunks(run.job, item.rel), CHUNK_DIGEST,
                          pool=run.pool, limiter=run.io, block=cfg.stream_block)

        def opener() -> RawReader:  # type: ignore[misc]
            return RawReader(item, start, None, hasher)
        first, total = start, item.size
    before = writer.state()
    await run.request(item.rel, writer.create)
    if writer.state() != before:
        # the target created the upload (tus): it must be in the journal before its first byte goes, as a
        # run killed during that body would leave an upload the resume cannot find (tus has no listing).
        # Concurrent items share a commit (Journal.flush)
        await run.journal.record(run.job, item.rel, remote=writer.state())
        await run.journal.flush()
    if cfg.compress is None and item.size - start <= cfg.chunk_size:
        chunk, buf = await read_small(item, start, hasher, run.features.chunk_digests, pool=run.pool,
                                      limiter=run.io)
        try:
            await _send_chunk(run, item, writer, chunk)
        finally:
            buf.release()
        await run.journal.record(run.job, item.rel, state="partial", offset=item.size, remote=writer.state())
        return item.size
    big = (item.size if cfg.compress is None else item.size // 2) > cfg.chunk_size
    if big:
        await run.journal.flush()  # the upload location must survive a crash before bytes move
    length = first
    known = writer.state()
    digests = tuple(dict.fromkeys((*run.features.chunk_digests, CHUNK_DIGEST)))
    async with ChunkStream(opener, pool=run.pool, chunk_size=cfg.chunk_size, read_ahead=cfg.read_ahead,
                           chunk_digests=digests, limiter=run.io, start_offset=first,
                           total=total) as stream:
        held = Journaled(run.journal.chunks(run.job, item.rel)) if cfg.compress is not None and start else None
        async for chunk in stream:
            if chunk.offset + len(chunk.data) <= writer.confirmed and not chunk.last:
                if held is not None:  # a compressed stream's chunk the target holds (prefix.py)
                    want = await held.digest_at(chunk.offset, len(chunk.data))
                    held.check(item.rel, chunk.offset, len(chunk.data), want, chunk.digests[CHUNK_DIGEST])
                continue
            await run.journal.record_chunk(run.job, item.rel, chunk.offset, len(chunk.data),
                                           chunk.digests[CHUNK_DIGEST])
            if big:
                # the chunk's digest is committed before its bytes go, so whatever a kill leaves of them on the
                # target can be checked against the source on a resume (prefix.py); one commit per chunk,
                # shared by concurrent items (Journal.flush)
                await run.journal.flush()
            await _send_chunk(run, item, writer, chunk)
            length = chunk.offset + len(chunk.data)
            state = writer.state()
            await run.journal.record(run.job, item.rel, state="partial", offset=length, remote=state)
            if big and state != known and not chunk.last:
                # the target created its upload with this chunk: its location must survive a crash
                known = state
                await run.journal.flush()
    return length


async def _multipart(run: Run, item: Item, writer: ChunkWriter, hasher: MultiHash) -> int:
    """Read parts in order (hashing the whole file), send them concurrently; returns the length."""
    cfg = run.config
    part = _part_size(run, max(item.size, 0))
    if cfg.compress is not None:
        level = cfg.compress[1]

        def opener() -> RawReader | ZstdReader:
            return ZstdReader(RawReader(item, 0, None, hasher), level, cfg.compress_threads)
        total = None
    else:
        def opener() -> RawReader | ZstdReader:
            return RawReader(item, 0, None, hasher)
        total = item.size
    await run.journal.flush()
    length = 0
    stats = run.reporter.stats

    async def send(chunk: Chunk, release: Callable[[], None]) -> None:
        try:
            await run.throttle(len(chunk.data))
            info = await run.request(item.rel, lambda: writer.write_part(chunk))
            writer.parts[chunk.part_number] = info
            stats.moved(item.rel, len(chunk.data))
            await run.journal.record(run.job, item.rel, state="partial", remote=writer.state())
        finally:
            release()

    try:
        # the stream closes before the task group waits for the parts still being sent
        async with (anyio.create_task_group() as tg,
                    ChunkStream(opener, pool=run.pool, chunk_size=part, read_ahead=cfg.read_ahead,
                                chunk_digests=run.features.chunk_digests, limiter=run.io,
                                total=total, part_numbers=True) as stream):
            async for chunk in stream:
                length = chunk.offset + len(chunk.data)
                if chunk.part_number in writer.parts or (not chunk.data and chunk.part_number > 1):
                    continue
                buf = stream.detach(chunk)
                tg.start_soon(send, chunk, buf.release)
    except BaseExceptionGroup as eg:
        raise first_leaf(eg) from None
    return length


def _still_held(held: PartInfo | None, part: Part) -> bool:
    """A resumed part may be kept when its journaled digests match the ones just computed (when none can
    be compared, the writer's own check against the target decided)."""
    if held is None or held.size != part.size:
        return False
    same = [held.digests[a] == v for a, v in part.digests.items() if a in held.digests]
    if "md5" in part.digests and held.md5:
        same.append(held.md5 == part.digests["md5"])
    return all(same)


async def _part_streams(run: Run, item: Item, writer: ChunkWriter, hasher: MultiHash) -> int:
    """Multipart without part buffers (``Features.part_streams``): hash the file in order a few parts
    ahead of the sends (:func:`hash_parts`), send each part as a stream re-read from the file."""
    cfg, stats = run.config, run.reporter.stats
    await run.journal.flush()
    # hashed parts whose send has not finished: bounds how far the hashing read runs ahead of the sends'
    # re-reads (so those come from the page cache), not memory (a hashed part holds no buffer)
    ahead = anyio.Semaphore(cfg.transfers + cfg.read_ahead)

    def source(part: Part) -> FileSource:
        return FileSource(item, offset=part.offset, length=part.size, digests=(), block=cfg.stream_block,
                          limiter=run.io, pool=run.pool, on_bytes=lambda n: stats.moved(item.rel, n),
                          throttle=run.throttle)

    async def send(part: Part) -> None:
        try:
            info = await run.request(item.rel, lambda: writer.write_part_stream(part, source(part)))
            writer.parts[part.number] = info
            await run.journal.record(run.job, item.rel, state="partial", remote=writer.state())
        finally:
            ahead.release()

    try:
        async with anyio.create_task_group() as tg:
            async def on_part(part: Part) -> None:
                if _still_held(writer.parts.get(part.number), part):
                    return
                writer.parts.pop(part.number, None)
                await ahead.acquire()
                tg.start_soon(send, part)

            await hash_parts(item, _part_size(run, item.size), hasher, run.features.chunk_digests,
                             pool=run.pool, limiter=run.io, block=cfg.stream_block, on_part=on_part)
    except BaseExceptionGroup as eg:
        raise first_leaf(eg) from None
    return item.size


async def _stream(run: Run, item: Item, writer: ChunkWriter, hasher_algos: tuple[str, ...]) -> dict[str, str]:
    stats = run.reporter.stats

    def source() -> FileSource:
        return FileSource(item, digests=hasher_algos, block=cfg.stream_block, limiter=run.io, pool=run.pool,
                          on_bytes=lambda n: stats.moved(item.rel, n), throttle=run.throttle)

    cfg = run.config
    made: list[FileSource] = []

    async def once() -> None:
        src = source()
        made.append(src)
        await writer.write_stream(src)

    await run.request(item.rel, once)
    return made[-1].digests


async def _attempt(run: Run, item: Item, saved: dict[str, Any] | None, known: dict[str, str]) -> None:
    remote = _remote_item(run, item)
    writer = await run.request(item.rel, lambda: run.adapter.open_item(remote, saved))
    await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns, state="partial",
                             remote=writer.state())
    mode = _mode(run, remote)
    if writer.confirmed > 0:
        # check what the target holds against the journaled chunk digests before building on it; chunks
        # past the verified offset are forgotten (they are sent, and recorded, again)
        await writer.verify(run.journal.chunks(run.job, item.rel), CHUNK_DIGEST)
        held = None
        if mode == "chunked" and run.config.compress is None:
            # the chunk in flight when the last run stopped: the target may hold part of it (prefix.py)
            held = await check_cut_chunk(item, writer.confirmed, run.journal.chunks(run.job, item.rel),
                                         CHUNK_DIGEST, limiter=run.io)
        run.journal.forget_chunks(run.job, item.rel, writer.confirmed)
        if held is not None:  # the part of the cut chunk the target holds keeps a digest for the next resume
            await run.journal.record_chunk(run.job, item.rel, *held)
    run.reporter.emit(ItemStarted(rel=item.rel, size=item.size, offset=writer.confirmed))
    streamed = mode == "multipart" and run.features.part_streams and run.config.compress is None
    # streamed parts: whole-file CRCs the target also wants per part are composed from the parts' values
    hasher = MultiHash(run.hashes, composed=run.features.chunk_digests if streamed else ())
    try:
        if streamed:
            length = await _part_streams(run, item, writer, hasher)
        elif mode == "multipart":
            length = await _multipart(run, item, writer, hasher)
        elif mode == "chunked":
            length = await _chunked(run, item, writer, hasher)
        else:
            # digests computed before the start (the same bytes, size and mtime checked at the end) are
            # not computed again: only what is still missing is hashed while streaming
            missing = tuple(a for a in run.hashes if a not in known)
            digests = {**known, **await _stream(run, item, writer, missing)}
            length = item.size
        if mode != "stream":
            digests = hasher.hexdigests()
        for algo, value in known.items():
            if algo in digests and digests[algo] != value:
                raise SourceChangedError(f"{item.rel}: content changed after it was hashed; it will be re-sent")
        if run.config.compress is not None:
            digests = {**digests, "stream_size": str(length)}
        result = await run.request(item.rel, lambda: writer.complete(digests, item.size))
    except BaseException as exc:
        err = first_leaf(exc)
        # a permanent failure, a changed file (sent again from zero in a new upload) or a source that differs
        # from what the target holds (prefix.py) discards what the target holds of the item
        if isinstance(err, (PermanentError, SourceError, PrefixChangedError)):
            with anyio.CancelScope(shield=True):
                await writer.abort()
            await run.journal.record(run.job, item.rel, remote=None, offset=0)
            run.journal.forget_chunks(run.job, item.rel)
        raise
    digests.pop("stream_size", None)
    await run.journal.record(run.job, item.rel, state="done", offset=item.size, digests=digests,
                             remote=result or writer.state(), error=None, transient=0)
    if mode == "chunked" and (item.size < 0 or item.size > run.config.chunk_size):
        run.journal.forget_chunks(run.job, item.rel)  # only unfinished items are resumed
    if run.durable:
        await run.journal.flush()
    stats = run.reporter.stats
    stats.done(item.size)
    run.reporter.emit(ItemDone(rel=item.rel, size=item.size, sent=stats.active.get(item.rel, [0, 0])[1],
                               digests=digests))


async def send_item(run: Run, item: Item, saved: dict[str, Any] | None,
                    known: dict[str, str] | None = None) -> None:
    """Send ``item`` through the item pacer: after a transient failure the item is reopened from its
    journaled state, up to ``config.item_attempts`` times; from zero when the file changed.

    :raises DepoError: the last failure (transient ones already retried).
    """
    stats = run.reporter.stats
    rel = item.rel
    stats.item_in(rel, item.size)
    last: list[BaseException] = []
    have: dict[str, str] = known or {}
    announce = run.retrying(rel)

    def remember(event: RetryEvent) -> None:
        last[:] = [event.error]
        announce(event)

    async def attempt() -> None:
        nonlocal item, saved, have
        if last:  # a retry: start from what the journal (or the changed file) says now
            if isinstance(last[0], SourceChangedError):
                item = await anyio.to_thread.run_sync(restat, item)
                saved, have = None, {}
            else:
                rows = await run.journal.lookup(run.job, [rel])
                saved = (rows.get(rel) or {}).get("remote")
        await _attempt(run, item, saved, have)

    try:
        await run.items.call(attempt, on_retry=remember)
    finally:
        stats.item_out(rel)


def restat(item: Item) -> Item:
    """The item with its current size and mtime (after it changed).

    :raises SourceVanishedError: the file is gone.
    """
    try:
        st = os.stat(item.path)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceVanishedError(f"{item.rel}: source vanished (deleted while it was being sent)") from None
    return dataclasses.replace(item, size=st.st_size, mtime_ns=st.st_mtime_ns)
