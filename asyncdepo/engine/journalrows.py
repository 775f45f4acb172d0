"""How the journal stores its rows: the schema (with the columns added to older journals when they are
opened), the item fields, and the encoding of names and JSON values.

File names: a name that is not UTF-8 (Linux allows any bytes but ``/`` and NUL) reaches us as a ``str`` with
surrogate escapes (``os.fsdecode``); such a name is stored as a BLOB of its bytes, every other name as TEXT,
so old journals keep working and every name Linux allows can be journaled.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
    argv TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, updated REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'running', runs INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS items (
    job TEXT NOT NULL, rel TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL, offset INTEGER NOT NULL DEFAULT 0, remote TEXT, digests TEXT, error TEXT,
    transient INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    walked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, rel)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_state ON items(job, state);
CREATE TABLE IF NOT EXISTS chunks (
    job TEXT NOT NULL, rel TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    digest TEXT NOT NULL, PRIMARY KEY (job, rel, offset)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_state (job TEXT PRIMARY KEY, data TEXT NOT NULL);
"""

# columns added since the first release: (table, column, definition); added to older journals on open
MIGRATIONS = (
    ("items", "walked", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "runs", "INTEGER NOT NULL DEFAULT 0"),
)

ITEM_FIELDS = ("size", "mtime_ns", "state", "offset", "remote", "digests", "error", "transient", "attempts",
               "walked")


def db_key(text: str) -> str | bytes:
    """How a name is stored: TEXT when it is valid UTF-8, else a BLOB of its bytes (module docstring)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")
    return text


def db_text(value: str | bytes) -> str:
    """A stored name back as the ``str`` the walk gives (surrogate escapes for bytes that are not UTF-8)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def dumps(value: Any) -> str:
    """JSON text of ``value``; a name that is not UTF-8 (surrogate escapes) is written as ``\\udcXX``
    escapes, which orjson refuses to write and :func:`loads` reads back."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def loads(text: str) -> Any:
    """The value of JSON text written by :func:`dumps`."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # lone surrogate escapes (see dumps)
