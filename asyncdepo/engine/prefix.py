"""Resuming an item the target holds in part: the source's prefix is checked against the journal before
anything is built on it.

The journal keeps a digest (``transfer.CHUNK_DIGEST``) of every chunk a target confirmed. On a resume the
target's copy is checked against those digests (``ChunkWriter.verify``), and so is the source: a file
rewritten at the same size with its mtime put back looks unchanged to the walk, yet the bytes the target
holds are the old ones. Building the rest of the new file on them would give a file that is neither version,
and a target that checks only what it receives (tus, a local part file) would accept it.

The check costs nothing extra in reads: the resume reads the prefix anyway, to feed the whole-file hasher
(the digests complete() checks). Each journaled chunk of the prefix is hashed once more with the chunk
digest as it is read: xxh3 runs at several GB/s, so a resumed 16 GiB prefix costs a few seconds of one core
on top of the read.

A compressed stream (``--compress``) is re-made from the start on a resume and its chunks the target holds
are not sent again: each is compared with the journal as it passes (:class:`Journaled`), which also catches a
compressor that did not make the same bytes again.

The digest of each chunk of a multi-chunk item is committed to the journal before the chunk is sent, so a
chunk the target holds only in part (the one in flight when a run was killed or a connection dropped) is
checked too: the source's bytes of the whole chunk are compared with its digest (:func:`check_cut_chunk`),
and the part the target holds is journaled as a chunk of its own (the cut chunk's row goes: it is sent again
from the cut), so the next resume checks those bytes like any other. A
file that fits in one request and is held in part is sent again whole (no digest is journaled for a part of
a request). Without ``--compress``; a compressed stream's chunk held in part is checked by size and mtime.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio

from asyncdepo.contract import Item
from asyncdepo.digests import MultiHash
from asyncdepo.engine.journal import ChunkRecord
from asyncdepo.engine.pipeline import Buffer, BufferPool, RawReader
from asyncdepo.errors import SourceChangedError, SourceError


class PrefixChangedError(SourceChangedError):
    """A chunk of the source that the target confirmed in an earlier attempt now holds other bytes than the
    journal recorded: what the target holds must be discarded and the item sent again from zero."""


async def hash_prefix(item: Item, stop: int, hasher: MultiHash, rows: AsyncIterator[list[ChunkRecord]],
                      algo: str, *, pool: BufferPool, limiter: anyio.CapacityLimiter, block: int) -> None:
    """Feed ``[0, stop)`` of ``item`` to ``hasher`` (what the target already holds), and compare every
    journaled chunk inside it (``rows``: ``(offset, length, hex algo digest)`` in offset order, in batches)
    with the source's bytes, in the same read.

    :raises PrefixChangedError: a journaled chunk differs from the source's bytes.
    :raises SourceChangedError: the file is gone or shorter than ``stop``.
    :raises SourceError: it cannot be read.
    """
    if stop <= 0:
        return
    buf = await pool.acquire(block)
    reader: RawReader | None = None
    try:
        reader = await anyio.to_thread.run_sync(RawReader, item, 0, stop, hasher, limiter=limiter)
        async for batch in rows:
            bad = await anyio.to_thread.run_sync(_check, reader, batch, buf, algo, limiter=limiter)
            if bad is not None:
                offset, length = bad
                raise PrefixChangedError(
                    f"{item.rel}: bytes {offset}-{offset + length} differ from what an earlier run sent "
                    f"(the file was rewritten, though its size and mtime are unchanged); what the target "
                    f"holds is discarded and the file is sent again from the start")
            if reader.pos >= stop:
                break
        await anyio.to_thread.run_sync(_feed, reader, stop, buf, None, limiter=limiter)
    finally:
        buf.release()
        if reader is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(reader.close)


class Journaled:
    """The journal's chunk digests of an item, looked up in offset order (batches read as needed)."""

    def __init__(self, rows: AsyncIterator[list[ChunkRecord]]) -> None:
        self._rows = rows
        self._batch: list[ChunkRecord] = []
        self._done = False

    async def digest_at(self, offset: int, length: int) -> str | None:
        """The journaled digest of ``[offset, offset + length)``, or None when none was journaled for it.
        Calls must come in increasing ``offset``."""
        while not self._done:
            while self._batch and self._batch[0][0] < offset:
                self._batch.pop(0)
            if self._batch:
                off, n, digest = self._batch[0]
                return digest if (off, n) == (offset, length) else None
            try:
                self._batch = list(await self._rows.__anext__())
            except StopAsyncIteration:
                self._done = True
        return None

    def check(self, rel: str, offset: int, length: int, want: str | None, got: str) -> None:
        """:raises PrefixChangedError: ``got`` is not the journaled ``want``."""
        if want is not None and want != got:
            raise PrefixChangedError(
                f"{rel}: the stream's bytes {offset}-{offset + length} differ from what an earlier run sent (the "
                f"file was rewritten, though its size and mtime are unchanged); what the target holds is "
                f"discarded and the file is sent again from the start")


