"""SQLite (WAL) resume journal: jobs, items, job-level adapter state; batched commits.

Default location ``$XDG_STATE_HOME/asyncdepo/journal.sqlite`` (``~/.local/state/...``), ``--journal``
overrides. Tables:

* ``jobs(id, kind, source, target, argv, created, updated, state)`` — a job's id is derived from
  (kind, source, target), so re-running the same push finds the same job; ``argv`` is the secret-free
  command that resumes it.
* ``items(job, rel, size, mtime_ns, state, offset, remote, digests, error, transient, attempts)`` —
  ``state`` is one of queued, partial, done, failed, skipped; ``remote`` is the adapter's JSON resume
  state (upload location, UploadId and parts), never a secret.
* ``job_state(job, data)`` — the adapter's job-level JSON state (upload tokens, sessions ids).

Writes are queued in memory and committed in batches (512 rows or 0.5 s), in WAL mode with
``synchronous=NORMAL``: a commit appends to the WAL without an fsync, so 10,000 small files cost a few
dozen commits, and a SIGKILL loses at most the last half second — which the resume path tolerates,
because every adapter asks the server what it has. ``flush()`` forces a commit; the engine calls it
before the first byte of a multi-chunk item is sent, so its upload location survives a crash.

All SQLite calls run in one worker thread (a CapacityLimiter of 1), never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

import anyio
import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
    argv TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, updated REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'running');
CREATE TABLE IF NOT EXISTS items (
    job TEXT NOT NULL, rel TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL, offset INTEGER NOT NULL DEFAULT 0, remote TEXT, digests TEXT, error TEXT,
    transient INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, rel)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_state ON items(job, state);
CREATE TABLE IF NOT EXISTS job_state (job TEXT PRIMARY KEY, data TEXT NOT NULL);
"""

ITEM_FIELDS = ("size", "mtime_ns", "state", "offset", "remote", "digests", "error", "transient", "attempts")

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


def default_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "asyncdepo" / "journal.sqlite"


def job_id(kind: str, source: str, target: str) -> str:
    """A stable id for (kind, source, target): the same push gets the same job."""
    return hashlib.sha256(f"{kind}\0{source}\0{target}".encode()).hexdigest()[:12]


