"""The one mapping of transport failures into :mod:`asyncdepo.errors` (the error boundary).

Everything that talks to a server turns what went wrong into the errors tree here, once, so the retry loop
(:mod:`asyncdepo.transport.pacer`), the engine and the CLI only ever look at classes:

* :func:`status_error` — an HTTP status (and the archive's own message) -> the tree:
  401/403 AuthError, 409 ConflictError, 413 QuotaError, other 4xx RemoteValidationError, 408/425/429/5xx
  TransientError (RateLimitedError when the server named a wait). An adapter states its archive's
  quirks with ``refine`` (gypsum answers a full quota with 400 "quota"; tus's 409 means "another offset")
  and its advice with ``hints``; it never writes a status table of its own.
* :func:`message_of` — the archive's own words from an error body: JSON ``message``/``error``/``detail``/
  ``reason``, an S3-style XML ``Code: Message``, an HTML error page's title (or its text without tags), else
  the start of the text. Adapters whose archive words it differently pass a small parser of their own to
  :func:`status_error`'s callers instead.
* :func:`connection_error` and :func:`boundary` — network failures (aiohttp errors, timeouts, socket and TLS
  errors) -> TransientError, an untrusted certificate -> PermanentError with a hint. A DepoError raised by
  our own code underneath (a request body that found its file changed) comes out as itself.
* :func:`parse_retry_after` — Retry-After as seconds (delta or HTTP date).
* :func:`disk_error` — a failed write to a local disk (a file:// target, a pull's part file): a full disk
  (ENOSPC, EDQUOT) -> DiskFullError with the space still free, which is not retried (a full disk does not
  empty itself between two attempts); a write the file system refuses for good (a name too long, no
  permission, a read-only file system, :data:`DISK_REFUSED`) -> PermanentError; anything else (an I/O error,
  a vanished mount) -> TransientError.

S3's XML errors are parsed in :mod:`asyncdepo.transport.s3errors`, ascp's exit and FASP codes in
:mod:`asyncdepo.transport.ascp.faspmgr`; both build on :func:`status_error` and the tree.

Messages never carry secrets: they name the request by method and path (``what``), never headers, and
URLs that appear in a library's message lose their query (a presigned URL's query is a credential).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import http.client
import os
import re
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime

import orjson

from asyncdepo.errors import (
    AuthError,
    ConflictError,
    DepoError,
    DiskFullError,
    PermanentError,
    QuotaError,
    RateLimitedError,
    RemoteValidationError,
    TransferError,
    TransientError,
)

Refine = Callable[[int, str], type[TransferError] | None]

_QUERY = re.compile(r"(https?://[^\s?'\"]*)\?[^\s'\"]*")
_XML = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("Code", "Message")}
_HTML = re.compile(r"\s*<(!doctype|html)", re.IGNORECASE)
_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
CERT_HINT = "check the server URL; a private CA goes in SSL_CERT_FILE (or the target's own CA setting)"


def parse_retry_after(value: str | float | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return max(0.0, float(value))
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return max(0.0, (when - _dt.datetime.now(_dt.UTC)).total_seconds())


def scrub(text: str) -> str:
    """``text`` with the query of every URL in it removed (a signed URL's query is a credential)."""
    return _QUERY.sub(r"\1?...", text)


def message_of(raw: bytes, limit: int = 300) -> str:
    """The server's own error text from a body (see the module docstring); "" when there is none."""
    if not raw:
        return ""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:4000].decode("utf-8", "replace")
        xml = [m.group(1).strip() for rx in _XML.values() if (m := rx.search(text))]
        if xml:
            return ": ".join(xml)[:limit]
        if _HTML.match(text):  # a proxy's or web server's error page: its title, else its text without tags
            title = _TITLE.search(text)
            text = title.group(1) if title else _TAG.sub(" ", text)
        return scrub(" ".join(text.split()))[:limit]
    if isinstance(body, dict):
        for key in ("message", "error", "detail", "reason"):
            value = body.get(key)
            if value:
                return scrub(str(value))[:limit]
    return ""


