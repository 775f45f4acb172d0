"""The journal: opening a fresh one from many tasks and processes at once, names that are not UTF-8, chunk
digests, the job lock, and an old journal migrated in place."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from asyncdepo.engine.joblock import lock_path
from asyncdepo.engine.journal import VANISHED, Journal
from asyncdepo.errors import DiskFullError, JobLockedError

TASKS = 20
PROCESSES = 4


async def _open_and_write(path: Path, who: str) -> None:
    journal = await Journal.open(path)
    try:
        jid, _ = await journal.open_job("push", f"/src/{who}", "file:///dst")
        await journal.record(jid, "a.bin", size=1, mtime_ns=1, state="done")
        await journal.flush()
    finally:
        await journal.close()


async def _many(path: Path, prefix: str, n: int) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(_open_and_write, path, f"{prefix}-{i}")


def _process(path: str, prefix: str, go: object) -> None:
    go.wait()  # type: ignore[attr-defined]
    anyio.run(_many, Path(path), prefix, TASKS)


async def test_fresh_journal_opened_by_20_tasks_and_4_processes_at_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite"
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_process, args=(str(path), f"p{i}", go)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    go.set()  # the processes and the tasks below start opening the fresh journal together
    await _many(path, "here", TASKS)
    for p in procs:
        await anyio.to_thread.run_sync(p.join, 120)
        assert p.exitcode == 0
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == TASKS * (PROCESSES + 1)
        assert db.execute("SELECT count(*) FROM items WHERE state='done'").fetchone()[0] == TASKS * (PROCESSES + 1)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert not list(path.parent.glob("*.lock"))  # every run released (and removed) its job lock


async def test_names_that_are_not_utf8_are_journaled_and_read_back(tmp_path: Path) -> None:
    weird = os.fsdecode(b"caf\xe9/\xff\xfe.bin")  # Latin-1 bytes: not UTF-8
    plain = "plain/é.bin"
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        jid, _ = await journal.open_job("push", os.fsdecode(b"/src/\xff"), "file:///dst", ["push", "x"])
        await journal.record(jid, weird, size=3, mtime_ns=7, state="failed", error="boom", walked=1)
        await journal.record(jid, plain, size=4, mtime_ns=8, state="partial", walked=1)
        await journal.record_chunk(jid, weird, 0, 3, "abc")
        await journal.flush()
        rows = await journal.lookup(jid, [weird, plain, "missing"])
        assert rows[weird]["size"] == 3 and rows[plain]["state"] == "partial" and "missing" not in rows
        assert [b async for b in journal.chunks(jid, weird)] == [[(0, 3, "abc")]]
        status = await journal.status(jid)
        assert status["failures"] == [{"rel": weird, "error": "boom", "transient": False}]
        assert (await journal.job(jid))["source"] == os.fsdecode(b"/src/\xff")  # type: ignore[index]
        unseen = await journal.unseen(jid, 2)
        assert sorted(row["rel"] for _, row in unseen) == sorted([weird, plain])
    finally:
        await journal.close()


async def test_chunk_digests_are_forgotten_from_an_offset_and_paged(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        jid, _ = await journal.open_job("push", "/src", "file:///dst")
        for i in range(10):
            await journal.record_chunk(jid, "big", i * 100, 100, f"d{i}")
        journal.forget_chunks(jid, "big", 450)  # drops the chunk that straddles 450 and every later one
        await journal.record_chunk(jid, "big", 400, 100, "new")  # queued after the forget: it stays
        got = [rec async for batch in journal.chunks(jid, "big", batch=3) for rec in batch]
        assert got == [(i * 100, 100, f"d{i}") for i in range(4)] + [(400, 100, "new")]
        journal.forget_chunks(jid, "big")
        assert [b async for b in journal.chunks(jid, "big")] == []
    finally:
        await journal.close()


async def test_job_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    first = await Journal.open(path)
    second = await Journal.open(path)
    try:
        jid, _ = await first.open_job("push", "/src", "file:///dst")
        with pytest.raises(JobLockedError) as info:
            await second.open_job("push", "/src", "file:///dst")
        assert f"pid {os.getpid()}" in str(info.value) and info.value.holder["pid"] == os.getpid()
        other, _ = await second.open_job("push", "/elsewhere", "file:///dst")  # another job: no wait
        assert other != jid
        assert lock_path(path, jid).exists()
    finally:
        await first.close()
    assert not lock_path(path, jid).exists()
    try:
        again, existed = await second.open_job("push", "/src", "file:///dst")
        assert again == jid and existed and second.runs[jid] == 2
    finally:
        await second.close()


def test_job_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    code = ("import anyio, sys, os\n"
            "from asyncdepo.engine.journal import Journal\n"
            "async def main():\n"
            "    j = await Journal.open(sys.argv[1])\n"
            "    await j.open_job('push', '/src', 'file:///dst')\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.readline()\n"
            "anyio.run(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"

        async def try_lock() -> str:
            j = await Journal.open(path)
            try:
                jid, _ = await j.open_job("push", "/src", "file:///dst")
                return jid
            finally:
                await j.close()

        with pytest.raises(JobLockedError, match=f"pid {proc.pid}"):
            anyio.run(try_lock)
        proc.kill()  # SIGKILL: no cleanup runs in the holder
        proc.wait(timeout=30)
        assert anyio.run(try_lock)
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_an_old_journal_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
            argv TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, updated REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'running');
        CREATE TABLE items (job TEXT NOT NULL, rel TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
            state TEXT NOT NULL, offset INTEGER NOT NULL DEFAULT 0, remote TEXT, digests TEXT, error TEXT,
            transient INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job, rel)) WITHOUT ROWID;
        CREATE TABLE job_state (job TEXT PRIMARY KEY, data TEXT NOT NULL);
    """)
    db.close()
    journal = await Journal.open(path)
    try:
        jid, existed = await journal.open_job("push", "/src", "file:///dst")
        await journal.record(jid, "x", size=1, mtime_ns=1, state="partial", walked=journal.runs[jid])
        await journal.flush()
        assert not existed and journal.runs[jid] == 1
        assert await journal.unseen(jid, journal.runs[jid]) == []
    finally:
        await journal.close()


