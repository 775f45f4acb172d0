"""A plain HTTP(S) GET of one file into a part file, run in a worker thread: receive, hash and write in one pass.

Why our own loop and not a library's: a download spends its time in three things that all release the GIL
-- ``recv_into``, the digests and ``write`` -- and this module does them in one worker thread per transfer,
one page-aligned 512 KiB block at a time (``recv(MSG_WAITALL)`` over plain TCP, TLS through memory BIOs:
:mod:`asyncdepo.transport.tlsbio`), over keep-alive connections (:mod:`asyncdepo.transport.httppool`). The
standard library's ``http.client`` does the protocol; this module adds redirects, Range resume, error mapping
(through :mod:`asyncdepo.transport.failures`), progress and cancellation.

Measured 2026-12-04 on ``benchmarks/bench_immport.py``'s set-up (300 x 4 MiB, md5 checked, ``--transfers 8``,
nginx's TLS in front of the simulator, and plain HTTP): the same ``asyncdepo pull immport --via https`` with
only this module's receive path swapped, each candidate alternated with this module in 5 pairs, whole-process
medians of the per-pair ratios (candidate / this module: above 1 is slower; 2 shared cores under heavy load):

=================================================  ================  ================
receive path                                       HTTPS: CPU, wall  plain: CPU, wall
=================================================  ================  ================
urllib3 ``PoolManager`` + ``readinto``, threads    1.37, 1.33        1.43, 1.81
aiohttp on the loop, a thread hop per 512 KiB      1.23, 1.32        1.28, 1.23
``xargs -P 8 curl`` (no lookups, no md5)           1.53, 1.72        1.40, 1.24
=================================================  ================  ================

Both library routes were more than 5 % slower, so this one stays. (Two earlier round-robin runs of all
of them with curl agreed: urllib3 +16-44 % CPU, aiohttp +14-29 %.)

Redirects: at most :data:`MAX_REDIRECTS`; a redirect to another origin (scheme, host or port) drops every
header that carries a credential (:func:`redirected_headers`), as curl and requests drop Authorization and
cookies. (aiohttp does the same for Authorization, Cookie and Proxy-Authorization on the adapters' own
sessions.)

Adapters offer it by returning a :class:`PlainGet` from ``Adapter.plain_get``; the pull engine then calls
:func:`fetch` instead of iterating ``Adapter.read``. Anything the adapter cannot express as a plain GET (a
signed request, a proxy) keeps using ``read``.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import mmap
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import anyio
import anyio.from_thread

from asyncdepo.contract import PlainGet
from asyncdepo.digests import MultiHash
from asyncdepo.errors import PermanentError, TransientError
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.failures import (
    DISK_FULL,
    connection_error,
    disk_error,
    is_transport_failure,
    message_of,
    status_error,
)
from asyncdepo.transport.httppool import STALE, ConnectionPool
from asyncdepo.transport.tlsbio import TLSStream, set_timeouts

T = TypeVar("T")
BLOCK = 1 << 19
MAX_REDIRECTS = 5
POOL = ConnectionPool(max_idle=32)  # shared by every transfer thread of the process
PROGRESS_EVERY = 0.2  # seconds between progress reports from a transfer thread
# headers that carry a credential: never sent to another origin after a redirect
CREDENTIAL = re.compile(r"authorization|cookie|token|secret|passw|api-?key|session|signature|credential", re.IGNORECASE)


@functools.cache
def _proxies() -> dict[str, str]:
    import urllib.request  # heavy (email, ...): only when a plain GET is about to run

    return urllib.request.getproxies()  # reads the whole environment: once per process


def proxied(url: str) -> bool:
    """True when the environment sends ``url`` through a proxy (then use the aiohttp route instead)."""
    parts = urlsplit(url)
    proxies = _proxies()
    if parts.scheme not in proxies:
        return False
    import urllib.request

    return not urllib.request.proxy_bypass(parts.hostname or "")


class _Stop:
    """Lets the event loop abort a transfer running in a thread: a flag plus the socket to shut down.

    The connection is attached while a transfer uses it and detached before it goes back to the pool, under
    a lock, so a late cancel can never shut down a connection another transfer has taken since.
    """

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._conn = conn
            if self.flag.is_set():
                raise TransientError("stopped")

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    def set(self) -> None:
        with self._lock:
            self.flag.set()
            sock = self._conn.sock if self._conn is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in the worker thread
                except OSError:
                    pass


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``, the port made explicit."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def redirected_headers(headers: dict[str, str], old: str, new: str) -> dict[str, str]:
    """The headers to send to ``new`` after ``old`` redirected there: all of them within one origin; to another
    origin (scheme, host or port) none that carries a credential (:data:`CREDENTIAL`: Authorization,
    Proxy-Authorization, Cookie, and any whose name speaks of a token, key, secret, password, session or
    signature), as curl and requests drop Authorization and cookies on a redirect to another host."""
    if origin(old) == origin(new):
        return headers
    return {k: v for k, v in headers.items() if not CREDENTIAL.search(k)}


def _where(url: str, spec: PlainGet) -> tuple[tuple[str, str, int | None], str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"{spec.what}: cannot fetch a {parts.scheme or 'relative'} URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.scheme, parts.hostname, parts.port), target


def _send(spec: PlainGet, where: tuple[str, str, int | None], target: str, headers: dict[str, str],
          stop: _Stop) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send the GET on a pooled connection (a fresh one if a reused one turns out closed)."""
    while True:
        conn, reused = POOL.take(*where, timeout=spec.timeout, ctx=spec.ssl_context)
        try:
            stop.attach(conn)
            conn.request("GET", target, headers=headers)
            return conn, conn.getresponse()
        except STALE:
            conn.close()
            if not reused:
                raise
        except BaseException:
            conn.close()
            raise


