"""The engine core's recovery paths, each reached by a real fault: the journal and its job lock on a really
full filesystem (a small tmpfs, filled up), a journal path that is no journal (a file of random bytes, a
directory, another program's database), a job lock held by a second process that has not (or not legibly)
said who it is, a lock file removed by hand while held, and one that a second process removes (or replaces)
while the opener waits on it (the kernel holds an open that breaks a file lease until the lease is given
back: the unlink race of :mod:`asyncdepo.engine.joblock`, made to happen every time)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from asyncdepo.contract import Item
from asyncdepo.engine.checks import content_check
from asyncdepo.engine.joblock import lock_path
from asyncdepo.engine.journal import Journal, job_id
from asyncdepo.engine.pipeline import FileSource
from asyncdepo.errors import DiskFullError, JobLockedError, UsageError
from tests.tmpfs import small_tmpfs


class SmallDisk:
    """A 256 KiB tmpfs at ``path``; :meth:`fill` takes every byte left, :meth:`free` gives them back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        with open(self._filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC: the disk is full now
        with open(self._filler, "ab", buffering=0) as f, pytest.raises(OSError, match="No space left"):
            f.write(b"\0")

    def free(self) -> None:
        self._filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        yield SmallDisk(disk)


# -- the journal on a full disk -------------------------------------------------------------------------------
async def test_opening_a_journal_on_a_full_disk_is_a_disk_full_error_naming_it(small_disk: SmallDisk) -> None:
    path = small_disk.path / "journal.sqlite"
    small_disk.fill()
    with pytest.raises(DiskFullError) as info:
        await Journal.open(path)
    assert str(path) in str(info.value) and "full" in str(info.value)
    assert "run the same command again" in (info.value.hint or "")
    small_disk.free()
    journal = await Journal.open(path)  # the space is back: the same journal opens and works
    try:
        jid, existed = await journal.open_job("push", "/src", "file:///dst")
        assert not existed and journal.runs[jid] == 1
    finally:
        await journal.close()


async def test_a_job_opened_on_a_full_disk_fails_clearly_and_leaves_the_job_unlocked(small_disk: SmallDisk) -> None:
    """The job's row cannot be written: a DiskFullError naming the journal (not a bare OSError from writing the
    lock's holder record), the lock given back, and the same job opens once there is space."""
    path = small_disk.path / "journal.sqlite"
    journal = await Journal.open(path)
    try:
        small_disk.fill()
        with pytest.raises(DiskFullError) as info:
            await journal.open_job("push", "/src", "file:///dst")
        assert str(path) in str(info.value)
        jid = job_id("push", "/src", "file:///dst")
        assert not lock_path(path, jid).exists() and jid not in journal.runs
        small_disk.free()
        again, existed = await journal.open_job("push", "/src", "file:///dst")
        assert again == jid and not existed and journal.runs[jid] == 1
    finally:
        await journal.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT id, state FROM jobs").fetchall() == [(jid, "running")]
    finally:
        db.close()


# -- a journal path that is no journal -------------------------------------------------------------------------
async def test_a_file_that_is_not_a_journal_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    junk = os.urandom(8192)
    path.write_bytes(junk)
    with pytest.raises(UsageError) as info:
        await Journal.open(path)
    assert str(info.value) == f"journal {path} cannot be used: file is not a database"
    assert "--journal" in (info.value.hint or "")
    assert path.read_bytes() == junk


async def test_a_directory_given_as_the_journal_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"journal {tmp_path} cannot be used: unable to open database file"):
        await Journal.open(tmp_path)


def _foreign(path: Path, schema: str) -> None:
    """A SQLite database of another program at ``path``."""
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.close()


async def test_another_programs_database_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """Its ``items`` table has other columns: creating the journal's index fails inside the schema's
    transaction, which is rolled back (nothing of ours is left in it), and the open is a UsageError."""
    path = tmp_path / "other.sqlite"
    _foreign(path, "CREATE TABLE items (name TEXT, price REAL); INSERT INTO items VALUES ('tea', 2.5);")
    with pytest.raises(UsageError, match=f"journal {path} cannot be used: no such column: job"):
        await Journal.open(path)
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("items",)]
        assert db.execute("SELECT * FROM items").fetchall() == [("tea", 2.5)]
    finally:
        db.close()


