"""The threaded plain GET (asyncdepo.transport.httpget) against a small aiohttp server on loopback.

Every behaviour is checked over plain HTTP and over TLS (self-signed; the TLS route reads through memory
BIOs, asyncdepo.transport.tlsbio, and has code paths of its own).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncdepo.digests import MultiHash
from asyncdepo.errors import DepoError, PermanentError, TransientError, is_transient
from asyncdepo.transport import httpget
from tests.conftest import start_over

BODY = os.urandom(3 * httpget.BLOCK + 12345)


class Server:
    """Serves BODY at /f (Range honoured), and a few misbehaving routes."""

    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        self.headers: list[dict[str, str]] = []  # the request headers /f was asked with
        self.away_to = ""  # where /away redirects (another server: another origin)
        self.endless_peer: tuple[str, int] | None = None
        self.peers: set[tuple[str, int]] = set()
        self.transports: list[asyncio.Transport] = []
        self.wrote_first = asyncio.Event()
        self.client_gone = asyncio.Event()
        app = web.Application()
        app.router.add_get("/f", self.file)
        for name in ("norange", "moved", "loop", "missing", "busy", "denied", "short", "badrange", "endless",
                     "chunked", "stall", "aborted", "away"):
            app.router.add_get(f"/{name}", getattr(self, name))  # each route is the handler of its name
        self.release = asyncio.Event()
        self.server = TestServer(app, host="127.0.0.1")
        self.client_ctx: ssl.SSLContext | None = None  # trusts the server's certificate, over TLS

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def file(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        self.headers.append(dict(request.headers))
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.transports.append(request.transport)  # type: ignore[arg-type]
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            return web.Response(body=BODY[start:], status=206,
                                headers={"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"})
        return web.Response(body=BODY)

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/f?sig=abc")

    async def away(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(self.away_to)

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def missing(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "no such file"}, status=404)

    async def busy(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "slow down"}, status=503, headers={"Retry-After": "1"})

    async def denied(self, request: web.Request) -> web.Response:
        return web.Response(status=403, content_type="application/xml",
                            text="<?xml version='1.0'?><Error><Code>AccessDenied</Code>"
                                 "<Message>Request has expired</Message></Error>")

    async def norange(self, request: web.Request) -> web.Response:
        return web.Response(body=BODY)  # ignores Range, as a server may

    async def badrange(self, request: web.Request) -> web.Response:
        return web.Response(body=BODY[5:], status=206, headers={"Content-Range": f"bytes 5-{len(BODY) - 1}/*"})

    async def _cut(self, request: web.Request, abort: bool) -> web.StreamResponse:
        """Send the first 100,000 bytes of BODY under its full Content-Length, then end the connection."""
        resp = web.StreamResponse()
        resp.content_length = len(BODY)
        await resp.prepare(request)
        await resp.write(BODY[:100_000])
        assert request.transport is not None
        if abort:
            request.transport.abort()  # no close_notify over TLS: a bare TCP end mid-body
        else:
            request.transport.close()  # over TLS, close_notify first
        return resp

    async def short(self, request: web.Request) -> web.StreamResponse:
        return await self._cut(request, abort=False)

    async def aborted(self, request: web.Request) -> web.StreamResponse:
        return await self._cut(request, abort=True)

    async def stall(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(BODY)
        await resp.prepare(request)
        await resp.write(BODY[:200_000])
        await self.release.wait()  # then nothing more until the test lets go
        return resp

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()  # no Content-Length: http.client reads the chunks
        await resp.prepare(request)
        for i in range(0, len(BODY), 100_003):
            await resp.write(BODY[i:i + 100_003])
        await resp.write_eof()
        return resp

    async def endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 1 << 40
        assert request.transport is not None
        self.endless_peer = request.transport.get_extra_info("peername")
        await resp.prepare(request)
        try:
            await resp.write(b"x" * 65536)  # the client now waits for the rest of its first block
            self.wrote_first.set()
            await self.release.wait()  # never set here: aiohttp cancels this when the client goes away
        finally:
            self.client_gone.set()
        return resp


@pytest.fixture(params=["http", "https"])
async def server(request: pytest.FixtureRequest, tmp_path: Path):
    srv = Server()
    srv.client_ctx = await start_over(srv.server, request.param, tmp_path)
    httpget.POOL.close()  # no connection left over from another test's server
    yield srv
    httpget.POOL.close()
    await srv.server.close()


async def get(srv: Server, path: str, part: Path, offset: int = 0, **kw: object) -> tuple[int, MultiHash, list[int]]:
    hasher = MultiHash(("md5",))
    seen: list[int] = []
    kw.setdefault("ssl_context", srv.client_ctx)
    spec = httpget.PlainGet(url=srv.url(path), what=f"GET {path}", **kw)  # type: ignore[arg-type]
    n = await httpget.fetch(spec, offset, part, hasher, seen.append, then=lambda: part.stat().st_size)
    return n, hasher, seen


async def test_whole_body_is_hashed_written_and_reported(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    size, hasher, seen = await get(server, "/f", part)
    assert size == len(BODY) and part.read_bytes() == BODY
    assert hasher.hexdigests()["md5"] == hashlib.md5(BODY).hexdigest()
    assert sum(seen) == len(BODY)
    assert server.ranges == [None]


async def test_connections_are_kept_alive_between_gets(server: Server, tmp_path: Path) -> None:
    for n in range(3):
        await get(server, "/f", tmp_path / f"f{n}")
        assert (tmp_path / f"f{n}").read_bytes() == BODY
    assert len(server.peers) == 1


async def test_a_pooled_connection_the_server_closed_is_replaced(server: Server, tmp_path: Path) -> None:
    await get(server, "/f", tmp_path / "a")
    server.transports[-1].close()  # the server drops the idle keep-alive connection
    await get(server, "/f", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == BODY
    assert len(server.peers) == 2


async def test_a_chunked_body_without_length(server: Server, tmp_path: Path) -> None:
    _, hasher, seen = await get(server, "/chunked", tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == BODY and sum(seen) == len(BODY)
    assert hasher.hexdigests()["md5"] == hashlib.md5(BODY).hexdigest()
    await get(server, "/f", tmp_path / "d")  # the connection went back to the pool in a usable state
    assert (tmp_path / "d").read_bytes() == BODY


async def test_a_stalled_body_times_out_as_transient_and_keeps_what_came(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "s.part"
    try:
        with anyio.fail_after(60):  # a bound on the test, not a timing assertion
            with pytest.raises(TransientError, match="GET /stall: timed out"):
                await get(server, "/stall", part, timeout=0.3)
    finally:
        server.release.set()
    assert part.read_bytes() == BODY[:200_000]


async def test_resume_appends_from_the_offset(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    part.write_bytes(BODY[:777_777])
    _, hasher, seen = await get(server, "/f", part, offset=777_777)
    assert part.read_bytes() == BODY
    assert sum(seen) == len(BODY) - 777_777
    assert server.ranges == ["bytes=777777-"]
    assert hasher.hexdigests()["md5"] == hashlib.md5(BODY[777_777:]).hexdigest()  # only what arrived


async def test_a_server_that_ignores_range_has_the_prefix_dropped(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    part.write_bytes(BODY[:1000])
    await get(server, "/norange", part, offset=1000)
    assert part.read_bytes() == BODY


async def test_redirects_are_followed_and_bounded(server: Server, tmp_path: Path) -> None:
    await get(server, "/moved", tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == BODY
    with pytest.raises(PermanentError, match="redirects"):
        await get(server, "/loop", tmp_path / "b")


async def test_errors_carry_the_servers_message_and_class(server: Server, tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="no such file"):
        await get(server, "/missing", tmp_path / "a")
    with pytest.raises(TransientError, match="slow down") as info:
        await get(server, "/busy", tmp_path / "b")
    assert getattr(info.value, "retry_after", None) == 1
    with pytest.raises(DepoError, match="AccessDenied: Request has expired") as denied:
        await get(server, "/denied", tmp_path / "c")
    assert not is_transient(denied.value)


async def test_a_cut_body_keeps_what_arrived_and_is_transient(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    with pytest.raises(TransientError, match="GET /short"):
        await get(server, "/short", part)
    assert part.read_bytes() == BODY[:100_000]  # a retry resumes after these


async def test_an_aborted_connection_keeps_what_arrived_and_is_transient(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    with pytest.raises(TransientError, match="GET /aborted"):
        await get(server, "/aborted", part)
    assert BODY.startswith(part.read_bytes()) and len(part.read_bytes()) <= 100_000  # a retry resumes after these


async def test_a_range_answer_from_elsewhere_is_refused(server: Server, tmp_path: Path) -> None:
    part = tmp_path / "f.part"
    part.write_bytes(BODY[:10])
    with pytest.raises(TransientError, match="asked for bytes from 10"):
        await get(server, "/badrange", part, offset=10)
    assert part.read_bytes() == BODY[:10]


async def test_cancelling_closes_the_connection(server: Server, tmp_path: Path) -> None:
    """Cancelled mid-body, the transfer shuts its socket down (the server sees the client leave, though it
    never sends more nor closes), the part file holds only bytes that arrived, and the connection is never
    given back to the pool: the next GET to the same server comes on a new one."""
    part = tmp_path / "f.part"
    async with anyio.create_task_group() as tg:
        tg.start_soon(get, server, "/endless", part)
        await server.wrote_first.wait()
        tg.cancel_scope.cancel()
    with anyio.fail_after(60):  # a bound, not a timing assertion: the server must see the client leave
        await server.client_gone.wait()
    kept = part.read_bytes()
    assert len(kept) <= 65536 and kept == b"x" * len(kept)
    await get(server, "/f", tmp_path / "next")
    assert (tmp_path / "next").read_bytes() == BODY
    assert server.endless_peer is not None and len(server.peers) == 1
    assert server.endless_peer not in server.peers


SECRET = "s3cret-value"
CREDENTIALS = {"Authorization": f"Bearer {SECRET}", "Cookie": f"session={SECRET}", "X-Auth-Token": SECRET,
               "Proxy-Authorization": f"Basic {SECRET}"}


@pytest.fixture
async def elsewhere(tmp_path: Path):
    """A second server (another port: another origin) serving BODY at /f and recording request headers."""
    srv = Server()
    await start_over(srv.server, "http", tmp_path)
    yield srv
    await srv.server.close()


@pytest.mark.parametrize("server", ["http"], indirect=True)
async def test_credentials_never_follow_a_redirect_to_another_origin(server: Server, elsewhere: Server,
                                                                     tmp_path: Path) -> None:
    server.away_to = elsewhere.url("/f")
    part = tmp_path / "a"
    await get(server, "/away", part, headers={**CREDENTIALS, "Accept": "application/octet-stream"})
    assert part.read_bytes() == BODY
    [seen] = elsewhere.headers
    assert not [k for k, v in seen.items() if SECRET in v], seen
    assert seen["Accept"] == "application/octet-stream"  # what is not a credential still goes


@pytest.mark.parametrize("server", ["http"], indirect=True)
async def test_credentials_follow_a_redirect_within_the_origin(server: Server, tmp_path: Path) -> None:
    await get(server, "/moved", tmp_path / "a", headers=CREDENTIALS)
    [seen] = server.headers
    assert {k: seen.get(k) for k in CREDENTIALS} == CREDENTIALS


@pytest.mark.parametrize("server", ["http"], indirect=True)
async def test_the_aiohttp_sessions_drop_credentials_on_a_redirect_to_another_origin(
        server: Server, elsewhere: Server) -> None:
    """What the adapters' aiohttp sessions (transport.httpbody.client_session) rely on: Authorization, cookies
    and Proxy-Authorization do not follow a redirect to another origin. Adapters send credentials only in
    those headers where redirects are followed; the rest (S3's x-amz-security-token, tus, PDIS) send their
    requests with allow_redirects=False."""
    from asyncdepo.transport.httpbody import client_session

    server.away_to = elsewhere.url("/f")
    headers = {k: v for k, v in CREDENTIALS.items() if k != "X-Auth-Token"}
    async with client_session() as session, session.get(server.url("/away"), headers=headers) as r:
        assert r.status == 200 and await r.read() == BODY
    [seen] = elsewhere.headers
    assert not [k for k, v in seen.items() if SECRET in v], seen


def test_proxied_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    httpget._proxies.cache_clear()
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "localhost")
    try:
        assert httpget.proxied("http://archive.example/f")
        assert not httpget.proxied("http://localhost:8080/f")
        assert not httpget.proxied("https://archive.example/f")
    finally:
        httpget._proxies.cache_clear()


# -- over TLS only ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["https"], indirect=True)
async def test_an_untrusted_certificate_is_a_permanent_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="TLS certificate is not trusted") as info:
        await get(server, "/f", tmp_path / "a", ssl_context=None)  # the default context does not know this CA
    assert not is_transient(info.value)
    assert not (tmp_path / "a").exists() or (tmp_path / "a").stat().st_size == 0


@pytest.mark.parametrize("server", ["https"], indirect=True)
async def test_a_certificate_for_another_name_is_refused(server: Server, tmp_path: Path) -> None:
    """The certificate is trusted but names 127.0.0.1 only: asked as ``localhost``, the name check must fail."""
    url = server.url("/f").replace("://127.0.0.1:", "://localhost:")
    spec = httpget.PlainGet(url=url, what="GET /f", ssl_context=server.client_ctx)
    with pytest.raises(PermanentError, match="not trusted.*(mismatch|match)") as info:
        await httpget.fetch(spec, 0, tmp_path / "a", MultiHash(("md5",)), lambda n: None, then=lambda: None)
    assert not is_transient(info.value)
