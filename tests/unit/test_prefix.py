"""The source's prefix checked against the journal's chunk digests on a resume (engine/prefix.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from asyncdepo.contract import Item
from asyncdepo.digests import MultiHash, digest_bytes
from asyncdepo.engine.journal import ChunkRecord
from asyncdepo.engine.pipeline import BufferPool
from asyncdepo.engine.prefix import PrefixChangedError, hash_prefix
from asyncdepo.errors import SourceChangedError

CHUNK = 1000


def _rows(data: bytes, stop: int, *, skip: tuple[int, ...] = ()) -> list[ChunkRecord]:
    """The journal's record of the chunks of ``data`` below ``stop`` (chunk numbers in ``skip`` left out)."""
    return [(off, CHUNK, digest_bytes(data[off:off + CHUNK], ("xxh3",))["xxh3"])
            for i, off in enumerate(range(0, stop - CHUNK + 1, CHUNK)) if i not in skip]


async def _batches(rows: list[ChunkRecord], size: int = 2) -> AsyncIterator[list[ChunkRecord]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


async def _prefix(path: Path, stop: int, rows: list[ChunkRecord]) -> dict[str, str]:
    st = path.stat()
    item = Item(str(path), "f", st.st_size, st.st_mtime_ns)
    hasher = MultiHash(("md5",))
    await hash_prefix(item, stop, hasher, _batches(rows), "xxh3", pool=BufferPool(1 << 20),
                      limiter=anyio.CapacityLimiter(1), block=300)  # blocks that straddle chunks
    return hasher.hexdigests()


@pytest.mark.parametrize("skip", [(), (1,), (4,)])  # every chunk journaled; a gap; the last one missing
async def test_an_unchanged_prefix_is_fed_whole_to_the_hasher(tmp_path: Path, skip: tuple[int, ...]) -> None:
    data = os.urandom(10 * CHUNK + 17)
    (tmp_path / "f").write_bytes(data)
    stop = 5 * CHUNK + 123  # the target holds part of a sixth chunk, which has no journaled digest
    got = await _prefix(tmp_path / "f", stop, _rows(data, stop, skip=skip))
    assert got == digest_bytes(data[:stop], ("md5",))


async def test_a_rewritten_chunk_of_the_prefix_is_found(tmp_path: Path) -> None:
    old = os.urandom(10 * CHUNK)
    new = old[:3 * CHUNK + 5] + bytes([old[3 * CHUNK + 5] ^ 1]) + old[3 * CHUNK + 6:]  # one bit, same size
    (tmp_path / "f").write_bytes(new)
    with pytest.raises(PrefixChangedError, match=f"bytes {3 * CHUNK}-{4 * CHUNK} differ"):
        await _prefix(tmp_path / "f", 6 * CHUNK, _rows(old, 6 * CHUNK))
    # a change past what the target holds is not the prefix's business
    assert await _prefix(tmp_path / "f", 3 * CHUNK, _rows(old, 3 * CHUNK)) == digest_bytes(new[:3 * CHUNK],
                                                                                          ("md5",))


async def test_a_source_shorter_than_the_prefix_is_a_changed_source(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    (tmp_path / "f").write_bytes(data[:2 * CHUNK])
    with pytest.raises(SourceChangedError):
        await _prefix(tmp_path / "f", 4 * CHUNK, [])
