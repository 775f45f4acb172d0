"""One job, one runner: an exclusive lock per job that dies with its process.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on a file beside the journal, ``<journal>.<job id>.lock``. The kernel
drops a flock when the last descriptor of it closes, which happens when the process exits however it exits
(``kill -9`` included), so a crashed run never leaves its job locked and nobody has to clean up stale locks.
flock, not ``fcntl`` record locks: a record lock belongs to the process, so two runs of one job inside one
process (a test, a program driving the engine twice) would not exclude each other.

The holder writes ``{"pid", "host", "since"}`` into the file (when the disk has room for it); a run that finds
the job locked reads it back for its message (:class:`~asyncdepo.errors.JobLockedError`). Each job has its own
file, so different jobs that share one journal run side by side.

Releasing unlinks the file while still holding the lock, so lock files do not pile up. That opens a race (a
second run may open the old file just before it is unlinked and then lock a file that no longer has a
name); the acquirer closes that gap by checking, once it holds the lock, that the path still names the file
it locked, and starting again when it does not. The descriptor is close-on-exec, so a child process (ascp)
never inherits the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from asyncdepo.errors import JobLockedError

#: how often the acquirer starts again after losing the unlink race above (each round is one open + flock)
_ROUNDS = 8


def lock_path(journal: Path, job: str) -> Path:
    """Where the lock of ``job`` lives: beside the journal ``journal``."""
    return journal.with_name(f"{journal.name}.{job}.lock")


def describe_holder(holder: dict[str, object]) -> str:
    """``pid 123 on host h since 2026-01-02 10:11:12`` (whatever of it is known)."""
    parts = []
    if holder.get("pid"):
        parts.append(f"pid {holder['pid']}")
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    since = holder.get("since")
    if isinstance(since, (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)))
    return " ".join(parts) or "another process (it has not said which yet)"


class JobLock:
    """A held lock; :meth:`release` gives it back. Blocking calls: use from a worker thread."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path, job: str) -> JobLock:
        """Take the lock at ``path`` without waiting.

        :raises JobLockedError: another open file description holds it (the message names the holder).
        :raises OSError: the lock file cannot be created (the journal's directory is not writable).
        """
        for _ in range(_ROUNDS):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise JobLockedError(
                    f"job {job} is already running: {describe_holder(holder)}", holder=holder,
                    hint="wait for it to finish (or stop it); a run that was killed releases the job by itself",
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                here = os.stat(path)
            except FileNotFoundError:
                here = None
            mine = os.fstat(fd)
            if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)  # the holder unlinked it between our open and our flock: try the new file
                continue
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, record.encode(), 0)
            except OSError:
                # a full disk: the record only names the holder in another run's refusal (which then says
                # "it has not said which"); the lock is held all the same, and the journal beside it reports
                # the full disk as its own error
                pass
            return cls(path, fd)
        raise JobLockedError(f"job {job}: its lock file {path} keeps being replaced by another process",
                             hint="another run of this job is starting and stopping; try again")

    def release(self) -> None:
        """Unlink the lock file (still holding the lock, see the module docstring) and close it. Called once:
        the journal drops the lock from its table before it calls this."""
        try:
            os.unlink(self.path)
        except OSError:
            pass  # already gone, or a read-only directory: the closed descriptor releases the lock anyway
        os.close(self._fd)


def _read_holder(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
