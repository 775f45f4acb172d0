"""ByteSource and chunk producers: chunked reads in threads, bounded read-ahead, one-pass hashing,
optional zstd.

* :class:`BufferPool` — page-aligned ``mmap`` buffers under a byte budget; a buffer is reserved
  *before* it is read (the rclone multipart pattern), so the bytes held are bounded whatever happens
  downstream. ``stats.buffered`` follows the reservations.
* :class:`RawReader` — a blocking reader of ``[offset, offset+length)`` of one file with ``os.preadv``
  into aligned buffers, feeding whole-file hashers in the same pass, and detecting a file that changed
  size or mtime while it was read (SourceChangedError).
* :func:`chunks` — an async generator of :class:`Chunk` (reserved buffer, per-chunk digests) for the
  chunked and multipart modes, reading ahead by ``read_ahead`` chunks through a bounded stream.
* :class:`FileSource` — a streamed ByteSource of a file (stream mode).

Every blocking call runs in a worker thread limited by a shared CapacityLimiter; the loop only moves
buffers.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import anyio.abc

from asyncdepo.contract import Chunk, Item
from asyncdepo.digests import MultiHash, digest_bytes
from asyncdepo.errors import SourceChangedError, SourceError


class _Gauge(Protocol):
    def buffer(self, delta: int) -> None: ...


class Buffer:
    """A reserved, page-aligned buffer; ``view[:n]`` is what was read into it."""

    __slots__ = ("_pool", "mm", "size", "view")

    def __init__(self, pool: BufferPool, size: int) -> None:
        self._pool = pool
        self.size = size
        self.mm = mmap.mmap(-1, max(size, 1))
        self.view = memoryview(self.mm)

    def release(self) -> None:
        self._pool._release(self)


class BufferPool:
    """Reserves buffers against a byte ``capacity``; ``acquire`` waits while the budget is spent.

    Released buffers of 1 MiB and more are kept for reuse while in-use plus kept bytes stay within the
    capacity, so steady streaming does not map memory (and fault its pages in) for every chunk.
    """

    def __init__(self, capacity: int, gauge: _Gauge | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self.gauge = gauge
        self._event: anyio.Event | None = None
        self._free: dict[int, list[Buffer]] = {}
        self._free_bytes = 0

    async def acquire(self, size: int) -> Buffer:
        """A buffer of ``size`` bytes (at most ``capacity``), waiting for budget."""
        size = max(1, min(size, self.capacity))
        while self.used + size > self.capacity:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        self.used += size
        if self.gauge is not None:
            self.gauge.buffer(size)
        free = self._free.get(size)
        if free:
            self._free_bytes -= size
            return free.pop()
        if self.used + self._free_bytes > self.capacity:
            self._free.clear()  # sizes nobody asks for any more: give their memory back
            self._free_bytes = 0
        return Buffer(self, size)

    def _release(self, buf: Buffer) -> None:
        self.used -= buf.size
        if self.gauge is not None:
            self.gauge.buffer(-buf.size)
        # keep it for reuse (no new mapping, no page faults) while in-use plus kept stays within the budget
        if buf.size >= 1 << 20 and self.used + self._free_bytes + buf.size <= self.capacity:
            self._free.setdefault(buf.size, []).append(buf)
            self._free_bytes += buf.size
        # otherwise dropped: the mapping is unmapped when the last view of it (a chunk an adapter may
        # still hold) goes away; closing it here would fail while views exist
        event, self._event = self._event, None
        if event is not None:
            event.set()


class RawReader:
    """Blocking reader of ``[offset, offset + length)`` of ``item``; feeds ``hasher`` in file order.

    :raises SourceError: the file vanished or cannot be read.
    :raises SourceChangedError: EOF came early, or size/mtime differ from ``item`` at the end.
    """

    def __init__(self, item: Item, offset: int = 0, length: int | None = None,
                 hasher: MultiHash | None = None) -> None:
        self.item = item
        self.pos = offset
        self.end = item.size if length is None else offset + length
        self.hasher = hasher
        try:
            self.fd = os.open(item.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SourceChangedError(f"{item.rel}: file disappeared before it was read") from None
        except OSError as exc:
            raise SourceError(f"{item.rel}: cannot open: {exc.strerror}") from None

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (up to what is left); 0 at the end of the range."""
        want = min(len(view), self.end - self.pos)
        got = 0
        while got < want:
            try:
                n = os.preadv(self.fd, [view[got:want]], self.pos + got)
            except OSError as exc:
                raise SourceError(f"{self.item.rel}: read failed: {exc.strerror}") from None
            if n == 0:
                raise SourceChangedError(f"{self.item.rel}: file shrank while it was read; it will be re-sent")
            got += n
        if self.hasher is not None and got:
            self.hasher.update(view[:got])
        self.pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        """File-like ``read`` (for zstd's stream_reader)."""
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])

    def check_unchanged(self) -> None:
        """Raise SourceChangedError when the file's size or mtime moved since the walk."""
        st = os.fstat(self.fd)
        if st.st_size != self.item.size or st.st_mtime_ns != self.item.mtime_ns:
            raise SourceChangedError(
                f"{self.item.rel}: file changed while it was being sent (size {self.item.size} -> "
                f"{st.st_size}); it will be re-sent from the start")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ZstdReader:
    """Compressed view of a RawReader: ``readinto`` yields zstd output (multi-threaded compressor)."""

    def __init__(self, raw: RawReader, level: int, threads: int) -> None:
        import zstandard

        self.raw = raw
        # one zstd worker per file by default: files in flight already use every core, and one
        # multi-threaded compressor per file oversubscribed two cores (2.5x slower, measured)
        cctx = zstandard.ZstdCompressor(level=level, threads=threads or 1, write_checksum=True)
        # zstandard only calls .read() on the source; its stub asks for a full IO[bytes]
        self._reader = cctx.stream_reader(raw, size=raw.end - raw.pos,  # type: ignore[arg-type]
                                          read_size=1 << 20)

    def readinto(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            n = self._reader.readinto(view[got:])
            if n == 0:
                break
            got += n
        return got

    def check_unchanged(self) -> None:
        self.raw.check_unchanged()

    def close(self) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]  # zstandard's stub leaves close() untyped
        self.raw.close()


