"""SQLite (WAL) resume journal: jobs, items, chunk digests, job-level adapter state; batched commits;
one lock per job.

Default location ``$XDG_STATE_HOME/asyncdepo/journal.sqlite`` (``~/.local/state/...``), ``--journal``
overrides. Tables:

* ``jobs(id, kind, source, target, argv, created, updated, state, runs)`` — a job's id is derived from
  (kind, source, target), so re-running the same push finds the same job; ``argv`` is the secret-free
  command that resumes it; ``runs`` counts the runs that opened it (each run's number marks what it walked).
* ``items(job, rel, size, mtime_ns, state, offset, remote, digests, error, transient, attempts, walked)`` —
  ``state`` is one of queued, partial, done, failed, skipped; ``remote`` is the adapter's JSON resume
  state (upload location, UploadId and parts), never a secret; ``walked`` is the number of the last run
  whose walk found the file (rows of unfinished files that a run did not find are how a vanished source is
  noticed: the walk itself only yields files that exist).
* ``chunks(job, rel, offset, length, digest)`` — a digest of every chunk the target confirmed for an item
  still in progress, so a resume can check what the target holds before building on it; dropped when the
  item is done or starts over. One row per chunk (16 MiB by default): a resumed item's rows are read back in
  batches, never all at once.
* ``job_state(job, data)`` — the adapter's job-level JSON state (upload tokens, sessions ids).

File names: any name Linux allows is journaled (one that is not UTF-8 as a BLOB of its bytes): see
:mod:`asyncdepo.engine.journalrows`, which also holds the schema.

Writes are queued in memory and committed in batches (512 rows or 0.5 s), in WAL mode with
``synchronous=NORMAL``: a commit appends to the WAL without an fsync, so 10,000 small files cost a few
dozen commits, and a SIGKILL loses at most the last half second — which the resume path tolerates,
because every adapter asks the server what it has. ``flush()`` forces a commit; the engine calls it
before the first byte of a multi-chunk item is sent, so its upload location survives a crash.

Opening: several processes (or tasks) may open a fresh journal at once. The busy timeout is set before
anything else, the schema is created in one ``BEGIN IMMEDIATE`` transaction (a plain read-then-write
transaction can be refused at once, without waiting, to avoid a deadlock), and an open refused with
"database is locked" all the same is retried a bounded number of times through the pacer
(:data:`OPEN_RETRY`).

The job lock: :meth:`Journal.open_job` takes the job's lock (:mod:`asyncdepo.engine.joblock`) before it
touches the job's row, and holds it until :meth:`Journal.close`; a second run of the same job gets
:class:`~asyncdepo.errors.JobLockedError` naming the holder.

A full disk under the journal: a commit that fails with SQLITE_FULL was rolled back by SQLite itself (our
ROLLBACK runs only while a transaction is still open). The journal is then :attr:`Journal.broken` (a
:class:`~asyncdepo.errors.DiskFullError` naming it and the space free) and writes nothing more: queued rows
are dropped, later writes are no-ops, so the run's own cleanup (its last flush, the job's state) does not
fail in turn. The run stops starting items, lets those in flight end (their part files would not be
recorded for a resume), and fails with that error; the next run finds on the target what this one sent.
Opening a journal, or a job, on a full disk raises the DiskFullError.

All SQLite calls run in one worker thread (a CapacityLimiter of 1), never on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

import anyio

from asyncdepo.engine.joblock import JobLock, lock_path
from asyncdepo.engine.journalerrors import disk_full, failed, full, unusable
from asyncdepo.engine.journalrows import ITEM_FIELDS, MIGRATIONS, SCHEMA, db_key, db_text, dumps, loads
from asyncdepo.errors import DiskFullError
from asyncdepo.transport.pacer import RetryPolicy, retry_call

#: the error text of an item whose source vanished (the sweep of a later run recognises its own rows by it)
VANISHED = "source vanished"

#: opening a journal that other processes are creating or writing at the same moment: some quick tries, then
#: slower ones (~10 s in all; SQLite answers "locked" at once, without its busy wait, in a few states of WAL)
OPEN_RETRY = RetryPolicy(attempts=10, base=0.05, cap=2.0)

#: seconds SQLite waits for a lock held by another connection before it answers "database is locked"
BUSY_TIMEOUT = 30.0

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "asyncdepo" / "journal.sqlite"


def job_id(kind: str, source: str, target: str) -> str:
    """A stable id for (kind, source, target): the same push gets the same job."""
    return hashlib.sha256(f"{kind}\0{source}\0{target}".encode("utf-8", "surrogateescape")).hexdigest()[:12]




ChunkRecord = tuple[int, int, str]  # (offset, length, digest)


class Journal:
    """Open with ``await Journal.open(path)``; close with ``await journal.close()`` (flushes, releases locks)."""

    BATCH = 512
    INTERVAL = 0.5

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}
        self._chunks: dict[tuple[str, str, int], tuple[int, str]] = {}
        self._forget: list[tuple[str, str, int]] = []
        self._last_flush = time.monotonic()
        self._limiter = anyio.CapacityLimiter(1)
        #: one commit at a time: a flush returns only once the rows queued before it are committed, also
        #: when another flush took them (callers waiting meanwhile then share one commit)
        self._committing = anyio.Lock()
        self._locks: dict[str, JobLock] = {}
        #: job id -> the number of this run of it (set by :meth:`open_job`)
        self.runs: dict[str, int] = {}
        self.commits = 0
        #: the journal's disk filled up: nothing more is written (see the module docstring)
        self.broken: DiskFullError | None = None

    @classmethod
    async def open(cls, path: Path | None = None) -> Journal:
        """Open (creating when needed) the journal at ``path`` (default :func:`default_path`).

        :raises TransientError: the journal stayed locked by other processes through every try.
        :raises DiskFullError: its disk is full.
        :raises UsageError: ``path`` is no journal this run can use (not a database, a directory, read-only).
        """
        j = cls(Path(path) if path else default_path())
        await retry_call(lambda: j._run(j._open_sync), OPEN_RETRY)
        return j

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        # SQLite creates the file; we never open it ourselves: closing any descriptor of a file drops every
        # POSIX lock this process holds on it, those of our other connections (other tasks) included, and
        # lets another process write over their transactions (seen as lost rows in the open-race test)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT)
        except sqlite3.Error as exc:  # a directory, or a folder this user may not write
            raise unusable(self.path, exc) from None
        if fresh:
            os.chmod(self.path, 0o600)
        try:
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # changing it takes an exclusive lock
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                for table, column, definition in MIGRATIONS:
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT may have rolled it back already
                    db.execute("ROLLBACK")
                raise
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise failed(self.path, exc) from None
            raise
        self._db = db

    async def _run(self, fn: Callable[[*_Args], _T], *args: *_Args) -> _T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _write(self, fn: Callable[[], object]) -> bool:
        """Run the write ``fn`` (a statement, or a transaction that rolls itself back when it fails); False
        when nothing was written: the journal's disk is full, now (:attr:`broken` is set) or before."""
        if self.broken is not None:
            return False
        try:
            await self._run(fn)
        except sqlite3.OperationalError as exc:
            if not disk_full(exc):
                raise
            self.broken = full(self.path, exc)
            self._pending, self._chunks, self._forget = {}, {}, []
            return False
        return True

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "journal is closed"
        return self._db

    # -- jobs -----------------------------------------------------------------------------------------
    async def open_job(self, kind: str, source: str, target: str, argv: Sequence[str] = ()) -> tuple[str, bool]:
        """Lock, then create or find the job for (kind, source, target); returns (id, existed).

        The lock is held until :meth:`close` (or :meth:`release_job`); :attr:`runs` holds this run's number.

        :raises JobLockedError: another process runs this job now.
        :raises DiskFullError: the journal's disk is full.
        :raises UsageError: the journal's tables are not an asyncdepo journal's (another program's database).
        """
        jid = job_id(kind, source, target)
        if jid not in self._locks:
            self._locks[jid] = await anyio.to_thread.run_sync(JobLock.acquire, lock_path(self.path, jid), jid)

        def do() -> tuple[bool, int]:
            now = time.time()
            args = json.dumps(list(argv))  # json, not orjson: a path that is not UTF-8 survives as escapes
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT runs FROM jobs WHERE id=?", (jid,)).fetchone()
                runs = (row[0] if row else 0) + 1
                if row:
                    self.db.execute("UPDATE jobs SET updated=?, state='running', argv=?, runs=? WHERE id=?",
                                    (now, args, runs, jid))
                else:
                    self.db.execute(
                        "INSERT INTO jobs(id, kind, source, target, argv, created, updated, runs) "
                        "VALUES (?,?,?,?,?,?,?,?)", (jid, kind, db_key(source), target, args, now, now, runs))
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # a failed COMMIT may have rolled it back already
                    self.db.execute("ROLLBACK")
                raise
            return row is not None, runs

        try:
            existed, self.runs[jid] = await self._run(do)
        except BaseException as exc:
            await self.release_job(jid)
            if isinstance(exc, sqlite3.Error):
                raise failed(self.path, exc) from None
            raise
        return jid, existed

    async def release_job(self, jid: str) -> None:
        """Give back the lock of ``jid``, which this journal holds (its callers: :meth:`open_job` when it fails
        after taking the lock, and :meth:`close`)."""
        await anyio.to_thread.run_sync(self._locks.pop(jid).release)

    async def set_job(self, jid: str, state: str) -> None:
        await self._write(lambda: self.db.execute("UPDATE jobs SET state=?, updated=? WHERE id=?",
                                                (state, time.time(), jid)))

    async def job(self, jid: str) -> dict[str, Any] | None:
        """The job row (prefix match on the id), or None."""

        def do() -> dict[str, Any] | None:
            rows = self.db.execute("SELECT id, kind, source, target, argv, created, updated, state FROM jobs "
                                   "WHERE id LIKE ? ORDER BY updated DESC", (jid + "%",)).fetchall()
            if len(rows) != 1:
                return None
            r = rows[0]
            return {"id": r[0], "kind": r[1], "source": db_text(r[2]), "target": r[3], "argv": json.loads(r[4]),
                    "created": r[5], "updated": r[6], "state": r[7]}

        return await self._run(do)

    async def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        def do() -> list[dict[str, Any]]:
            rows = self.db.execute(
                "SELECT j.id, j.kind, j.source, j.target, j.updated, j.state, "
                "(SELECT count(*) FROM items i WHERE i.job=j.id AND i.state='done'), "
                "(SELECT count(*) FROM items i WHERE i.job=j.id) FROM jobs j ORDER BY j.updated DESC LIMIT ?",
                (limit,)).fetchall()
            return [{"id": r[0], "kind": r[1], "source": db_text(r[2]), "target": r[3], "updated": r[4],
                     "state": r[5], "done": r[6], "items": r[7]} for r in rows]

        return await self._run(do)

    async def status(self, jid: str, failures: int = 50) -> dict[str, Any]:
        """Per-state counts and bytes, and up to ``failures`` failed items with their reasons."""
        await self.flush()

        def do() -> dict[str, Any]:
            counts = {r[0]: {"files": r[1], "bytes": r[2] or 0} for r in self.db.execute(
                "SELECT state, count(*), sum(size) FROM items WHERE job=? GROUP BY state", (jid,))}
            failed = [{"rel": db_text(r[0]), "error": r[1], "transient": bool(r[2])} for r in self.db.execute(
                "SELECT rel, error, transient FROM items WHERE job=? AND state='failed' ORDER BY rel LIMIT ?",
                (jid, failures))]
            return {"counts": counts, "failures": failed}

        return await self._run(do)

    async def forget(self, jid: str) -> None:
        """Drop what the job knows (its items and its job state), keeping the job: the next run starts over
        (e.g. a deposition into a new archive entry)."""
        self._pending = {k: v for k, v in self._pending.items() if k[0] != jid}
        self._chunks = {k: v for k, v in self._chunks.items() if k[0] != jid}

        def do() -> None:
            for table in ("items", "chunks", "job_state"):
                self.db.execute(f"DELETE FROM {table} WHERE job=?", (jid,))

        await self._write(do)

    async def job_state(self, jid: str) -> dict[str, Any]:
        def do() -> dict[str, Any]:
            row = self.db.execute("SELECT data FROM job_state WHERE job=?", (jid,)).fetchone()
            return loads(row[0]) if row else {}

        return await self._run(do)

    async def set_job_state(self, jid: str, data: dict[str, Any]) -> None:
        await self._write(lambda: self.db.execute(
            "INSERT INTO job_state(job, data) VALUES (?, ?) ON CONFLICT(job) DO UPDATE SET data=excluded.data",
            (jid, dumps(data))))

    # -- items ----------------------------------------------------------------------------------------
    async def lookup(self, jid: str, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Journal rows for ``rels`` (pending writes included), keyed by rel."""
        rels = list(rels)

        def do() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for i in range(0, len(rels), 500):
                part = [db_key(r) for r in rels[i:i + 500]]
                q = ("SELECT rel, size, mtime_ns, state, offset, remote, digests, error, transient, attempts "
                     f"FROM items WHERE job=? AND rel IN ({','.join('?' * len(part))})")
                for r in self.db.execute(q, (jid, *part)):
                    out[db_text(r[0])] = {"size": r[1], "mtime_ns": r[2], "state": r[3], "offset": r[4],
                                          "remote": loads(r[5]) if r[5] else None,
                                          "digests": loads(r[6]) if r[6] else {}, "error": r[7],
                                          "transient": bool(r[8]), "attempts": r[9]}
            return out

        found = await self._run(do)
        for rel in rels:
            p = self._pending.get((jid, rel))
            if p is not None:
                row = found.setdefault(rel, {})
                row.update({k: v for k, v in p.items()})
        return found

    async def failed_transient_walked(self, jid: str, run: int, limit: int = 100_000) -> list[str]:
        """Items of ``jid`` that failed transiently and that run ``run`` walked: what its end-of-run round
        sends again (a file an earlier run failed and this one leaves out, e.g. by ``--exclude``, is not)."""
        await self.flush()
        return await self._run(lambda: [db_text(r[0]) for r in self.db.execute(
            "SELECT rel FROM items WHERE job=? AND state='failed' AND transient=1 AND walked=? LIMIT ?",
            (jid, run, limit))])

    async def unseen(self, jid: str, run: int, after: str | bytes = "", limit: int = 256
                     ) -> list[tuple[str | bytes, dict[str, Any]]]:
        """Unfinished items of ``jid`` that run ``run`` did not walk, in key order after the key ``after``
        (pass the last key returned to page on); each as (key, {rel, size, state, remote}).

        Rows an earlier run already failed as vanished are not listed (see :meth:`drop_vanished`).
        """
        await self.flush()

        def do() -> list[tuple[str | bytes, dict[str, Any]]]:
            rows = self.db.execute(
                "SELECT rel, size, state, remote FROM items WHERE job=? AND walked!=? AND state!='done' "
                "AND NOT (state='failed' AND error=?) AND rel>? ORDER BY rel LIMIT ?",
                (jid, run, VANISHED, after, limit)).fetchall()
            return [(r[0], {"rel": db_text(r[0]), "size": r[1], "state": r[2],
                            "remote": loads(r[3]) if r[3] else None}) for r in rows]

        return await self._run(do)

    async def drop_vanished(self, jid: str, run: int) -> int:
        """Delete the rows earlier runs failed as vanished whose file this run did not find either: they
        were reported once; the job no longer has them. Rows that still name something the target could not
        remove (``remote`` set) stay. Returns how many."""
        await self.flush()
        count: list[int] = []
        await self._write(lambda: count.append(self.db.execute(
            "DELETE FROM items WHERE job=? AND state='failed' AND error=? AND walked!=? AND remote IS NULL",
            (jid, VANISHED, run)).rowcount))
        return count[0] if count else 0

    async def delete(self, jid: str, rel: str) -> None:
        """Remove the item's row and chunk digests (pending writes of it included)."""
        self._pending.pop((jid, rel), None)
        self.forget_chunks(jid, rel)
        await self.flush()
        await self._write(lambda: self.db.execute("DELETE FROM items WHERE job=? AND rel=?", (jid, db_key(rel))))

    async def kept_for_resume(self, jid: str) -> tuple[int, int]:
        """(items, bytes) the target holds for unfinished items of ``jid`` (part files, uploads in progress)."""
        await self.flush()
        row = await self._run(lambda: self.db.execute(
            "SELECT count(*), sum(offset) FROM items WHERE job=? AND state!='done' AND remote IS NOT NULL "
            "AND offset>0", (jid,)).fetchone())
        return int(row[0] or 0), int(row[1] or 0)

    async def record(self, jid: str, rel: str, **fields: Any) -> None:
        """Queue an update of the item row (``size`` and ``mtime_ns`` needed on first record)."""
        if self.broken is not None:
            return
        unknown = set(fields) - set(ITEM_FIELDS)
        if unknown:
            raise ValueError(f"unknown journal fields {unknown}")
        self._pending.setdefault((jid, rel), {}).update(fields)
        await self._maybe_flush()

    # -- chunk digests ----------------------------------------------------------------------------------
    async def record_chunk(self, jid: str, rel: str, offset: int, length: int, digest: str) -> None:
        """Queue the digest of ``[offset, offset + length)`` of the item, which the target confirmed."""
        if self.broken is not None:
            return
        self._chunks[(jid, rel, offset)] = (length, digest)
        await self._maybe_flush()

    def forget_chunks(self, jid: str, rel: str, start: int = 0) -> None:
        """Drop the chunk digests of the item that reach past ``start`` (all of them with 0); queued."""
        for key in [k for k, (n, _) in self._chunks.items() if k[:2] == (jid, rel) and k[2] + n > start]:
            del self._chunks[key]
        self._forget.append((jid, rel, start))

    async def chunks(self, jid: str, rel: str, batch: int = 256) -> AsyncIterator[list[ChunkRecord]]:
        """The item's chunk digests in offset order, ``batch`` at a time (pending ones committed first)."""
        await self.flush()
        after = -1
        key = db_key(rel)
        while True:
            rows = await self._run(lambda a=after: self.db.execute(  # type: ignore[misc]
                "SELECT offset, length, digest FROM chunks WHERE job=? AND rel=? AND offset>? "
                "ORDER BY offset LIMIT ?", (jid, key, a, batch)).fetchall())
            if not rows:
                return
            yield [(int(r[0]), int(r[1]), str(r[2])) for r in rows]
            after = rows[-1][0]

    # -- commits --------------------------------------------------------------------------------------
    async def _maybe_flush(self) -> None:
        if (len(self._pending) + len(self._chunks) >= self.BATCH
                or time.monotonic() - self._last_flush >= self.INTERVAL):
            await self.flush()

    async def flush(self) -> None:
        """Commit every queued row in one transaction; returns once they (and any queued earlier) are
        committed. Dropped when the journal is :attr:`broken`."""
        if self.broken is not None:
            self._pending, self._chunks, self._forget = {}, {}, []
            return
        if not self._pending and not self._chunks and not self._forget and not self._committing.locked():
            return
        async with self._committing:
            await self._commit()

    async def _commit(self) -> None:
        if not self._pending and not self._chunks and not self._forget:
            return
        pending, self._pending = self._pending, {}
        chunks, self._chunks = self._chunks, {}
        forget, self._forget = self._forget, []
        self._last_flush = time.monotonic()

        def do() -> None:
            db = self.db
            db.execute("BEGIN")
            try:
                for jid, rel, start in forget:  # before the inserts: a later chunk queued after it survives
                    db.execute("DELETE FROM chunks WHERE job=? AND rel=? AND offset+length>?",
                               (jid, db_key(rel), start))
                db.executemany(
                    "INSERT INTO chunks(job, rel, offset, length, digest) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(job, rel, offset) DO UPDATE SET length=excluded.length, digest=excluded.digest",
                    [(jid, db_key(rel), off, n, d) for (jid, rel, off), (n, d) in chunks.items()])
                for (jid, rel), f in pending.items():
                    row = {k: (dumps(v) if k in ("remote", "digests") and v is not None else v)
                           for k, v in f.items()}
                    if not row:
                        continue
                    ins = {"size": 0, "mtime_ns": 0, "state": "queued", **row}
                    sets = ", ".join(f"{k}=excluded.{k}" for k in row)
                    db.execute(
                        f"INSERT INTO items(job, rel, {', '.join(ins)}) VALUES (?, ?, {', '.join('?' * len(ins))}) "
                        f"ON CONFLICT(job, rel) DO UPDATE SET {sets}",
                        (jid, db_key(rel), *ins.values()))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a COMMIT that failed on a full disk was rolled back by SQLite
                    db.execute("ROLLBACK")
                raise
            self.commits += 1

        with anyio.CancelScope(shield=True):
            await self._write(do)

    async def close(self) -> None:
        """Flush, close the database and release every job lock this journal holds."""
        with anyio.CancelScope(shield=True):
            try:  # once: each opener closes its journal once (a second close fails on :attr:`db`)
                await self.flush()
                db, self._db = self.db, None
                await self._run(db.close)
            finally:
                for jid in list(self._locks):
                    await self.release_job(jid)
