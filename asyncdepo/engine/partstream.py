"""The hashing pass of streamed multipart (``Features.part_streams``): the file read once, in order, a few
parts ahead of the sends, each part's digests computed before its request starts.

Why two reads instead of one buffer per part: a part held in memory from its read until its response
costs ``transfers x part size`` of RAM (8 x 16 MiB parts: 128 MiB, and twice that with read-ahead), while
a part read again when it is sent costs one more read from the page cache (~15 GB/s, about 0.07 core-
seconds per GB) and one block buffer per request. Reading the part twice is what rclone does for the
checksums it must send before the body; it also lets a checksum go in a header (S3 validates it against
what it receives), so no aws-chunked framing or trailer is needed, and Content-MD5 stays possible.

The pass feeds the item's whole-file hasher in file order, so whole-file digests (xxh3, md5 for ``--hash``)
are computed in the same read; CRCs that are both whole-file and per part are composed from the parts
(``MultiHash(composed=...)``), so each byte goes through each digest once. One worker-thread call per part
reads and hashes it in ``block``-sized pieces into one reserved buffer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from asyncdepo.contract import Item, Part
from asyncdepo.digests import MultiHash
from asyncdepo.engine.pipeline import BufferPool, RawReader


async def hash_parts(item: Item, part_size: int, hasher: MultiHash, algos: tuple[str, ...], *,
                     pool: BufferPool, limiter: anyio.CapacityLimiter, block: int,
                     on_part: Callable[[Part], Awaitable[None]]) -> None:
    """Read ``item`` in order; per part, feed ``hasher`` (whole-file), compute the part's ``algos`` digests,
    compose the composed digests, then ``await on_part(part)`` (which may wait: that is the backpressure).

    :raises SourceError | SourceChangedError: the file vanished, shrank, or changed size/mtime (checked
        after the last part).
    """
    block = max(1, min(block, part_size))
    buf = await pool.acquire(block)
    reader: RawReader | None = None
    try:
        reader = await anyio.to_thread.run_sync(RawReader, item, 0, None, None, limiter=limiter)
        offset, number = 0, 0
        while offset < item.size or number == 0:
            number += 1
            size = min(part_size, item.size - offset)
            last = offset + size >= item.size

            def work(r: RawReader = reader, size: int = size, last: bool = last) -> dict[str, str]:
                piece = MultiHash(algos)
                left = size
                while left:
                    n = r.readinto(buf.view[: min(block, left)])  # SourceChangedError on an early EOF
                    view = buf.view[:n]
                    piece.update(view)
                    hasher.update(view)
                    left -= n
                if last:
                    r.check_unchanged()
                return piece.hexdigests()

            digests = await anyio.to_thread.run_sync(work, limiter=limiter)
            hasher.add_piece(digests, size)
            await on_part(Part(number=number, offset=offset, size=size, digests=digests, last=last))
            offset += size
            if last:
                return
    finally:
        buf.release()
        if reader is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(reader.close)
