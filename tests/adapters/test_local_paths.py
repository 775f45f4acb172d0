"""The ``file:///DIR`` adapter's failure paths on a real file system: a full disk (a small tmpfs), a file
system gone read-only under a running job, part files removed or replaced between runs, a target directory or
a pulled file that vanished. Each test checks the error class and its message naming the file, and what is
on disk afterwards (the part file kept for the resume, the file whole once the fault is gone)."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from asyncdepo.adapters.local import PART_SUFFIX, LocalAdapter
from asyncdepo.cli import main as cli_main
from asyncdepo.contract import RemoteItem
from asyncdepo.digests import digest_bytes
from asyncdepo.errors import DiskFullError, PermanentError, SourceError, TransientError, UsageError
from tests.adapters.test_local_adapter import chunks, digests, make_item
from tests.tmpfs import remount, small_tmpfs

KiB = 1 << 10


class Disk:
    """A small tmpfs mounted at ``path``; ``remount("ro")``, ``remount("size=4m")`` change it under a job."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def remount(self, options: str) -> None:
        remount(self.path, options)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    """A 1 MiB tmpfs (the tests run as root; elsewhere they cannot make a small disk and fail, loudly)."""
    with small_tmpfs(tmp_path / "disk", "1m") as path:
        yield Disk(path)


def journaled(data: bytes, size: int) -> list[tuple[int, int, str]]:
    """The journal's record of ``data``'s chunks: (offset, length, xxh3), as the engine keeps it."""
    return [(off, len(data[off : off + size]), digest_bytes(data[off : off + size], ("xxh3",))["xxh3"])
            for off in range(0, len(data), size)]


async def batches(rows: list[tuple[int, int, str]]) -> AsyncIterator[list[tuple[int, int, str]]]:
    yield rows


