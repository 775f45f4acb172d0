"""The exception tree of asyncdepo.

Every error a user can meet is one of these. Transport failures are translated into them once, at the
boundary (:mod:`asyncdepo.transport.failures` for HTTP statuses and network errors,
:mod:`asyncdepo.transport.s3errors` for S3's XML errors, :mod:`asyncdepo.transport.ascp.faspmgr` for ascp's
exit and FASP codes), so the retry loop, the engine and the CLI only ever look at the class.
``tests/unit/test_errors.py`` holds this tree against the classes and checks that each is raised::

    DepoError                           base; ``str(e)`` is a one-line message a person can act on
    ├── UsageError                      bad input found before any transfer (arguments, paths, metadata)
    │   └── ValidationError             metadata refused locally; ``field`` names the offending field
    ├── SourceError                     the local side: missing/unreadable file, file changed while read
    │   ├── SourceChangedError          size or mtime moved during the read; the item is re-sent (transient)
    │   └── SourceVanishedError         the file was deleted before it was sent in full ("source vanished")
    ├── TransferError                   something went wrong talking to a target
    │   ├── TransientError              worth retrying (network, 5xx, 429, timeouts, stalls)
    │   │   ├── RateLimitedError        429/503 carrying a Retry-After (``retry_after`` seconds)
    │   │   └── OffsetMismatchError     the server's confirmed offset differs from ours; resume from it
    │   └── PermanentError              retrying will not help (auth, validation, quota, conflict)
    │       ├── AuthError               credentials missing/invalid/forbidden
    │       ├── QuotaError              the archive refuses because of a storage limit
    │       ├── ConflictError           the server already has this (duplicate, locked, exists)
    │       └── RemoteValidationError   the archive refused the request's content (400)
    ├── IntegrityError                  a digest or size reported by the target differs from ours (never a warning)
    │   └── BodyDamagedError            the server says the body it received was damaged (a TransferError too)
    ├── DiskFullError                   the local disk (a file:// target, a pull's directory) is full: ends the run
    ├── JobLockedError                  another process runs this job now (``holder``: pid, host, since when)
    └── Cancelled                       the run was interrupted (Ctrl-C, SIGTERM); the journal holds what is needed
                                        to resume (raised by the CLI's runner once cleanup is done: exit 130)

``is_transient(exc)`` says whether an exception is worth another try: TransientError, SourceChangedError and
IntegrityError are (a corrupt copy is re-sent), everything else is not. The retry loop's classifier
(:func:`asyncdepo.transport.pacer.should_retry`) is built on the same rule.

Messages never contain secrets: adapters build them from the archive's own ``error``/``detail``/``reason``
text and the request's method and path, never from headers or query strings (presigned URLs carry
credentials in their query).
"""

from __future__ import annotations


class DepoError(Exception):
    """Base of every asyncdepo error; ``str()`` is meant for a person."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def describe(self) -> str:
        """The message followed by what to do about it, when known."""
        text = str(self)
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class UsageError(DepoError):
    """Bad input found before any transfer started."""


class ValidationError(UsageError):
    """Metadata refused locally; ``field`` names the field at fault."""

    def __init__(self, field: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{field}: {message}", hint=hint)
        self.field = field


class SourceError(DepoError):
    """A local file is missing, unreadable or not a regular file."""


class SourceChangedError(SourceError):
    """A file's size or mtime changed while it was being read; it will be re-sent from zero."""


class SourceVanishedError(SourceError):
    """A file was deleted after the walk found it (or since an earlier run of the job started it)."""


class TransferError(DepoError):
    """A failure talking to a target. ``status`` is the HTTP status (or exit code) when there is one."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class TransientError(TransferError):
    """Worth retrying: network errors, 5xx, timeouts, stalls."""


class RateLimitedError(TransientError):
    """The server asked us to wait ``retry_after`` seconds (429 or 503 with Retry-After)."""

    def __init__(self, message: str, *, retry_after: float | None, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class OffsetMismatchError(TransientError):
    """The server holds a different number of bytes than we assumed; resume from ``offset``."""

    def __init__(self, message: str, *, offset: int | None = None, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.offset = offset


class PermanentError(TransferError):
    """Retrying will not help; the message says what to do."""


class AuthError(PermanentError):
    """Credentials missing, invalid or not allowed to do this."""


class QuotaError(PermanentError):
    """The archive refuses the upload because of a storage limit."""


class ConflictError(PermanentError):
    """The archive already has this (duplicate, exists, locked)."""


class RemoteValidationError(PermanentError):
    """The archive refused the request's content."""


class IntegrityError(DepoError):
    """A digest or size the target reported differs from what was computed while reading."""


class BodyDamagedError(IntegrityError, TransferError):
    """The server reports that the request body it received is damaged (a corrupt stream, a digest of the
    body that differs: S3 BadDigest, tus 460). Retried with a fresh read, like any IntegrityError."""


class DiskFullError(DepoError):
    """No space left (ENOSPC) or quota exceeded (EDQUOT) on a local disk we write to. Not retried: the run
    stops, part files are kept for resume. ``free`` is the space still available (bytes, when known)."""

    def __init__(self, message: str, *, path: str = "", free: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.free = free


class JobLockedError(DepoError):
    """Another process holds this job's lock; ``holder`` says which (pid, host, since when)."""

    def __init__(self, message: str, *, holder: dict[str, object] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.holder = dict(holder or {})


class Cancelled(DepoError):
    """The run was interrupted; the journal holds what is needed to resume."""


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` should be retried (per request, per item or per run)."""
    return isinstance(exc, (TransientError, SourceChangedError, IntegrityError))
