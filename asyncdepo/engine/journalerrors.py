"""What a failure of the journal's SQLite means to the user, as the error a run reports: its disk is full
(:func:`full`, naming the journal and the space free), another process holds it past the busy timeout (worth
another try), or the path names no journal this run can use (:func:`unusable`)."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from asyncdepo.errors import DiskFullError, TransientError, UsageError
from asyncdepo.transport.failures import disk_error


def disk_full(exc: sqlite3.Error) -> bool:
    """SQLite's answer when the disk under the journal (or its WAL) is full."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def failed(path: Path, exc: sqlite3.Error) -> DiskFullError | TransientError | UsageError:
    """What a failed open (of the journal or of a job) raises: its disk is full; it is locked by another
    process past the busy timeout (worth another try); or it is no journal this run can use."""
    if disk_full(exc):
        return full(path, exc)
    if "locked" in str(exc) or "busy" in str(exc):
        return TransientError(f"journal {path}: {exc}",
                              hint="another asyncdepo is creating or migrating it; try again")
    return unusable(path, exc)


def unusable(path: Path, exc: sqlite3.Error) -> UsageError:
    """The journal's path names no journal this run can use (not a database, a directory, read-only)."""
    return UsageError(f"journal {path} cannot be used: {exc}",
                      hint="give --journal the path of an asyncdepo journal (or of a new file) that this user "
                           "may write; a damaged journal can be moved away (its jobs then start afresh)")


def full(path: Path, exc: sqlite3.Error) -> DiskFullError:
    """The journal's disk is full, as the error the run reports (naming the journal and the space free)."""
    err = disk_error(f"journal {path}", OSError(errno.ENOSPC, str(exc)), path.parent)
    assert isinstance(err, DiskFullError)
    err.hint = ("free space on its disk (or give --journal a path on another) and run the same command "
                "again; files whose end it could not record are sent again")
    return err