async def test_a_full_disk_keeps_the_part_file_and_the_write_resumes_once_space_is_freed(
    disk: Disk, tmp_path: Path
) -> None:
    data = os.urandom(1536 * KiB)
    item = make_item(tmp_path, "big.bin", data)
    async with LocalAdapter(f"file://{disk.path}") as adapter:
        writer = await adapter.open_item(item, None)
        with pytest.raises(DiskFullError) as info:
            for c in chunks(data, 256 * KiB):
                await writer.write(c)
        assert str(info.value).startswith(f"write big.bin{PART_SUFFIX}: No space left on device")
        assert info.value.free is not None and info.value.free < 256 * KiB
        saved = writer.state()
        part = disk.path / f"big.bin{PART_SUFFIX}"
        assert 0 < saved["confirmed"] < len(data)
        assert part.read_bytes()[: saved["confirmed"]] == data[: saved["confirmed"]]
        assert not (disk.path / "big.bin").exists()

        disk.remount("size=4m")  # space freed: the same item resumes from its part file
        again = await adapter.open_item(item, saved)
        assert again.confirmed >= saved["confirmed"]
        assert await again.verify(batches(journaled(data[: saved["confirmed"]], 256 * KiB)), "xxh3") \
            == saved["confirmed"]
        for c in chunks(data, 256 * KiB)[saved["confirmed"] // (256 * KiB):]:
            await again.write(c)
        assert await again.complete(digests(data), len(data)) == {"path": "big.bin", "size": len(data)}
    assert (disk.path / "big.bin").read_bytes() == data and not part.exists()


async def test_a_file_system_gone_read_only_refuses_for_good_and_keeps_the_part(
    disk: Disk, tmp_path: Path
) -> None:
    data = os.urandom(96 * KiB)
    item = make_item(tmp_path, "d/ro.bin", data)
    part = disk.path / "d" / f"ro.bin{PART_SUFFIX}"
    async with LocalAdapter(f"file://{disk.path}") as adapter:
        writer = await adapter.open_item(item, None)
        for c in chunks(data, 32 * KiB):
            await writer.write(c)
        disk.remount("ro")
        try:
            with pytest.raises(PermanentError) as info:
                await writer.complete(digests(data), len(data))
            assert str(info.value) == "finish d/ro.bin: Read-only file system"
            await writer.abort()  # a cleanup path: the refusal is not raised, the part file stays
            with pytest.raises(PermanentError) as info:
                await adapter.discard("d/ro.bin", writer.state())
            assert str(info.value) == f"remove d/ro.bin{PART_SUFFIX}: Read-only file system"
            # a digest this build cannot compute: nothing can be trusted, so the part file must be emptied
            with pytest.raises(PermanentError) as info:
                await writer.verify(batches(journaled(data, 32 * KiB)), "no-such-digest")
            assert str(info.value) == f"truncate d/ro.bin{PART_SUFFIX}: Read-only file system"
            with pytest.raises(UsageError) as usage:
                async with LocalAdapter(f"file://{disk.path}/new/dir"):
                    pass
            assert str(usage.value) == f"cannot use {disk.path}/new/dir as a target: Read-only file system"
            assert part.read_bytes() == data and not (disk.path / "d" / "ro.bin").exists()
        finally:
            disk.remount("rw")
        assert await writer.complete(digests(data), len(data)) == {"path": "d/ro.bin", "size": len(data)}
    assert (disk.path / "d" / "ro.bin").read_bytes() == data and not part.exists()


async def test_a_part_file_removed_between_reopen_and_verify_restarts_the_item(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    data = os.urandom(80 * KiB)
    item = make_item(tmp_path, "gone.bin", data)
    part = dest / f"gone.bin{PART_SUFFIX}"
    async with LocalAdapter(f"file://{dest}") as adapter:
        writer = await adapter.open_item(item, None)
        for c in chunks(data, 16 * KiB)[:3]:
            await writer.write(c)
        saved = writer.state()
        again = await adapter.open_item(item, saved)
        assert again.confirmed == 48 * KiB and again.resumed
        part.unlink()  # another process cleaned up the target between the reopen and the check
        with pytest.raises(TransientError) as info:
            await again.verify(batches(journaled(data[: 48 * KiB], 16 * KiB)), "xxh3")
        assert str(info.value) == f"verify gone.bin{PART_SUFFIX}: No such file or directory"
        with pytest.raises(TransientError) as info:
            await again.resync()
        assert str(info.value) == f"stat gone.bin{PART_SUFFIX}: No such file or directory"
        third = await adapter.open_item(item, saved)  # the retry: an empty part file, from zero
        assert third.confirmed == 0 and await third.resync() == 0
        for c in chunks(data, 16 * KiB):
            await third.write(c)
        assert await third.resync() == len(data)
        await third.complete(digests(data), len(data))
    assert (dest / "gone.bin").read_bytes() == data


async def test_a_part_file_replaced_by_a_folder_fails_the_item_without_retries(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    data = os.urandom(40 * KiB)
    item = make_item(tmp_path, "f.bin", data)
    part = dest / f"f.bin{PART_SUFFIX}"
    async with LocalAdapter(f"file://{dest}") as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(chunks(data, 20 * KiB)[0])
        part.unlink()
        part.mkdir()  # something else now owns the name
        with pytest.raises(PermanentError) as info:
            await writer.verify(batches(journaled(data[: 20 * KiB], 20 * KiB)), "xxh3")
        assert str(info.value) == f"verify f.bin{PART_SUFFIX}: Is a directory"
        await writer.abort()  # does not raise, and does not remove what is not a part file
        assert part.is_dir()
        with pytest.raises(PermanentError) as info:
            await adapter.discard("f.bin", writer.state())
        assert str(info.value) == f"remove f.bin{PART_SUFFIX}: Is a directory"
    assert part.is_dir() and not (dest / "f.bin").exists()


async def test_a_resumed_item_without_hashlib_digests_is_renamed_on_its_size(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    data = os.urandom(50 * KiB)
    item = make_item(tmp_path, "crc.bin", data)
    async with LocalAdapter(f"file://{dest}") as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(chunks(data, 25 * KiB)[0])
        again = await adapter.open_item(item, writer.state())
        assert again.resumed
        await again.write(chunks(data, 25 * KiB)[1])
        # only a digest hashlib lacks: the part file's size is what complete can check
        crc = digest_bytes(data, ("crc32c",))
        assert await again.complete(crc, len(data)) == {"path": "crc.bin", "size": len(data)}
    assert (dest / "crc.bin").read_bytes() == data


async def test_pull_from_a_vanished_directory_or_file_names_it(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.bin").write_bytes(b"a" * 100)
    async with LocalAdapter(f"file://{root}") as adapter:
        listed = [i async for i in adapter.list_remote()]
        assert listed == [RemoteItem(rel="sub/a.bin", size=100, digests={}, ref="sub/a.bin")]
        (root / "sub" / "a.bin").unlink()
        with pytest.raises(SourceError) as info:
            async for _ in adapter.read(listed[0], 0):
                pass
        assert str(info.value) == "cannot read sub/a.bin: No such file or directory"
        shutil.rmtree(root)  # the mount went away
        with pytest.raises(SourceError) as info:
            async for _ in adapter.list_remote():
                pass
        assert str(info.value) == f"cannot list {root}: No such file or directory"



def test_a_push_to_a_read_only_target_fails_each_file_once_and_the_next_run_finishes(
    disk: Disk, tmp_path: Path, journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(70 * KiB), "sub/b.bin": os.urandom(30 * KiB)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    argv = ["push", str(src), f"file://{disk.path}", "--journal", str(journal), "--chunk-size", "32K"]
    disk.remount("ro")
    try:
        assert cli_main(argv) == 1
    finally:
        disk.remount("rw")
    err = capsys.readouterr().err
    for rel in files:
        assert f"failed: {rel}: open {rel}{PART_SUFFIX}: Read-only file system" in err, err
    assert "0 retries" in err and "retrying" not in err  # refused for good: not retried
    db = sqlite3.connect(journal)
    try:
        states = dict(db.execute("SELECT rel, state FROM items").fetchall())
    finally:
        db.close()
    assert states == {"a.bin": "failed", "sub/b.bin": "failed"}
    assert list(disk.path.iterdir()) == []
    assert cli_main(argv) == 0
    for rel, data in files.items():
        assert (disk.path / rel).read_bytes() == data
