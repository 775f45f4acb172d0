"""The ``file:///DIR`` adapter: part files, resume after a crash, atomic appearance, path safety."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from asyncdepo.adapters import lookup
from asyncdepo.adapters.local import PART_SUFFIX, LocalAdapter
from asyncdepo.contract import Chunk, Item
from asyncdepo.errors import IntegrityError, OffsetMismatchError, PermanentError, UsageError
from asyncdepo.transport.partfiles import part_path
from tests.adapters.contract_suite import AdapterContract, Harness, tree_of


def make_item(tmp_path: Path, rel: str, data: bytes) -> Item:
    src = tmp_path / "src" / rel
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(data)
    st = src.stat()
    return Item(path=str(src), rel=rel, size=st.st_size, mtime_ns=st.st_mtime_ns)


def chunks(data: bytes, size: int) -> list[Chunk]:
    out = []
    for off in range(0, len(data), size):
        piece = data[off : off + size]
        out.append(Chunk(off, memoryview(piece), {}, last=off + size >= len(data), total=len(data)))
    return out


def digests(data: bytes) -> dict[str, str]:
    return {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}


async def test_registered_and_full_write(tmp_path: Path) -> None:
    assert lookup("file") is LocalAdapter
    dest = tmp_path / "dest"
    data = os.urandom(5000)
    item = make_item(tmp_path, "d/e/f.bin", data)
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        writer = await adapter.open_item(item, None)
        assert writer.confirmed == 0
        part = dest / "d" / "e" / ("f.bin" + PART_SUFFIX)
        assert part.exists() and (part.stat().st_mode & 0o777) == 0o644 & ~_umask()
        for c in chunks(data, 2048):
            await writer.write(c)
        assert not (dest / "d/e/f.bin").exists()  # appears only when complete
        result = await writer.complete(digests(data), len(data))
    assert result == {"path": "d/e/f.bin", "size": 5000}
    assert (dest / "d/e/f.bin").read_bytes() == data
    assert not part.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_partial_then_reopen_resumes(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    data = os.urandom(10_000)
    item = make_item(tmp_path, "big.bin", data)
    adapter = LocalAdapter(f"file://{dest}", None)
    async with adapter:
        writer = await adapter.open_item(item, None)
        parts = chunks(data, 3000)
        await writer.write(parts[0])
        await writer.write(parts[1])
        saved = writer.state()  # what the journal holds; then the process "crashes"
    async with LocalAdapter(f"file://{dest}", None) as again:
        writer = await again.open_item(item, saved)
        assert writer.confirmed == 6000
        with pytest.raises(OffsetMismatchError):
            await writer.write(parts[3])  # a gap is refused
        await writer.write(parts[1])  # idempotent resend of a confirmed chunk
        for c in parts[2:]:
            await writer.write(c)
        await writer.complete(digests(data), len(data))  # resumed: the whole file is re-hashed
    assert (dest / "big.bin").read_bytes() == data


async def test_resumed_corrupt_prefix_is_caught(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    data = os.urandom(4000)
    item = make_item(tmp_path, "x.bin", data)
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(chunks(data, 2000)[0])
        saved = writer.state()
        (dest / ("x.bin" + PART_SUFFIX)).write_bytes(b"\0" * 2000)  # the prefix on disk went bad
        writer = await adapter.open_item(item, saved)
        await writer.write(chunks(data, 2000)[1])
        with pytest.raises(IntegrityError):
            await writer.complete(digests(data), len(data))
    assert not (dest / "x.bin").exists()


async def test_untrusted_part_file_restarts(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / ("y.bin" + PART_SUFFIX)).write_bytes(b"stale bytes of another version")
    item = make_item(tmp_path, "y.bin", b"fresh")
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        writer = await adapter.open_item(item, None)  # no journal state: the part file is not trusted
        assert writer.confirmed == 0
        stale = {"size": item.size, "mtime_ns": item.mtime_ns - 1, "confirmed": 3}
        writer = await adapter.open_item(item, stale)  # the source changed since
        assert writer.confirmed == 0
        await writer.write(Chunk(0, memoryview(b"fresh"), {}, last=True))
        with pytest.raises(IntegrityError):
            await writer.complete({}, 6)  # a size mismatch is an error, never a warning
        await writer.complete({}, 5)
    assert (dest / "y.bin").read_bytes() == b"fresh"


async def test_abort_removes_part_and_empty_file(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    item = make_item(tmp_path, "a.bin", b"abc")
    empty = make_item(tmp_path, "empty", b"")
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(Chunk(0, memoryview(b"ab"), {}, last=False))
        await writer.abort()
        await writer.abort()  # twice is fine
        assert list(dest.iterdir()) == []
        w2 = await adapter.open_item(empty, None)
        await w2.complete(digests(b""), 0)
    assert (dest / "empty").read_bytes() == b""


async def test_a_255_byte_name_is_written_through_a_shorter_part_and_resumed(tmp_path: Path) -> None:
    """A name as long as Linux allows: its part file has a hashed name that fits, in the same folder, ending in
    the suffix; a resume finds it again, a pull's listing skips it, and ``discard`` removes it."""
    dest = tmp_path / "dest"
    rel = "d/" + "é" * 120 + "L" * 11 + ".bin"  # 255 bytes, a character of two bytes where the name is cut
    assert len(os.fsencode(rel.split("/")[1])) == 255
    data = os.urandom(10_000)
    item = make_item(tmp_path, rel, data)
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(chunks(data, 4000)[0])
        saved = writer.state()
        part = part_path(dest / rel)
        assert [p.name for p in (dest / "d").iterdir()] == [part.name]
        assert part.name.endswith(PART_SUFFIX) and len(os.fsencode(part.name)) <= 255
        assert part.name.encode().decode() == part.name  # cut on a character boundary: still UTF-8
        assert [r.rel async for r in adapter.list_remote()] == []  # a part is never listed as a file
        writer = await adapter.open_item(item, saved)
        assert writer.confirmed == 4000  # found again
        await adapter.discard(rel, saved)
        assert not part.exists()
        writer = await adapter.open_item(item, None)
        for c in chunks(data, 4000):
            await writer.write(c)
        await writer.complete(digests(data), len(data))
    assert (dest / rel).read_bytes() == data
    assert [p.name for p in (dest / "d").iterdir()] == [rel.split("/")[1]]