def status_error(status: int, message: str = "", *, what: str, retry_after: str | float | None = None,
                 refine: Refine | None = None, hints: Mapping[type[DepoError], str] | None = None) -> TransferError:
    """An HTTP status as an error of the tree (see the module docstring), its text
    ``"{what} failed with HTTP {status}: {message}"``.

    :param refine: ``refine(status, message)`` may return a more precise class for an archive's quirk; None
        keeps the generic choice.
    :param hints: advice attached to the error by class (the first class the error is an instance of).
    """
    text = f"{what} failed with HTTP {status}: {message}".rstrip(": ")
    wait = parse_retry_after(retry_after)
    cls: type[TransferError] | None = refine(status, message) if refine is not None else None
    err: TransferError
    if cls is None and status in (429, 503) and wait is not None or cls is RateLimitedError:
        err = RateLimitedError(text, retry_after=wait, status=status)
    elif cls is not None:
        err = cls(text, status=status)
    elif status in (408, 425, 429) or status >= 500:
        err = TransientError(text, status=status)
    elif status in (401, 403):
        err = AuthError(text, status=status)
    elif status == 409:
        err = ConflictError(text, status=status)
    elif status == 413:
        err = QuotaError(text, status=status)
    else:
        err = RemoteValidationError(text, status=status)
    for kind, hint in (hints or {}).items():
        if isinstance(err, kind):
            err.hint = hint
            break
    return err


def untrusted(what: str, exc: ssl.SSLCertVerificationError) -> PermanentError:
    """A TLS certificate the client does not trust, as a permanent error that says what to check."""
    why = getattr(exc, "verify_message", None) or exc.strerror or "verification failed"
    return PermanentError(f"{what}: the server's TLS certificate is not trusted ({why})", hint=CERT_HINT)


def is_transport_failure(exc: BaseException) -> bool:
    """True for the exceptions a network transport raises (socket/OS errors, timeouts, TLS, http.client's
    protocol errors, aiohttp)."""
    if isinstance(exc, (OSError, TimeoutError, ssl.SSLError, EOFError, http.client.HTTPException)):
        return True
    aiohttp = sys.modules.get("aiohttp")  # never imported here: an aiohttp error implies aiohttp is loaded
    return aiohttp is not None and isinstance(exc, aiohttp.ClientError)


def connection_error(exc: BaseException, what: str) -> DepoError:
    """A network-level failure of the request ``what`` as an error of the tree (see the module docstring)."""
    cause: BaseException | None = exc
    while cause is not None:  # our own body raised underneath (the file changed while it was read)
        if isinstance(cause, DepoError):
            return cause
        cause = cause.__cause__ or cause.__context__
    cert = _certificate_failure(exc)
    if cert is not None:
        return untrusted(what, cert)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientResponseError):
        return status_error(exc.status, exc.message, what=what)
    if isinstance(exc, TimeoutError):
        return TransientError(f"{what}: timed out")
    detail = getattr(exc, "strerror", None) or scrub(str(exc))
    kind = type(exc).__name__
    return TransientError(f"{what}: {kind}: {detail}" if detail and detail != kind else f"{what}: {kind}")


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind ``exc``: itself, the one aiohttp's ClientConnectorCertificateError wraps
    (looked at first: that class is itself an SSLCertVerificationError, without ``verify_message``), or one
    a library raised ``exc`` from (urllib3's SSLError)."""
    cause: BaseException | None = exc
    while cause is not None:
        inner = getattr(cause, "certificate_error", None)
        if isinstance(inner, ssl.SSLCertVerificationError):
            return inner
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def boundary(what: str) -> Iterator[None]:
    """Map transport failures raised inside the block (see :func:`connection_error`); errors of the tree
    and everything else pass unchanged. Usable around ``await`` in coroutines."""
    try:
        yield
    except DepoError:
        raise
    except Exception as exc:
        if not is_transport_failure(exc):
            raise
        raise connection_error(exc, what) from None


#: errno values that mean the disk is full (no space left, or the user's quota used up)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: errno values of a write the file system refuses for good: a name too long, no permission, a read-only
#: file system, a file where a folder must be (or the other way round); trying again cannot change them
DISK_REFUSED = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                          errno.EISDIR})


def free_space(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (None when unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_error(what: str, exc: OSError, where: str | os.PathLike[str]
               ) -> DiskFullError | PermanentError | TransientError:
    """A failed local write as an error of the tree (see the module docstring); ``where`` is a path on the
    disk written to (for the free space and the message). The message names the file, never more."""
    if exc.errno in DISK_FULL:
        free = free_space(where)
        return DiskFullError(f"{what}: {exc.strerror}", path=os.fspath(where), free=free)
    if exc.errno in DISK_REFUSED:
        return PermanentError(f"{what}: {exc.strerror}")
    return TransientError(f"{what}: {exc.strerror or type(exc).__name__}")