@pytest.mark.parametrize("jobs", ["CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT)",
                                  ("CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT, source TEXT, target TEXT, "
                                   "argv TEXT, created REAL, updated REAL, state TEXT, colour TEXT NOT NULL)")],
                         ids=["missing-columns", "extra-required-column"])
async def test_a_jobs_table_of_another_program_refuses_the_job_and_frees_it(tmp_path: Path, jobs: str) -> None:
    path = tmp_path / "other.sqlite"
    _foreign(path, jobs + ";")
    journal = await Journal.open(path)  # the tables it lacks are created, the one it has is kept
    try:
        with pytest.raises(UsageError, match=f"journal {path} cannot be used: "):
            await journal.open_job("push", "/src", "file:///dst")
        jid = job_id("push", "/src", "file:///dst")
        assert not lock_path(path, jid).exists() and jid not in journal.runs
        assert journal.db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert not journal.db.in_transaction
    finally:
        await journal.close()


# -- the job lock ------------------------------------------------------------------------------------------------
HOLD = ("import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, sys.argv[2].encode())\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n")


@pytest.mark.parametrize("record", ["", "{not json", "[1, 2]", '{"pid": 0, "since": "yesterday"}'],
                         ids=["empty", "torn", "not-a-map", "no-usable-field"])
def test_a_holder_that_has_not_said_who_it_is_is_named_as_such(tmp_path: Path, record: str) -> None:
    """Another process holds the job's lock file but its record is empty, torn or unusable (it has just taken the
    lock, or its disk was full): the refusal says so instead of failing on the record."""
    path = tmp_path / "journal.sqlite"
    jid = job_id("push", "/src", "file:///dst")

    async def refused() -> JobLockedError:
        journal = await Journal.open(path)
        try:
            with pytest.raises(JobLockedError) as info:
                await journal.open_job("push", "/src", "file:///dst")
            assert jid not in journal.runs
            return info.value
        finally:
            await journal.close()

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path(path, jid)), record],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        error = anyio.run(refused)
        assert str(error) == f"job {jid} is already running: another process (it has not said which yet)"
        assert lock_path(path, jid).read_text() == record  # the holder's file is not touched
    finally:
        holder.kill()
        holder.wait(timeout=30)