Reader = RawReader | ZstdReader


async def read_small(item: Item, start: int, hasher: MultiHash, chunk_digests: tuple[str, ...], *,
                     pool: BufferPool, limiter: anyio.CapacityLimiter) -> tuple[Chunk, Buffer]:
    """``[start, size)`` of a file that fits in one chunk, as one last chunk, in a single worker-thread
    call (open, read, hash, check, close): the fast path for small files. With ``start == 0`` the file
    and chunk digests come from one pass over the union of algorithms. The caller releases the buffer.

    :raises SourceError | SourceChangedError: as RawReader.
    """
    buf = await pool.acquire(max(1, item.size - start))
    whole = start == 0

    def work() -> tuple[int, dict[str, str]]:
        reader = RawReader(item, start, None, None if whole else hasher)
        try:
            n = reader.readinto(buf.view[: item.size - start]) if item.size > start else 0
            reader.check_unchanged()
        finally:
            reader.close()
        data = buf.view[:n]
        if whole:
            both = digest_bytes(data, tuple(dict.fromkeys((*hasher.algorithms, *chunk_digests))))
            hasher.set_final(both)
            return n, {a: both[a] for a in chunk_digests}
        return n, digest_bytes(data, chunk_digests) if chunk_digests else {}

    try:
        n, digests = await anyio.to_thread.run_sync(work, limiter=limiter)
    except BaseException:
        buf.release()
        raise
    return Chunk(offset=start, data=buf.view[:n], digests=digests, last=True, total=item.size), buf


class ChunkStream:
    """Reads a stream into reserved buffers, ``read_ahead`` chunks ahead of the consumer::

        async with ChunkStream(open_reader, pool=..., ...) as stream:
            async for chunk in stream:
                await send(chunk)          # chunk.data is valid until the next chunk is requested
                # or: stream.detach(chunk) -> Buffer, to keep it beyond (caller releases)

    ``skip`` bytes of the stream are read (and hashed whole-file) but not yielded: used to resume a
    compressed stream, whose offsets exist only after compression. Chunk offsets are stream offsets
    (``start_offset`` + bytes read). ``total`` (when known) marks the last chunk without reading past it.
    Errors from the reader (SourceError, SourceChangedError) are raised from the iteration.
    """

    def __init__(self, open_reader: Callable[[], Reader], *, pool: BufferPool, chunk_size: int,
                 read_ahead: int, chunk_digests: tuple[str, ...], limiter: anyio.CapacityLimiter,
                 start_offset: int = 0, skip: int = 0, total: int | None = None,
                 part_numbers: bool = False) -> None:
        self._open = open_reader
        self._pool = pool
        self._chunk = chunk_size
        self._digests = chunk_digests
        self._limiter = limiter
        self._offset = start_offset
        self._skip = skip
        self._total = total
        self._parts = part_numbers
        # the producer holds one filled chunk while it waits to hand it over, so a stream of
        # read_ahead - 1 makes at most 1 + read_ahead buffers per item (the EngineConfig formula)
        self._send, self._recv = anyio.create_memory_object_stream[tuple[Chunk, Buffer] | Exception](
            max(0, read_ahead - 1))
        self._held: dict[int, Buffer] = {}
        self._last: Buffer | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._produce)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(et, e, tb)
        finally:
            if self._last is not None:
                self._last.release()
                self._last = None
            while True:
                try:
                    left = self._recv.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                if isinstance(left, tuple):
                    left[1].release()
            self._recv.close()

    async def _produce(self) -> None:
        reader: Reader | None = None
        async with self._send:
            try:
                reader = await anyio.to_thread.run_sync(self._open, limiter=self._limiter)
                await self._fill_all(reader)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
                with anyio.CancelScope(shield=True):
                    try:
                        await self._send.send(exc)
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        pass
            finally:
                if reader is not None:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(reader.close)

    async def _fill_all(self, reader: Reader) -> None:
        offset, number, total, send = self._offset, 0, self._total, self._send
        while True:
            # a buffer only as large as what is left of a file of known size
            want = self._chunk if total is None else max(1, min(self._chunk, total - offset))
            buf = await self._pool.acquire(want)

            def fill(b: Buffer = buf, r: Reader = reader) -> tuple[int, dict[str, str]]:
                n = r.readinto(b.view[: b.size])
                d = digest_bytes(b.view[:n], self._digests) if (self._digests and n) else {}
                return n, d

            try:
                n, digests = await anyio.to_thread.run_sync(fill, limiter=self._limiter)
            except BaseException:
                buf.release()
                raise
            if n == 0 and number > 0:
                # the stream ended on a chunk boundary: a zero-length last chunk tells the writer
                # the total (tus deferred length)
                try:
                    await anyio.to_thread.run_sync(reader.check_unchanged, limiter=self._limiter)
                except BaseException:
                    buf.release()
                    raise
                await send.send((Chunk(offset=offset, data=buf.view[:0], digests=digest_bytes(
                    b"", self._digests) if self._digests else {}, last=True,
                    part_number=number + 1 if self._parts else 0, total=offset), buf))
                return
            number += 1
            last = n < buf.size if total is None else offset + n >= total
            if last:
                try:
                    await anyio.to_thread.run_sync(reader.check_unchanged, limiter=self._limiter)
                except BaseException:
                    buf.release()
                    raise
            if offset + n <= self._skip and not last:
                buf.release()
            else:
                chunk = Chunk(offset=offset, data=buf.view[:n], digests=digests, last=last,
                              part_number=number if self._parts else 0,
                              total=(offset + n) if last else total)
                await send.send((chunk, buf))
            offset += n
            if last:
                return

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._last is not None:
            self._last.release()
            self._last = None
        try:
            got = await self._recv.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        if isinstance(got, Exception):
            raise got
        chunk, self._last = got
        return chunk

    def detach(self, chunk: Chunk) -> Buffer:
        """Take ownership of the current chunk's buffer (the caller must ``release()`` it)."""
        buf, self._last = self._last, None
        assert buf is not None
        return buf


