"""Small API requests (JSON in, JSON out) over pooled keep-alive ``http.client`` connections in worker threads.

For adapters whose bulk bytes already go through :mod:`asyncdepo.transport.httpget` and whose API calls are
few and small (ImmPort: a login, a manifest, one DRS lookup per file). Such an adapter then never imports
aiohttp, whose import alone costs 0.12-0.15 s of a start-up of about 0.3 s on these machines, and each call
costs one thread hop instead of a pass through aiohttp's client machinery on the event loop. Adapters that
stream request bodies keep aiohttp (:mod:`asyncdepo.transport.httpbody`).

:class:`ApiClient` keeps up to ``max_idle`` idle connections per (scheme, host, port). A request that
fails on a reused connection before any response arrived (the server closed it while it was idle) is sent
once more on a fresh connection; any other failure propagates as the ``OSError`` or
``http.client.HTTPException`` it is, for the caller to map into the errors tree. No proxies (as aiohttp's
default ``trust_env=False``).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import orjson

from asyncdepo.transport.httppool import STALE, ConnectionPool


@dataclasses.dataclass(frozen=True)
class Reply:
    """A whole response: status, headers (names in lower case) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; raises ``orjson.JSONDecodeError`` when it is not."""
        return orjson.loads(self.body)


class ApiClient:
    """Blocking HTTP/1.1 requests run in worker threads (at most ``concurrency`` at once)."""

    def __init__(self, *, timeout: float = 60.0, ssl_context: ssl.SSLContext | None = None, max_idle: int = 8,
                 concurrency: int = 16) -> None:
        self.timeout = timeout
        self._ssl = ssl_context
        self._pool = ConnectionPool(max_idle)
        self._limiter = anyio.CapacityLimiter(concurrency)

    def close(self) -> None:
        """Close every idle connection."""
        self._pool.close()

    # -- requests -----------------------------------------------------------------------------------
    def request_sync(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                     body: bytes | None = None) -> Reply:
        """Blocking: send the request and read the whole response.

        :raises ValueError: not an http(s) URL. :raises OSError, http.client.HTTPException: transport.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
        where = (parts.scheme, parts.hostname, parts.port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        hdrs = dict(headers or {})
        while True:
            conn, reused = self._pool.take(*where, timeout=self.timeout, ctx=self._ssl)
            try:
                conn.request(method, target, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            except STALE:
                conn.close()
                if reused:
                    continue  # the server closed it while idle: once more on a new connection
                raise
            except BaseException:
                conn.close()
                raise
            reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
            if resp.will_close:
                conn.close()
            else:
                self._pool.give(*where, conn, ctx=self._ssl)
            return reply

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      json: Any = None, form: Mapping[str, str] | None = None) -> Reply:
        """:meth:`request_sync` in a worker thread; ``json`` or ``form`` become the body."""
        hdrs = dict(headers or {})
        body = None
        if json is not None:
            body = orjson.dumps(json)
            hdrs.setdefault("Content-Type", "application/json")
        elif form is not None:
            body = urlencode(form).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        hdrs.setdefault("Accept", "application/json")
        return await anyio.to_thread.run_sync(lambda: self.request_sync(method, url, headers=hdrs, body=body),
                                              limiter=self._limiter, abandon_on_cancel=True)