async def test_a_full_disk_under_the_journal_breaks_it_without_a_traceback(tmp_path: Path) -> None:
    """A commit that fails as SQLite's disk full (a real SQLITE_FULL: the database may not grow): no
    'cannot rollback' error, the journal is broken with a DiskFullError naming it, later writes (the run's own
    cleanup) are dropped without raising, and what was committed before stays."""
    path = tmp_path / "j.sqlite"
    journal = await Journal.open(path)
    try:
        jid, _ = await journal.open_job("push", "/src", "file:///dst")
        await journal.record(jid, "kept.bin", size=1, mtime_ns=1, state="done")
        await journal.flush()
        pages = journal.db.execute("PRAGMA page_count").fetchone()[0]
        journal.db.execute(f"PRAGMA max_page_count={pages}")  # no room left to grow
        for i in range(200):
            await journal.record(jid, f"lost-{i:03d}.bin", size=i, mtime_ns=1, state="done", error="x" * 500)
        await journal.flush()
        assert isinstance(journal.broken, DiskFullError)
        assert str(path) in str(journal.broken) and "full" in str(journal.broken)
        assert not journal.db.in_transaction
        await journal.record(jid, "after.bin", size=1, mtime_ns=1, state="done")
        await journal.set_job(jid, "failed")
        await journal.set_job_state(jid, {"k": "v"})
        assert await journal.drop_vanished(jid, 1) == 0
    finally:
        await journal.close()
    db = sqlite3.connect(path)
    try:
        assert [r[0] for r in db.execute("SELECT rel FROM items")] == ["kept.bin"]
    finally:
        db.close()


async def test_a_vanished_row_that_names_a_leftover_on_the_target_is_kept(tmp_path: Path) -> None:
    """A vanished file's row is dropped by the next run that does not find it either, unless the target could
    not remove what it holds of it (its ``remote`` says what is left): that row stays for ``status``."""
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        jid, _ = await journal.open_job("push", "/src", "empiar:1")
        for rel, remote in (("gone", None), ("left", {"left": "a partial copy stays"})):
            await journal.record(jid, rel, size=5, mtime_ns=1, state="failed", error=VANISHED, remote=remote,
                                 walked=1)
        assert await journal.drop_vanished(jid, 2) == 1
        rows = await journal.lookup(jid, ["gone", "left"])
        assert list(rows) == ["left"] and rows["left"]["remote"] == {"left": "a partial copy stays"}
    finally:
        await journal.close()