async def test_a_lock_file_removed_while_held_is_released_all_the_same(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    first = await Journal.open(path)
    try:
        jid, _ = await first.open_job("push", "/src", "file:///dst")
        lock_path(path, jid).unlink()  # someone tidied the journal's folder by hand
    finally:
        await first.close()
    second = await Journal.open(path)
    try:
        again, existed = await second.open_job("push", "/src", "file:///dst")
        assert again == jid and existed and second.runs[jid] == 2
        assert lock_path(path, jid).exists()
    finally:
        await second.close()
    assert not lock_path(path, jid).exists()


async def test_a_journal_whose_disk_fills_mid_run_drops_what_comes_after(small_disk: SmallDisk) -> None:
    """Rows and chunk digests queued once the journal's disk is full are dropped (the run's own cleanup must
    not fail in turn); what was committed before stays, and the job opens again once there is space."""
    path = small_disk.path / "journal.sqlite"
    journal = await Journal.open(path)
    try:
        jid, _ = await journal.open_job("push", "/src", "file:///dst")
        await journal.record(jid, "kept.bin", size=1, mtime_ns=1, state="done")
        await journal.flush()
        small_disk.fill()
        for i in range(300):
            await journal.record(jid, f"lost-{i:03d}.bin", size=i, mtime_ns=1, state="partial", error="x" * 400)
            await journal.record_chunk(jid, f"lost-{i:03d}.bin", 0, 1 << 20, f"{i:032x}")
        await journal.flush()
        assert isinstance(journal.broken, DiskFullError) and str(path) in str(journal.broken)
        await journal.record_chunk(jid, "after.bin", 0, 1 << 20, "0" * 32)
        assert [b async for b in journal.chunks(jid, "after.bin")] == []
    finally:
        await journal.close()
    small_disk.free()
    again = await Journal.open(path)
    try:
        assert list(await again.lookup(jid, ["kept.bin", "lost-000.bin", "after.bin"])) == ["kept.bin"]
        assert (await again.open_job("push", "/src", "file:///dst"))[1]
    finally:
        await again.close()


async def test_a_job_opened_twice_by_one_journal_keeps_one_lock(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = await Journal.open(path)
    try:
        jid, existed = await journal.open_job("push", "/src", "file:///dst")
        again, existed_again = await journal.open_job("push", "/src", "file:///dst")
        assert (again, existed, existed_again, journal.runs[jid]) == (jid, False, True, 2)
        assert [p.name for p in tmp_path.glob("*.lock")] == [lock_path(path, jid).name]
        with pytest.raises(ValueError, match="unknown journal fields"):
            await journal.record(jid, "a.bin", colour="red")
    finally:
        await journal.close()
    assert not list(tmp_path.glob("*.lock"))


# -- pure logic ---------------------------------------------------------------------------------------------------
def test_checksum_compares_with_the_cheapest_digest_the_journal_holds() -> None:
    assert content_check({}) == ("", "")
    assert content_check({"xxh3": "", "sha1": None, "crc32c": "abcd", "md5": "0f" * 16}) == ("md5", "0f" * 16)
    assert content_check({"md5": "0f" * 16, "xxh3": "ab" * 8}) == ("xxh3", "ab" * 8)


async def test_a_file_source_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"a" * 1000)
    src = FileSource(Item(str(path), "a.bin", 1000, path.stat().st_mtime_ns))
    assert b"".join([bytes(b) async for b in src]) == b"a" * 1000
    with pytest.raises(RuntimeError, match="only once"):
        src.__aiter__()


#: a process that holds a read lease on the lock file; each time an opener breaks it (the kernel holds that
#: open until the lease is given back), it removes the file first, and makes a new one with a new lease while
#: it has rounds left: the file the opener then locks no longer has the name (the unlink race of joblock.py)
REPLACER = ("import fcntl, os, signal, sys\n"
            "path, rounds = sys.argv[1], int(sys.argv[2])\n"
            "state = {'fd': -1, 'left': rounds}\n"
            "def arm():\n"
            "    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)\n"
            "    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)\n"
            "    state['fd'] = fd\n"
            "def broken(sig, frame):\n"
            "    os.unlink(path)\n"
            "    fd = state['fd']\n"
            "    state['left'] -= 1\n"
            "    if state['left'] > 0:\n"
            "        arm()\n"
            "    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)\n"
            "    os.close(fd)\n"
            "    print('replaced', flush=True)\n"
            "signal.signal(signal.SIGIO, broken)\n"
            "arm()\n"
            "print('armed', flush=True)\n"
            "sys.stdin.readline()\n")


def _replaced(tmp_path: Path, rounds: int) -> tuple[str | JobLockedError, int]:
    """Open the job while REPLACER replaces its lock file ``rounds`` times; (job id or the refusal, how many
    times the file was replaced)."""
    path = tmp_path / "journal.sqlite"
    jid = job_id("push", "/src", "file:///dst")

    async def open_job() -> str | JobLockedError:
        journal = await Journal.open(path)
        try:
            try:
                got, _ = await journal.open_job("push", "/src", "file:///dst")
            except JobLockedError as exc:
                return exc
            assert json.loads(lock_path(path, jid).read_text())["pid"] == os.getpid()  # the file it locked
            return got
        finally:
            await journal.close()

    replacer = subprocess.Popen([sys.executable, "-c", REPLACER, str(lock_path(path, jid)), str(rounds)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert replacer.stdout is not None and replacer.stdout.readline().strip() == "armed"
        outcome = anyio.run(open_job)
    finally:
        replacer.kill()
        out, _ = replacer.communicate(timeout=30)
    return outcome, out.split().count("replaced")


def test_a_lock_file_removed_between_its_open_and_its_lock_is_made_again(tmp_path: Path) -> None:
    got, replaced = _replaced(tmp_path, 1)
    assert got == job_id("push", "/src", "file:///dst") and replaced == 1


def test_a_lock_file_replaced_on_every_try_gives_up_naming_it(tmp_path: Path) -> None:
    got, replaced = _replaced(tmp_path, 8)
    assert isinstance(got, JobLockedError) and replaced == 8
    assert str(got) == (f"job {job_id('push', '/src', 'file:///dst')}: its lock file "
                        f"{lock_path(tmp_path / 'journal.sqlite', job_id('push', '/src', 'file:///dst'))} keeps "
                        "being replaced by another process")