def _feed(reader: RawReader, stop: int, buf: Buffer, piece: MultiHash | None) -> None:
    """Blocking: read up to ``stop`` (``reader`` feeds the whole-file hasher), also into ``piece``."""
    while reader.pos < stop:
        n = reader.readinto(buf.view[: min(buf.size, stop - reader.pos)])
        if piece is not None:
            piece.update(buf.view[:n])


def _check(reader: RawReader, batch: list[ChunkRecord], buf: Buffer, algo: str) -> tuple[int, int] | None:
    """Blocking: read through the batch's chunks (gaps between them only feed the whole-file hasher);
    returns the first chunk whose digest differs, or None."""
    for offset, length, digest in batch:
        if offset < reader.pos:
            continue  # overlaps what was read already (not written so by the engine): nothing to compare
        if offset + length > reader.end:
            break  # past what the target holds (verify forgets those rows; a guard all the same)
        _feed(reader, offset, buf, None)
        piece = MultiHash((algo,))
        _feed(reader, offset + length, buf, piece)
        if piece.hexdigests()[algo] != digest:
            return offset, length
    return None


async def check_cut_chunk(item: Item, stop: int, rows: AsyncIterator[list[ChunkRecord]], algo: str, *,
                          limiter: anyio.CapacityLimiter) -> ChunkRecord | None:
    """Compare the journaled chunk that ``stop`` (where the target's copy ends) cuts, if any, with the
    source's bytes of the whole chunk: the target holds the start of it, sent from the source as it was.

    Returns the record of the part the target holds, ``(offset, stop - offset, digest)`` of the source's bytes
    there, now known to be what was sent (None when ``stop`` cuts no journaled chunk). The caller journals it
    in place of the cut chunk's row, which it forgets (that chunk is sent again from ``stop``): without it the
    held bytes would have no digest, and a later resume could not tell that the source changed under them.

    :raises PrefixChangedError: the source's bytes there differ, or the file no longer holds the chunk.
    :raises SourceError: it cannot be read.
    """
    cut: ChunkRecord | None = None
    async for batch in rows:
        for offset, length, digest in batch:
            if offset < stop < offset + length:
                cut = (offset, length, digest)
    if cut is None:
        return None
    offset, length, digest = cut

    def held() -> str | None:
        """The digest of the source's bytes the target holds, or None when the whole chunk differs."""
        try:
            with open(item.path, "rb", buffering=0) as f:
                data = os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SourceError(f"{item.rel}: cannot read: {exc.strerror or type(exc).__name__}") from exc
        whole, part = MultiHash((algo,)), MultiHash((algo,))
        whole.update(data)
        part.update(data[:stop - offset])
        return part.hexdigests()[algo] if len(data) == length and whole.hexdigests()[algo] == digest else None

    part = await anyio.to_thread.run_sync(held, limiter=limiter)
    if part is None:
        raise PrefixChangedError(f"{item.rel}: bytes {offset}-{offset + length} differ from what an earlier run "
                                 "began to send (the file was rewritten, though its size and mtime are "
                                 "unchanged); what the target holds is discarded and the file is sent again "
                                 "from the start")
    return offset, stop - offset, part
