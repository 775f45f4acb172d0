"""Sending one item: the multipart, chunked and stream modes, per-request and per-item retries.

Per request (:meth:`Run.request`): backoff with full jitter, Retry-After honoured, inside a request slot
(``--transfers`` requests in flight at most). A chunk whose request failed transiently is resent from
the offset the server confirms (``writer.resync()``), so a dropped connection re-sends at most the
rest of one chunk. Per item (:func:`send_item`): when a request runs out of attempts, or the source
changed, the item is reopened from its journaled state (or from zero when the file changed).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Chunk, ChunkWriter, Features, Item
from asyncdepo.digests import MultiHash, digest_bytes, hash_path_sync
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.pipeline import BufferPool, ChunkStream, FileSource, RawReader, ZstdReader, read_small
from asyncdepo.engine.report import first_error
from asyncdepo.errors import (
    OffsetMismatchError,
    PermanentError,
    SourceChangedError,
    SourceError,
    SourceVanishedError,
    is_transient,
)
from asyncdepo.events import ItemDone, ItemRetrying, ItemStarted, Reporter
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.pacer import RetryPolicy

T = TypeVar("T")

#: the digest journaled for every chunk a target confirmed (so a resume can check what the target holds):
#: the cheapest one at hand. Only chunks of items larger than one chunk are journaled; a smaller item is
#: simply re-sent when its state is in doubt.
CHUNK_DIGEST = "xxh3"


@dataclasses.dataclass
class Run:
    """Everything one run shares: config, adapter, bounds, journal and reporting."""

    config: EngineConfig
    adapter: Adapter
    reporter: Reporter
    journal: Journal
    job: str
    pool: BufferPool
    io: anyio.CapacityLimiter
    slots: anyio.CapacityLimiter
    bucket: TokenBucket | None
    policy: RetryPolicy
    hashes: tuple[str, ...]

    @property
    def features(self) -> Features:
        return self.adapter.features

    async def throttle(self, n: int) -> None:
        if self.bucket is not None and n:
            await self.bucket.acquire(n)

    async def request(self, rel: str, fn: Callable[[], Awaitable[T]], *, attempts: int | None = None,
                      retry_offsets: bool = False) -> T:
        """``await fn()`` in a request slot, retrying transient failures (see the module docstring)."""
        tries = attempts or self.config.request_attempts
        stats = self.reporter.stats
        n = 0
        while True:
            try:
                async with self.slots:
                    stats.request(+1)
                    try:
                        return await fn()
                    finally:
                        stats.request(-1)
            except Exception as exc:
                if not is_transient(exc) or n + 1 >= tries or (
                        isinstance(exc, OffsetMismatchError) and not retry_offsets):
                    raise
                delay = self.policy.delay(n, exc)
                n += 1
                stats.retries += 1
                self.reporter.emit(ItemRetrying(rel=rel, attempt=n, error=str(exc), delay=round(delay, 3)))
                await self.policy.sleep(delay)


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
    """Send one chunk; after a transient failure resend only what the server does not confirm."""
    end = chunk.offset + len(chunk.data)
    current = chunk
    stats = run.reporter.stats
    tries = run.config.request_attempts
    n = 0
    await run.throttle(len(chunk.data))
    while True:
        try:
            async with run.slots:
                stats.request(+1)
                try:
                    await writer.write(current)
                finally:
                    stats.request(-1)
            stats.add_sent(item.rel, len(current.data))
            return
        except Exception as exc:
            if not is_transient(exc) or n + 1 >= tries:
                raise
            delay = run.policy.delay(n, exc)
            n += 1
            stats.retries += 1
            run.reporter.emit(ItemRetrying(rel=item.rel, attempt=n, error=str(exc), delay=round(delay, 3)))
            await run.policy.sleep(delay)
            if not run.features.resumable:
                continue
            confirmed = await run.request(item.rel, writer.resync)
            if confirmed >= end:
                return  # the lost response had in fact landed
            if confirmed < chunk.offset:
                raise OffsetMismatchError(
                    f"{item.rel}: server went back to offset {confirmed} (< {chunk.offset})", offset=confirmed)
            if confirmed != current.offset:
                data = chunk.data[confirmed - chunk.offset:]
                digests = (await anyio.to_thread.run_sync(digest_bytes, data, run.features.chunk_digests,
                                                          limiter=run.io) if run.features.chunk_digests else {})
                current = dataclasses.replace(chunk, offset=confirmed, data=data, digests=digests)


async def _chunked(run: Run, item: Item, writer: ChunkWriter, hasher: MultiHash) -> int:
    """Send the item in order from ``writer.confirmed``; returns the stream's total length."""
    cfg = run.config
    start = writer.confirmed
    if cfg.compress is not None:
        level = cfg.compress[1]

        def opener() -> ZstdReader:
            return ZstdReader(RawReader(item, 0, None, hasher), level, cfg.compress_threads)
        skip, first, total = start, 0, None
    else:
        if start > item.size:
            start = 0  # the server holds more than the file has: it is not our upload; start over
        if start:
            await anyio.to_thread.run_sync(lambda: hash_path_sync(item.path, (), stop=start, into=hasher),
                                           limiter=run.io)

        def opener() -> RawReader:  # type: ignore[misc]
            return RawReader(item, start, None, hasher)
        skip, first, total = 0, start, item.size
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
                           skip=skip, total=total) as stream:
        async for chunk in stream:
            if chunk.offset + len(chunk.data) <= writer.confirmed and not chunk.last:
                continue
            await _send_chunk(run, item, writer, chunk)
            length = chunk.offset + len(chunk.data)
            state = writer.state()
            await run.journal.record_chunk(run.job, item.rel, chunk.offset, len(chunk.data),
                                           chunk.digests[CHUNK_DIGEST])
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
            stats.add_sent(item.rel, len(chunk.data))
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
        raise first_error(eg) from None
    return length