Where = tuple[str, str, "int | None"]


def _open(spec: PlainGet, offset: int, stop: _Stop) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse,
                                                              int, Where]:
    """Send the GET (following redirects); return the connection, the response, how many leading bytes to
    drop and where it went (for the connection pool)."""
    url = spec.url
    sent = dict(spec.headers)
    for _ in range(MAX_REDIRECTS + 1):
        where, target = _where(url, spec)
        headers = dict(sent)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        conn, resp = _send(spec, where, target, headers, stop)
        location = resp.getheader("Location")
        if resp.status in (301, 302, 303, 307, 308) and location:
            resp.read()
            conn.close()
            url, old = urljoin(url, location), url
            sent = redirected_headers(sent, old, url)
            continue
        if resp.status >= 400:
            detail = message_of(resp.read(1 << 16))
            conn.close()
            raise status_error(resp.status, detail, what=spec.what, retry_after=resp.getheader("Retry-After"))
        if not offset:
            return conn, resp, 0, where
        if resp.status == 200:
            return conn, resp, offset, where  # the server ignored Range: drop the prefix we already hold
        got = resp.getheader("Content-Range") or ""
        m = re.match(r"bytes (\d+)-", got)
        if resp.status != 206 or not m or int(m.group(1)) != offset:
            conn.close()
            raise TransientError(f"{spec.what}: asked for bytes from {offset}, got {resp.status} {got!r}")
        return conn, resp, 0, where
    raise PermanentError(f"{spec.what}: more than {MAX_REDIRECTS} redirects")


class _Sink:
    """Where the body goes: drop a prefix the server sent anyway, hash, append, report progress now and then."""

    def __init__(self, fd: int, hasher: MultiHash, on_bytes: Callable[[int], None], skip: int, part: Path) -> None:
        self.fd, self.hasher, self.on_bytes, self.skip = fd, hasher, on_bytes, skip
        self.part = part
        self.written = self.unreported = 0
        self.reported_at = time.monotonic()

    def put(self, data: memoryview | bytes) -> None:
        """Hash and append ``data``.

        :raises DiskFullError: the disk is full (not retried; the part file keeps what fit).
        """
        if self.skip:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
        if not data:
            return
        self.hasher.update(data)
        view = memoryview(data)
        try:
            while view:  # a write may be short (a disk filling up writes what fits first)
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise disk_error(f"write {self.part.name}", exc, self.part.parent) from None
        self.written += len(data)
        self.unreported += len(data)
        now = time.monotonic()
        if now - self.reported_at >= PROGRESS_EVERY:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self.unreported:
            self.on_bytes(self.unreported)
            self.unreported = 0
        self.reported_at = now or time.monotonic()


