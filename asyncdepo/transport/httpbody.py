"""aiohttp request bodies (one rule for buffer lifetime) and sessions.

**The buffer rule.** A body class hands the transport views of memory it does not own: a pooled block a
ByteSource refills when it is asked for the next one, a chunk buffer the engine reuses once the request
returns. ``await writer.write(view)`` returning does not mean the bytes left: uvloop (and asyncio's own
transports from Python 3.12, and any ``writelines``) keep a *reference* to whatever the socket did not take
at once, and send it later. A view may therefore be given back only once the transport no longer holds it.
Every body class here writes through :class:`Outlet`, which enforces that in one place:

* while a body is written, the transport's write-buffer limits are (0, 0): any byte it holds pauses the
  writer, and the writer resumes only once the buffer is empty. After each piece :meth:`Outlet.send`
  waits for that, so the next piece (which may reuse the memory) is asked for only when nothing of this
  one is queued in user space (the kernel has *copied* what it took). A piece of immutable ``bytes`` (a
  compressor's output, a copied tail) is the exception: nobody refills it, so up to ``Outlet.QUEUED`` bytes
  of it may stay queued while the next piece is made. The stall timer runs only while ``send`` waits;
* if the body ends abnormally (cancelled, the source failed, a timeout) while the transport still holds
  bytes, the connection is aborted, which drops them: a graceful close would go on sending memory that
  has been handed back and refilled, and a server could store it as the tail of the body;
* the limits are restored afterwards, so a reused keep-alive connection behaves as before.

Measured (benchmarks/bench_gypsum.py and bench_engine.py, before/after in one run): see the README's
benchmark section. A copy of every block instead would cost a memcpy per byte sent.

:class:`SourcePayload` streams a ByteSource (tus, gypsum, PDIS's ``multipart/form-data`` through
:func:`form_file_payload`); :class:`ViewPayload` sends one memoryview (a chunk; its buffer is the
caller's until the request returns). Measured: an async generator body that awaited run_in_executor
sent zero bytes and hung in ~1 of 2,000-5,000 requests; a Payload whose ``write`` pulls from the source
and writes to the transport did not. A Content-Length is sent whenever the size is known (chunked
encoding halved throughput). Every request gets a timeout scaled to its size (:func:`request_timeout`),
so a stuck request is retried, never waited on.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import anyio
from aiohttp import payload
from yarl import URL

from asyncdepo.contract import ByteSource
from asyncdepo.errors import SourceChangedError, TransientError


class Outlet:
    """Writes one request body's pieces into aiohttp's stream writer under the buffer rule (module docstring).

    ``async with Outlet(writer) as out: await out.send(view)``: when ``send`` returns, the transport holds no
    reference to ``view``. ``stall`` (seconds) bounds each ``send``; a write that makes no progress that long
    raises TransientError naming ``what``.
    """

    #: immutable bytes (see :meth:`send`) the transport may hold when ``send`` returns
    QUEUED = 1 << 20

    def __init__(self, writer: Any, *, what: str = "request body", stall: float | None = None) -> None:
        self._writer = writer
        self._transport: asyncio.Transport | None = writer.transport
        self._limits: tuple[int, int] | None = None
        self._what, self._stall = what, stall

    async def __aenter__(self) -> Self:
        t = self._transport
        if t is not None and not t.is_closing():
            self._limits = t.get_write_buffer_limits()
            # A TLS app transport pauses at ``size >= high``, a plain one at ``size > high``: both mean
            # "pause while any byte is held"; both resume at ``size <= low``, i.e. once it is empty.
            high = 1 if t.get_extra_info("sslcontext") is not None else 0
            t.set_write_buffer_limits(high=high, low=0)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        t = self._transport
        if t is None:
            return
        if kind is not None and t.get_write_buffer_size():
            # The body is incomplete anyway: drop what the transport holds instead of sending it later. Also
            # when aiohttp has already closed the connection (a cancelled request closes it gracefully, which
            # would go on sending the queued bytes, then cancels this writer).
            t.abort()
            return
        if self._limits is not None and not t.is_closing():
            low, high = self._limits
            t.set_write_buffer_limits(high=high, low=low)

    async def send(self, data: bytes | memoryview) -> None:
        """Write ``data`` and return once the transport no longer holds any of it — or, for immutable bytes
        (``bytes``, or a view of them), once it holds at most :attr:`QUEUED` bytes: such a piece never goes
        back to anyone, so it may wait in the transport while the next one is made (flow control still
        bounds it).

        :raises TransientError: ``stall`` seconds passed without the peer taking the bytes.
        :raises aiohttp.ClientConnectionResetError | OSError: the connection broke.
        """
        if not data:
            return
        await self._writer.write(data, drain=False)  # the waiting is ours (below), aiohttp's would be too
        t = self._transport
        held = t.get_write_buffer_size() if t is not None else 0
        if not held or (held <= self.QUEUED and _immutable(data)):
            return  # the common case: the kernel took it all, no timer needed
        if self._stall is None:
            await self._drained()
            return
        try:
            with anyio.fail_after(self._stall):
                await self._drained()
        except TimeoutError:
            raise TransientError(f"{self._what}: the server stopped reading the body") from None

    async def _drained(self) -> None:
        writer, t = self._writer, self._transport
        while t is not None and t.get_write_buffer_size():
            await writer.drain()  # paused while anything is held (the limits above): waits until empty
            if t.get_write_buffer_size() and not getattr(writer.protocol, "_paused", True):
                # a transport whose flow control did not pause: it may still hold our bytes, and nothing
                # will tell us when it lets go
                t.abort()
                raise TransientError(f"{self._what}: the transport did not report draining its buffer")


def _immutable(data: bytes | memoryview) -> bool:
    """``data`` is ``bytes`` or a view of ``bytes``: nobody can refill its memory."""
    return type(data) is bytes or (isinstance(data, memoryview) and type(data.obj) is bytes)


async def _next(it: AsyncIterator[memoryview]) -> memoryview | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


class SourcePayload(payload.Payload):
    """Streams ``source`` (between the bytes ``head`` and ``tail``) as one request body; sent once.

    * Each view is released (the next one asked for) only when the transport no longer holds it (:class:`Outlet`).
    * With a known size, the source is driven to its end (digests filled, its file-changed check run)
      *before* the final byte goes out: once the server has every byte it answers, and aiohttp then cancels
      a body writer still running. So the final byte is held back (copied) while the source finishes.
    * The source is iterated through one ``__aiter__`` call (a ByteSource may refuse a second one), and the
      payload is marked consumed so aiohttp never replays it (the engine retries with a fresh source).
    * ``stall``: see :class:`Outlet`.

    :raises SourceChangedError: the source yielded more or fewer bytes than its declared size.
    """

    def __init__(self, source: ByteSource, content_type: str = "application/octet-stream",
                 *, head: bytes = b"", tail: bytes = b"",
                 stall: float | None = None, what: str = "request body", **kw: Any) -> None:
        super().__init__(source, content_type=content_type, **kw)
        self._source = source
        self._head, self._tail = head, tail
        self._size = None if source.size is None else len(head) + source.size + len(tail)
        self._stall, self._what = stall, what
        self._written = False

    @property
    def size(self) -> int | None:
        return self._size

    async def write(self, writer: Any) -> None:
        if self._written:
            raise RuntimeError("a SourcePayload can be sent only once; make a new source to retry")
        self._written = True
        self._consumed = True  # aiohttp must not replay it on a retry of its own
        async with Outlet(writer, what=self._what, stall=self._stall) as out:
            await out.send(self._head)
            await self._stream(out)
            await out.send(self._tail)

    async def _stream(self, out: Outlet) -> None:
        it = self._source.__aiter__()
        left = self._source.size
        try:
            while (block := await _next(it)) is not None:
                if left is not None and len(block) >= left:
                    if len(block) > left:
                        raise SourceChangedError(f"{self._what}: the source grew while it was read")
                    await out.send(block[:-1])
                    final = bytes(block[-1:])  # a copy: the source may reuse the block's memory now
                    if await _next(it) is not None:
                        raise SourceChangedError(f"{self._what}: the source grew while it was read")
                    await out.send(final)
                    return
                await out.send(block)
                if left is not None:
                    left -= len(block)
            if left:
                raise SourceChangedError(f"{self._what}: the source ended {left} bytes short of its size")
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        # aiohttp >= 3.12 calls this; the source's own size bounds what we send
        await self.write(writer)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a streamed body cannot be decoded")


def form_file_payload(source: ByteSource, *, field: str, filename: str, fields: Mapping[str, str],
                      stall: float | None = None, what: str = "request body") -> SourcePayload:
    """A ``multipart/form-data`` body: the text ``fields``, then ``source`` as the file field ``field``.

    The file name is reduced to printable ASCII without quotes or backslashes (what every server parses).
    The size is known only when the source's is (otherwise aiohttp sends it chunked).
    """
    boundary = secrets.token_hex(16)
    safe = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{safe}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode()
    return SourcePayload(source, f"multipart/form-data; boundary={boundary}", head=head,
                         tail=f"\r\n--{boundary}--\r\n".encode(), stall=stall, what=what)


class ViewPayload(payload.Payload):
    """A memoryview body written in slices through :class:`Outlet`; the view must stay unchanged until the
    request returns (when it does, the transport holds none of it: see the module docstring).

    aiohttp would otherwise join the headers and the whole body into one new bytes object and asyncio
    would copy whatever the socket did not take at once into its buffer: two transient copies of every
    part in flight (8 x 16 MiB parts: +250 MB of RSS). In slices, at most one slice (1 MiB) is buffered.
    """

    SLICE = 1 << 20  # 1 MiB: one write for a small file; 256 KiB cost ~0.1 ms more per 1 MiB request

    def __init__(self, view: memoryview, **kw: Any) -> None:
        super().__init__(view, content_type="application/octet-stream", **kw)
        self._view = view
        self._size = len(view)

    @property
    def size(self) -> int | None:
        return self._size

    async def write(self, writer: Any) -> None:
        view, step = self._view, self.SLICE
        async with Outlet(writer) as out:
            for start in range(0, len(view), step):
                await out.send(view[start : start + step])

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        # aiohttp >= 3.12 calls this; the view's length is the Content-Length we declared
        await self.write(writer)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a binary body cannot be decoded")


def request_timeout(nbytes: int | None = None, *, min_rate: float = 1 << 20, base: float = 60.0,
                    sock_read: float = 120.0, connect: float = 30.0) -> aiohttp.ClientTimeout:
    """A timeout for a request carrying ``nbytes``: ``base`` + the time at ``min_rate`` bytes/s."""
    total = base + (nbytes or 0) / min_rate
    return aiohttp.ClientTimeout(total=total, connect=connect, sock_connect=connect, sock_read=sock_read)


def client_session(*, limit: int = 64, limit_per_host: int = 0, ssl: Any = None,
                   headers: dict[str, str] | None = None, **kw: Any) -> aiohttp.ClientSession:
    """A ClientSession with a bounded connection pool and default timeouts (call inside a running loop).

    Requests go through the proxy the environment names for them (:func:`proxy_request_class`), as curl and
    requests do.
    """
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host, ssl=ssl,
                                     enable_cleanup_closed=True)
    kw.setdefault("request_class", proxy_request_class())
    return aiohttp.ClientSession(connector=connector, timeout=request_timeout(), headers=headers,
                                 auto_decompress=False, **kw)


def proxy_request_class(proxies: Mapping[str, str] | None = None) -> type[aiohttp.ClientRequest]:
    """The request class for a session that honours ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` (either
    case; ``proxies`` as :func:`urllib.request.getproxies` returns them, read now when None).

    Each request to a URL whose scheme has a proxy and whose host ``NO_PROXY`` does not exempt goes through
    that proxy (``https`` through a CONNECT tunnel); credentials in the proxy's URL (``http://user:pw@host:port``)
    go only to the proxy, as ``Proxy-Authorization``. A proxy given without a scheme is ``http://``.

    Why not aiohttp's ``trust_env=True``: it also sends ``~/.netrc`` credentials as Basic auth to any host
    without an ``Authorization`` of its own (a ``default`` entry: to every host, a presigned URL's storage
    host included), refuses a request that carries its own ``Authorization`` to a host the file names, and
    reads the environment and that file in a thread on every request. Here the environment is read once per
    session, and when it names no proxy the plain request class is returned: nothing is added per request.
    """
    import urllib.request  # aiohttp imported it already

    table = dict(urllib.request.getproxies() if proxies is None else proxies)
    routes = {scheme: _proxy_url(table[scheme]) for scheme in ("http", "https") if table.get(scheme)}
    if not routes:
        return aiohttp.ClientRequest

    @functools.lru_cache(maxsize=256)
    def bypass(host: str) -> bool:
        return bool(urllib.request.proxy_bypass(host))  # NO_PROXY, as httpget.proxied reads it

    class EnvProxyRequest(aiohttp.ClientRequest):
        def update_proxy(self, proxy: URL | None, proxy_auth: aiohttp.BasicAuth | None,
                         proxy_headers: Any) -> None:
            if proxy is None and (route := routes.get(self.url.scheme)) is not None \
                    and not bypass(self.url.host or ""):
                proxy, proxy_auth = route
            super().update_proxy(proxy, proxy_auth, proxy_headers)

    return EnvProxyRequest


def _proxy_url(value: str) -> tuple[URL, aiohttp.BasicAuth | None]:
    """A proxy setting -> its URL without credentials, and the credentials (only ever sent to the proxy)."""
    url = URL(value if "://" in value else f"http://{value}")
    return url.with_user(None), aiohttp.BasicAuth.from_url(url)