async def _stream(run: Run, item: Item, writer: ChunkWriter, hasher_algos: tuple[str, ...]) -> dict[str, str]:
    stats = run.reporter.stats

    def source() -> FileSource:
        return FileSource(item, digests=hasher_algos, block=cfg.stream_block, limiter=run.io, pool=run.pool,
                          on_bytes=lambda n: stats.add_sent(item.rel, n), throttle=run.throttle)

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
        run.journal.forget_chunks(run.job, item.rel, writer.confirmed)
    run.reporter.emit(ItemStarted(rel=item.rel, size=item.size, offset=writer.confirmed))
    hasher = MultiHash(run.hashes)
    try:
        if mode == "multipart":
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
        err = first_error(exc)
        if isinstance(err, (PermanentError, SourceError)) and not isinstance(err, SourceChangedError):
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
    stats = run.reporter.stats
    stats.files_done += 1
    stats.bytes_done += item.size
    run.reporter.emit(ItemDone(rel=item.rel, size=item.size, sent=stats.active.get(item.rel, [0, 0])[1],
                               digests=digests))


async def send_item(run: Run, item: Item, saved: dict[str, Any] | None,
                    known: dict[str, str] | None = None) -> None:
    """Send ``item``; reopen it from its journaled state after a transient failure, up to
    ``config.item_attempts`` times; from zero when the file changed.

    :raises DepoError: the last failure (transient ones already retried).
    """
    stats = run.reporter.stats
    stats.item_in(item.rel, item.size)
    try:
        attempt = 0
        while True:
            try:
                await _attempt(run, item, saved, known or {})
                return
            except Exception as exc:  # noqa: BLE001 - classified: transient retried, others re-raised
                err = first_error(exc)
                if not is_transient(err) or attempt + 1 >= run.config.item_attempts:
                    raise err from None
                attempt += 1
                delay = run.policy.delay(attempt, err)
                stats.retries += 1
                run.reporter.emit(ItemRetrying(rel=item.rel, attempt=attempt, error=str(err),
                                               delay=round(delay, 3)))
                await run.policy.sleep(delay)
                if isinstance(err, SourceChangedError):
                    item = await anyio.to_thread.run_sync(restat, item)
                    saved, known = None, {}
                else:
                    rows = await run.journal.lookup(run.job, [item.rel])
                    saved = (rows.get(item.rel) or {}).get("remote")
    finally:
        stats.item_out(item.rel)


def restat(item: Item) -> Item:
    """The item with its current size and mtime (after it changed).

    :raises SourceVanishedError: the file is gone.
    """
    try:
        st = os.stat(item.path)
    except (FileNotFoundError, NotADirectoryError):
        raise SourceVanishedError(f"{item.rel}: source vanished (deleted while it was being sent)") from None
    return dataclasses.replace(item, size=st.st_size, mtime_ns=st.st_mtime_ns)