def _receive(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, view: memoryview, sink: _Sink,
             stop: _Stop, throttle: Callable[[int], None] | None = None) -> bool:
    """Read the whole body into ``sink``.

    With a Content-Length over plain TCP the socket is read directly, one ``recv(MSG_WAITALL)`` per block:
    the thread takes the GIL once per block instead of once per 64 KiB segment. Measured with eight
    transfers on 2 cores, the segment-by-segment route sometimes spent more time in the kernel handing the
    GIL around than receiving (1.7 s or 3.3 s for the same 1.26 GB); the block route stayed at 1.7-1.9 s.
    Over TLS (:class:`TLSStream`) each receive takes whatever ciphertext has arrived, up to a block, and
    decrypts it from memory.
    """
    left = resp.length
    sock = conn.sock
    if left is None or sock is None or isinstance(sock, ssl.SSLSocket):  # chunked (or an SSLSocket): http.client reads
        while not stop.flag.is_set():
            if throttle is not None:
                throttle(len(view))  # reading slower lets TCP flow control slow the sender
            n = resp.readinto(view)
            if not n:
                return True
            sink.put(view[:n])
        return False
    if left:
        if throttle is not None:
            throttle(min(left, len(view)))
        head = resp.fp.read1(min(left, len(view)))  # what http.client buffered behind the headers
        sink.put(head)
        left -= len(head)
    if isinstance(sock, TLSStream):
        while left and not stop.flag.is_set():
            want = min(len(view), left)
            if throttle is not None:
                throttle(want)
            n = sock.read_into(view, want)
            if not n:
                raise http.client.IncompleteRead(b"", left)
            sink.put(view[:n])
            left -= n
        return not left
    sock.settimeout(None)  # blocking, so MSG_WAITALL waits; the kernel enforces the read timeout instead
    set_timeouts(sock, conn.timeout if isinstance(conn.timeout, (int, float)) else None, send=False)
    while left and not stop.flag.is_set():
        if throttle is not None:
            throttle(min(len(view), left))
        n = sock.recv_into(view, min(len(view), left), socket.MSG_WAITALL)
        if not n:
            raise http.client.IncompleteRead(b"", left)
        sink.put(view[:n])
        left -= n
    return not left


class _BufferPool:
    """Page-aligned block buffers kept between transfers (a new mapping per file costs its page faults again);
    at most ``keep`` idle, so memory stays bounded by the transfers running at once."""

    def __init__(self, keep: int = 16) -> None:
        self._idle: list[memoryview] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self) -> memoryview:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return memoryview(mmap.mmap(-1, BLOCK))  # page-aligned: a bytearray reads several times slower (measured)

    def give(self, view: memoryview) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(view)


_BUFFERS = _BufferPool()


def fetch_sync(spec: PlainGet, offset: int, part: Path, hasher: MultiHash, on_bytes: Callable[[int], None],
               stop: _Stop, throttle: Callable[[int], None] | None = None) -> int:
    """Blocking: append the body from ``offset`` to ``part``, feeding ``hasher``; returns the bytes written.

    Every byte that arrived is written before an error propagates, so a retry resumes after it.
    """
    view = _BUFFERS.take()
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sink = _Sink(fd, hasher, on_bytes, 0, part)
    try:
        conn, resp, sink.skip, where = _open(spec, offset, stop)
        complete = False
        try:
            complete = _receive(resp, conn, view, sink, stop, throttle)
        finally:
            resp.close()
            stop.detach()
            if complete and not resp.will_close and not stop.flag.is_set():
                POOL.give(*where, conn, ctx=spec.ssl_context)  # keep-alive: the next GET skips connecting
            else:
                conn.close()
        if stop.flag.is_set():
            raise TransientError(f"{spec.what}: stopped")
        return sink.written
    except Exception as exc:
        if not is_transport_failure(exc):
            raise
        if isinstance(exc, BlockingIOError):  # a blocking socket whose SO_RCVTIMEO ran out says EAGAIN
            exc = TimeoutError("timed out")
        raise connection_error(exc, spec.what) from None
    finally:
        sink.flush()
        os.close(fd)
        _BUFFERS.give(view)  # nothing holds a slice of it now: the sink hashed and wrote each block at once


async def fetch(spec: PlainGet, offset: int, part: Path, hasher: MultiHash, on_bytes: Callable[[int], None],
                limiter: anyio.CapacityLimiter | None = None, *, then: Callable[[], T],
                bucket: TokenBucket | None = None) -> T:
    """Run :func:`fetch_sync`, then ``then()`` (checks, rename), in one worker thread; returns what ``then``
    returns. ``on_bytes`` is called on the event loop.

    Cancelling the caller shuts the socket down, so the thread ends at once instead of at the next byte.
    """
    loop = asyncio.get_running_loop()
    stop = _Stop()

    def progress(n: int) -> None:
        try:
            loop.call_soon_threadsafe(on_bytes, n)
        except RuntimeError:  # the loop is gone: a cancelled run whose thread is finishing its last block
            pass

    def throttle(n: int) -> None:  # in the worker thread: wait on the loop for the run's token bucket
        assert bucket is not None
        anyio.from_thread.run(bucket.acquire, n)

    def job() -> T:
        fetch_sync(spec, offset, part, hasher, progress, stop, throttle if bucket is not None else None)
        return then()

    try:
        return await anyio.to_thread.run_sync(job, limiter=limiter, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.set()
        raise