class Journal:
    """Open with ``await Journal.open(path)``; close with ``await journal.close()`` (flushes)."""

    BATCH = 512
    INTERVAL = 0.5

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}
        self._last_flush = time.monotonic()
        self._limiter = anyio.CapacityLimiter(1)
        self.commits = 0

    @classmethod
    async def open(cls, path: Path | None = None) -> Journal:
        j = cls(Path(path) if path else default_path())
        await j._run(j._open_sync)
        return j

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(SCHEMA)
        self._db = db

    async def _run(self, fn: Callable[[*_Args], _T], *args: *_Args) -> _T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "journal is closed"
        return self._db

    # -- jobs -----------------------------------------------------------------------------------------
    async def open_job(self, kind: str, source: str, target: str, argv: Sequence[str] = ()) -> tuple[str, bool]:
        """Create or find the job for (kind, source, target); returns (id, existed)."""
        jid = job_id(kind, source, target)

        def do() -> bool:
            now = time.time()
            row = self.db.execute("SELECT id FROM jobs WHERE id=?", (jid,)).fetchone()
            if row:
                self.db.execute("UPDATE jobs SET updated=?, state='running', argv=? WHERE id=?",
                                (now, orjson.dumps(list(argv)).decode(), jid))
            else:
                self.db.execute(
                    "INSERT INTO jobs(id, kind, source, target, argv, created, updated) VALUES (?,?,?,?,?,?,?)",
                    (jid, kind, source, target, orjson.dumps(list(argv)).decode(), now, now))
            return row is not None

        existed = await self._run(do)
        return jid, existed

    async def set_job(self, jid: str, state: str) -> None:
        await self._run(lambda: self.db.execute("UPDATE jobs SET state=?, updated=? WHERE id=?",
                                                (state, time.time(), jid)))

    async def job(self, jid: str) -> dict[str, Any] | None:
        """The job row (prefix match on the id), or None."""

        def do() -> dict[str, Any] | None:
            rows = self.db.execute("SELECT id, kind, source, target, argv, created, updated, state FROM jobs "
                                   "WHERE id LIKE ? ORDER BY updated DESC", (jid + "%",)).fetchall()
            if len(rows) != 1:
                return None
            r = rows[0]
            return {"id": r[0], "kind": r[1], "source": r[2], "target": r[3], "argv": orjson.loads(r[4]),
                    "created": r[5], "updated": r[6], "state": r[7]}

        return await self._run(do)

    async def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        def do() -> list[dict[str, Any]]:
            rows = self.db.execute(
                "SELECT j.id, j.kind, j.source, j.target, j.updated, j.state, "
                "(SELECT count(*) FROM items i WHERE i.job=j.id AND i.state='done'), "
                "(SELECT count(*) FROM items i WHERE i.job=j.id) FROM jobs j ORDER BY j.updated DESC LIMIT ?",
                (limit,)).fetchall()
            return [{"id": r[0], "kind": r[1], "source": r[2], "target": r[3], "updated": r[4], "state": r[5],
                     "done": r[6], "items": r[7]} for r in rows]

        return await self._run(do)

    async def status(self, jid: str, failures: int = 50) -> dict[str, Any]:
        """Per-state counts and bytes, and up to ``failures`` failed items with their reasons."""

        def do() -> dict[str, Any]:
            counts = {r[0]: {"files": r[1], "bytes": r[2] or 0} for r in self.db.execute(
                "SELECT state, count(*), sum(size) FROM items WHERE job=? GROUP BY state", (jid,))}
            failed = [{"rel": r[0], "error": r[1], "transient": bool(r[2])} for r in self.db.execute(
                "SELECT rel, error, transient FROM items WHERE job=? AND state='failed' ORDER BY rel LIMIT ?",
                (jid, failures))]
            return {"counts": counts, "failures": failed}

        return await self._run(do)

    async def job_state(self, jid: str) -> dict[str, Any]:
        def do() -> dict[str, Any]:
            row = self.db.execute("SELECT data FROM job_state WHERE job=?", (jid,)).fetchone()
            return orjson.loads(row[0]) if row else {}

        return await self._run(do)

    async def set_job_state(self, jid: str, data: dict[str, Any]) -> None:
        await self._run(lambda: self.db.execute(
            "INSERT INTO job_state(job, data) VALUES (?, ?) ON CONFLICT(job) DO UPDATE SET data=excluded.data",
            (jid, orjson.dumps(data).decode())))

    # -- items ----------------------------------------------------------------------------------------
    async def lookup(self, jid: str, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Journal rows for ``rels`` (pending writes included), keyed by rel."""
        rels = list(rels)

        def do() -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for i in range(0, len(rels), 500):
                part = rels[i:i + 500]
                q = ("SELECT rel, size, mtime_ns, state, offset, remote, digests, error, transient, attempts "
                     f"FROM items WHERE job=? AND rel IN ({','.join('?' * len(part))})")
                for r in self.db.execute(q, (jid, *part)):
                    out[r[0]] = {"size": r[1], "mtime_ns": r[2], "state": r[3], "offset": r[4],
                                 "remote": orjson.loads(r[5]) if r[5] else None,
                                 "digests": orjson.loads(r[6]) if r[6] else {}, "error": r[7],
                                 "transient": bool(r[8]), "attempts": r[9]}
            return out

        found = await self._run(do)
        for rel in rels:
            p = self._pending.get((jid, rel))
            if p is not None:
                row = found.setdefault(rel, {})
                row.update({k: v for k, v in p.items()})
        return found

    async def failed_transient(self, jid: str, limit: int = 100_000) -> list[str]:
        await self.flush()
        return await self._run(lambda: [r[0] for r in self.db.execute(
            "SELECT rel FROM items WHERE job=? AND state='failed' AND transient=1 LIMIT ?", (jid, limit))])

    async def record(self, jid: str, rel: str, **fields: Any) -> None:
        """Queue an update of the item row (``size`` and ``mtime_ns`` needed on first record)."""
        unknown = set(fields) - set(ITEM_FIELDS)
        if unknown:
            raise ValueError(f"unknown journal fields {unknown}")
        self._pending.setdefault((jid, rel), {}).update(fields)
        if len(self._pending) >= self.BATCH or time.monotonic() - self._last_flush >= self.INTERVAL:
            await self.flush()

    async def flush(self) -> None:
        """Commit every queued row in one transaction."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._last_flush = time.monotonic()

        def do() -> None:
            db = self.db
            db.execute("BEGIN")
            try:
                for (jid, rel), f in pending.items():
                    row = {k: (orjson.dumps(v).decode() if k in ("remote", "digests") and v is not None else v)
                           for k, v in f.items()}
                    if not row:
                        continue
                    ins = {"size": 0, "mtime_ns": 0, "state": "queued", **row}
                    sets = ", ".join(f"{k}=excluded.{k}" for k in row)
                    db.execute(
                        f"INSERT INTO items(job, rel, {', '.join(ins)}) VALUES (?, ?, {', '.join('?' * len(ins))}) "
                        f"ON CONFLICT(job, rel) DO UPDATE SET {sets}",
                        (jid, rel, *ins.values()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.commits += 1

        with anyio.CancelScope(shield=True):
            await self._run(do)

    async def close(self) -> None:
        if self._db is None:
            return
        with anyio.CancelScope(shield=True):
            await self.flush()
            db, self._db = self._db, None
            await self._run(db.close)