class FileSource:
    """A whole file (or a range) as a streamed ByteSource, hashed in the same pass.

    Iterate once; each yielded view is valid until the next one is requested. Blocks are read and
    hashed in a worker thread on demand (no background task, so a body writer can drive it safely);
    concurrency comes from the many streams in flight. ``digests`` holds the hex digests once iteration
    finished; SourceChangedError is raised at the end if the file changed while it was read.
    """

    def __init__(self, item: Item, *, offset: int = 0, length: int | None = None,
                 digests: tuple[str, ...] = ("md5",), block: int = 1 << 20,
                 limiter: anyio.CapacityLimiter | None = None, pool: BufferPool | None = None,
                 on_bytes: Callable[[int], Any] | None = None,
                 throttle: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.item = item
        self.offset = offset
        self.size: int | None = (item.size - offset) if length is None else length
        self.digests: dict[str, str] = {}
        self._algos = digests
        self._block = block
        self._limiter = limiter or anyio.CapacityLimiter(4)
        self._pool = pool or BufferPool(block)
        self._on_bytes = on_bytes
        self._throttle = throttle
        self._reader: RawReader | None = None
        self._hasher: MultiHash | None = None
        self._buf: Buffer | None = None
        self._done = False
        self._ended = False

    def __aiter__(self) -> FileSource:
        if self._hasher is not None:
            raise RuntimeError("a FileSource can be iterated only once")
        self._hasher = MultiHash(self._algos)
        return self

    def _step(self, view: memoryview) -> int:
        """One worker-thread call per block: open the file (first block), read and hash the block, and at
        the end of the range check that the file did not change, take the digests and close it. A file of
        one block costs one thread hop (it took four: open, read, check, close)."""
        reader = self._reader
        if reader is None:
            reader = self._reader = RawReader(self.item, self.offset, self.size, self._hasher)
        try:
            n = reader.readinto(view)
            if reader.pos >= reader.end:
                # finish before handing over the last block: a server may answer as soon as it has every
                # byte, and the body writer is then cancelled without asking for more
                reader.check_unchanged()
                assert self._hasher is not None
                self.digests = self._hasher.hexdigests()
                self._ended = True
                self._reader = None
                reader.close()
        except BaseException:
            self._reader = None
            reader.close()
            raise
        return n

    async def __anext__(self) -> memoryview:
        if self._done or self._ended:
            await self.aclose()
            raise StopAsyncIteration
        if self._buf is None:
            self._buf = await self._pool.acquire(self._block)
        buf = self._buf
        try:
            n = await anyio.to_thread.run_sync(self._step, buf.view[: buf.size], limiter=self._limiter)
        except BaseException:
            await self.aclose()
            raise
        if n == 0:  # an empty range: nothing to hand over
            await self.aclose()
            raise StopAsyncIteration
        if self._throttle is not None:
            await self._throttle(n)
        if self._on_bytes is not None:
            self._on_bytes(n)
        return buf.view[:n]

    async def aclose(self) -> None:
        """Release the buffer and the file (idempotent)."""
        self._done = True
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await anyio.to_thread.run_sync(reader.close)
