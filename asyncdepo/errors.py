"""The exception tree of asyncdepo.

Every error a user can meet is one of these; adapters translate HTTP statuses, SDK errors and ascp exit
codes into them at their boundary, so the engine and the CLI only ever look at the class::

    DepoError                      base; ``str(e)`` is a one-line message a person can act on
    ├── UsageError                 bad input found before any transfer (arguments, paths, metadata)
    │   └── ValidationError        metadata refused locally; ``field`` names the offending field
    ├── SourceError                the local side: missing/unreadable file, file changed while read
    │   ├── SourceChangedError     size or mtime moved during the read; the item is re-sent (transient)
    │   └── SourceVanishedError    the file was deleted before it was sent in full ("source vanished")
    ├── TransferError              something went wrong talking to a target
    │   ├── TransientError         worth retrying (network, 5xx, 429, timeouts, stalls)
    │   │   ├── RateLimitedError   429/503 carrying a Retry-After (``retry_after`` seconds)
    │   │   └── OffsetMismatchError the server's confirmed offset differs from ours; resume from it
    │   └── PermanentError         retrying will not help (auth, validation, quota, conflict)
    │       ├── AuthError          credentials missing/invalid/forbidden
    │       ├── QuotaError         the archive refuses because of a storage limit
    │       ├── ConflictError      the server already has this (duplicate, locked, exists)
    │       └── RemoteValidationError  the archive refused the request's content (400)
    ├── IntegrityError             a digest or size reported by the target differs from ours (never a warning)
    │   └── BodyDamagedError       the server says the body it received is damaged (a TransferError too)
    ├── DiskFullError              the local disk (a file:// target, a pull's directory) is full; ends the run
    ├── JobLockedError             another process runs this job now (``holder``: pid, host, since when)
    └── Cancelled                  the run was interrupted (Ctrl-C); the journal holds what is needed to resume

``is_transient(exc)`` is the one place that decides whether an exception is retried: TransientError,
SourceChangedError and IntegrityError are retried (a corrupt copy is re-sent), everything else is not.

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


def http_error(
    status: int,
    message: str,
    *,
    retry_after: float | None = None,
    what: str = "request",
) -> TransferError:
    """Map an HTTP status to the tree, with ``message`` taken from the archive's error body.

    401/403 -> AuthError, 409 -> ConflictError, 413 -> QuotaError, 400/404/405/412/415/422 ->
    RemoteValidationError, 408/425/429/5xx -> transient (RateLimitedError when Retry-After was given).
    """
    text = f"{what} failed with HTTP {status}: {message}".rstrip(": ")
    if status in (429, 503) and retry_after is not None:
        return RateLimitedError(text, retry_after=retry_after, status=status)
    if status in (408, 425, 429) or status >= 500:
        return TransientError(text, status=status)
    if status in (401, 403):
        return AuthError(text, status=status)
    if status == 409:
        return ConflictError(text, status=status)
    if status == 413:
        return QuotaError(text, status=status)
    return RemoteValidationError(text, status=status)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import datetime as _dt
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return max(0.0, (when - _dt.datetime.now(_dt.UTC)).total_seconds())
