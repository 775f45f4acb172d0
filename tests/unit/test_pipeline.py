"""Pipeline pieces: chunked reads with digests, zstd, tar streams, the journal's batching, the walk."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import anyio
import pytest
import zstandard

from asyncdepo.contract import Item
from asyncdepo.digests import MultiHash
from asyncdepo.engine.compress import TarSource
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.pipeline import BufferPool, ChunkStream, FileSource, RawReader, ZstdReader
from asyncdepo.engine.source import iter_items
from asyncdepo.errors import SourceChangedError


def _item(p: Path, rel: str = "x") -> Item:
    st = p.stat()
    return Item(str(p), rel, st.st_size, st.st_mtime_ns)


async def test_chunks_cover_the_file_with_correct_digests(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(5 * 1000 * 1000 + 7)
    p.write_bytes(data)
    item = _item(p)
    hasher = MultiHash(("md5", "sha256"))
    pool = BufferPool(3 << 20)
    got = bytearray()
    async with ChunkStream(lambda: RawReader(item, 0, None, hasher), pool=pool, chunk_size=1 << 20,
                           read_ahead=1, chunk_digests=("sha1",), limiter=anyio.CapacityLimiter(2),
                           total=item.size) as stream:
        async for chunk in stream:
            assert chunk.offset == len(got)
            assert chunk.digests["sha1"] == hashlib.sha1(chunk.data).hexdigest()
            got += chunk.data
            assert pool.used <= pool.capacity
    assert bytes(got) == data
    assert chunk.last
    assert hasher.hexdigests() == {"md5": hashlib.md5(data).hexdigest(),
                                   "sha256": hashlib.sha256(data).hexdigest()}
    assert pool.used == 0


async def test_compressed_chunks_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = (b"\x00\x01" * 3_000_000) + os.urandom(1000)
    p.write_bytes(data)
    item = _item(p)
    out = bytearray()
    async with ChunkStream(lambda: ZstdReader(RawReader(item), 3, 2), pool=BufferPool(2 << 20),
                           chunk_size=1 << 20, read_ahead=1, chunk_digests=(),
                           limiter=anyio.CapacityLimiter(2)) as stream:
        async for chunk in stream:
            out += chunk.data
    assert zstandard.ZstdDecompressor().decompressobj().decompress(bytes(out)) == data


async def test_file_that_grows_while_read_is_detected(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(3 << 20))
    item = _item(p)
    src = FileSource(item, block=1 << 20)
    with pytest.raises(SourceChangedError, match="changed while"):
        async for i, _ in _enumerate(src):
            if i == 0:
                with open(p, "ab") as fh:
                    fh.write(b"more")


async def _enumerate(src):  # type: ignore[no-untyped-def]
    i = 0
    async for block in src:
        yield i, block
        i += 1


async def test_tar_source_is_a_valid_deterministic_tar(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.img").write_bytes(os.urandom(5000))
    (root / "two.txt").write_text("hello")
    items = sorted(iter_items(root), key=lambda i: i.rel)
    blobs = []
    for _ in range(2):
        src = TarSource(items, prefix="ds", compress="zstd", level=3)
        out = bytearray()
        async for block in src:
            out += block
        blobs.append(bytes(out))
    assert blobs[0] == blobs[1]
    inner = zstandard.ZstdDecompressor().decompressobj().decompress(blobs[0])
    assert hashlib.md5(inner).hexdigest() == src.inner_digests["md5"]
    assert len(inner) == src.inner_size
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        names = sorted(tf.getnames())
        assert names == ["ds/a/one.img", "ds/two.txt"]
        member = tf.extractfile("ds/two.txt")
        assert member is not None and member.read() == b"hello"


async def test_journal_batches_commits(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path / "j.sqlite")
    jid, existed = await j.open_job("push", "/src", "tus://x")
    assert not existed
    for i in range(10_000):
        await j.record(jid, f"f{i}", size=i, mtime_ns=1, state="done")
    await j.flush()
    # 10,000 rows cost about 10000/512 commits, not 10,000
    assert j.commits <= 25
    st = await j.status(jid)
    assert st["counts"]["done"]["files"] == 10_000
    assert (tmp_path / "j.sqlite").stat().st_mode & 0o777 == 0o600
    await j.close()
    j2 = await Journal.open(tmp_path / "j.sqlite")
    assert (await j2.open_job("push", "/src", "tus://x")) == (jid, True)
    rows = await j2.lookup(jid, ["f5", "nope"])
    assert rows["f5"]["size"] == 5 and "nope" not in rows
    await j2.close()


def test_walk_filters_and_skips_special_files(tmp_path: Path) -> None:
    root = tmp_path / "w"
    (root / "sub").mkdir(parents=True)
    (root / "keep.cbf").write_bytes(b"x")
    (root / "sub" / "skip.tmp").write_bytes(b"y")
    (root / "sub" / "keep2.cbf").write_bytes(b"z")
    os.mkfifo(root / "pipe")
    os.symlink(root / "keep.cbf", root / "link.cbf")
    skipped: list[tuple[str, str]] = []
    items = list(iter_items(root, include=("*.cbf",), on_skip=lambda r, w: skipped.append((r, w))))
    assert sorted(i.rel for i in items) == ["keep.cbf", "sub/keep2.cbf"]
    reasons = dict(skipped)
    assert "symbolic link" in reasons["link.cbf"] and "not a regular file" in reasons["pipe"]
    followed = list(iter_items(root, exclude=("*.tmp",), follow_symlinks=True))
    assert sorted(i.rel for i in followed) == ["keep.cbf", "link.cbf", "sub/keep2.cbf"]


def test_prehash_groups_keep_every_item_once_in_order_within_the_bound() -> None:
    from asyncdepo.engine.prehash import PREHASH_GROUP, _groups

    sizes = [0, 1, PREHASH_GROUP - 1, 5, PREHASH_GROUP * 3, 1 << 20, *([1 << 20] * 20), 0]
    items = [Item(f"/x/{i}", str(i), size, 0) for i, size in enumerate(sizes)]
    groups = _groups(items)
    assert [i for g in groups for i in g] == items
    assert all(g for g in groups)
    for g in groups:
        assert len(g) == 1 or sum(i.size for i in g) <= PREHASH_GROUP
    assert [i.size for i in groups[2]] == [PREHASH_GROUP * 3]  # a large file alone
    assert _groups([]) == []