def test_part_names_of_long_names_differ_by_their_hash() -> None:
    a, b = "x" * 250 + "a.bin", "x" * 250 + "b.bin"
    assert part_path(Path(a)) != part_path(Path(b))
    assert part_path(Path(a)) == part_path(Path(a))  # derived, never stored
    assert part_path(Path("short.bin")).name == "short.bin" + PART_SUFFIX


async def test_a_name_the_file_system_refuses_fails_at_once(tmp_path: Path) -> None:
    """ENAMETOOLONG (a folder name longer than a name may be) cannot pass by trying again: permanent."""
    item = Item(path=str(tmp_path / "src"), rel="L" * 300 + "/f.bin", size=3, mtime_ns=0)
    async with LocalAdapter(f"file://{tmp_path / 'dest'}", None) as adapter:
        with pytest.raises(PermanentError, match="too long"):
            await adapter.open_item(item, None)


@pytest.mark.parametrize("rel", ["../escape.bin", "a/../../b", "/etc/passwd", ""])
async def test_path_escape_refused(tmp_path: Path, rel: str) -> None:
    dest = tmp_path / "dest"
    item = Item(path=str(tmp_path / "x"), rel=rel, size=1, mtime_ns=0)
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        with pytest.raises(UsageError):
            await adapter.open_item(item, None)
    assert not (tmp_path / "escape.bin").exists() and not (tmp_path / "b").exists()


def test_bad_urls() -> None:
    for url in ("file://otherhost/dir", "http://x/y", "file://"):
        with pytest.raises(UsageError):
            LocalAdapter(url, None)
    assert LocalAdapter("file:///tmp/some%20dir", None).describe() == "file:///tmp/some dir"


async def test_pull_lists_and_reads(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "s").mkdir(parents=True)
    (dest / "s" / "one").write_bytes(b"1" * 10)
    (dest / "two").write_bytes(b"22")
    (dest / ("three" + PART_SUFFIX)).write_bytes(b"partial")
    async with LocalAdapter(f"file://{dest}", None) as adapter:
        found = {r.rel: r async for r in adapter.list_remote()}
        assert {k: v.size for k, v in found.items()} == {"s/one": 10, "two": 2}
        got = b"".join([b async for b in adapter.read(found["s/one"], 4)])
    assert got == b"1" * 6


class TestContract(AdapterContract):
    """The shared contract suite (tests/adapters/contract_suite.py) over ``file://``."""

    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        out = tmp_path / "out"
        return Harness(lambda cfg: LocalAdapter(f"file://{out}", cfg), lambda: tree_of(out) if out.exists() else {})


async def test_a_255_byte_name_is_pulled_and_its_part_resumed(tmp_path: Path) -> None:
    """A pull writes a 255-byte name through the same short part name, and a later pull continues a part an
    interrupted one left (the prefix is kept and re-hashed, the rest fetched; no part is left)."""
    from asyncdepo import EngineConfig
    from asyncdepo.engine.pull import pull

    name = "P" * 251 + ".bin"
    data = os.urandom(300_000)
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / name).write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    part_path(out / name).write_bytes(data[:100_000])  # what an interrupted pull left
    report = await pull(LocalAdapter(f"file://{tmp_path / 'archive'}"), out, EngineConfig(),
                        journal_path=tmp_path / "journal.sqlite")
    assert report.ok, report.failures
    assert sorted(p.name for p in out.iterdir()) == [name]
    assert (out / name).read_bytes() == data
