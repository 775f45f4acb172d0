"""Small API requests (JSON in, JSON out) on an aiohttp session, for adapters whose bulk bytes go through
:mod:`asyncdepo.transport.httpget` and whose API calls are few and small (ImmPort: a login, a manifest, one DRS
lookup per file).

Why aiohttp and not our own threaded ``http.client`` pool (which this module was until 2026-12-04): the
adapters already import aiohttp (its import cost was the old reason), and measured, whole-process medians of
10 alternated pairs, ``asyncdepo pull immport`` of 300 x 1 KiB files against the simulator (one DRS lookup
and one GET per file, the case where API calls weigh most): aiohttp 0.94x the CPU and 0.95x the wall time of
the threaded pool; urllib3's pool in the same threads cost 1.20x the CPU (1.17x wall), most of it its import.

:class:`ApiClient` keeps one session (created on the first request, inside the running loop) with a bounded
keep-alive pool. Errors come out of the one error boundary (:func:`asyncdepo.transport.failures.boundary`): a
network failure or timeout as TransientError, an untrusted certificate as PermanentError with a hint;
messages name the request by method and path, never its query or headers. HTTP statuses are the caller's to
map (``Reply.status``), with the archive's own words in ``Reply.body``. No redirect is followed, nothing
retried (the pacer is the one retry loop). Requests go through the proxy the environment names for them
(``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY``, see :func:`asyncdepo.transport.httpbody.proxy_request_class`).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson

from asyncdepo.transport.failures import boundary
from asyncdepo.transport.httpbody import client_session


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
    """JSON API requests over one keep-alive pool of at most ``concurrency`` connections; ``timeout`` bounds the
    connect and each read; ``ssl_context`` replaces the default verifying one. Close with :meth:`aclose`."""

    def __init__(self, *, timeout: float = 60.0, ssl_context: ssl.SSLContext | None = None,
                 concurrency: int = 16) -> None:
        self.timeout = timeout
        self._ssl = ssl_context
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      json: Any = None, form: Mapping[str, str] | None = None) -> Reply:
        """Send the request (``json`` or ``form`` as the body) and read the whole response.

        :raises ValueError: not an http(s) URL.
        :raises TransientError: the network failed or timed out. :raises PermanentError: an untrusted
            certificate.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
        hdrs = dict(headers or {})
        body: bytes | None = None
        if json is not None:
            body = orjson.dumps(json)
            hdrs.setdefault("Content-Type", "application/json")
        elif form is not None:
            body = urlencode(form).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        hdrs.setdefault("Accept", "application/json")
        if self._session is None:
            self._session = client_session(limit=self._concurrency, ssl=self._ssl if self._ssl is not None else True)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout,
                                        sock_read=self.timeout)
        with boundary(f"{method} {parts.path or '/'}"):
            async with self._session.request(method, url, headers=hdrs, data=body, allow_redirects=False,
                                             timeout=timeout) as resp:
                data = await resp.read()
                return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)
