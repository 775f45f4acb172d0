"""Failure and edge paths of the HTTP transport, each on a real connection: a server that stops reading a
request body (httpbody's stall timer), a source that grows past its size exactly at a block's end, an answer
lost on a fresh connection (FaultProxy ``lose``), a redirect to a scheme we cannot fetch, a TLS body that
ends with the connection (close_notify) or stalls right after its first bytes, the bandwidth limit on the
chunked and TLS receive routes, an empty file."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self

import aiohttp
import anyio
import pytest
from aiohttp import web

from asyncdepo.digests import MultiHash
from asyncdepo.errors import PermanentError, SourceChangedError, TransientError
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.transport import httpget
from asyncdepo.transport.bandwidth import TokenBucket
from asyncdepo.transport.failures import message_of, parse_retry_after
from asyncdepo.transport.httpbody import SourcePayload, ViewPayload, form_file_payload
from tests.conftest import start_over
from tests.unit.test_httpbody import BLOCK, DATA, ReusingSource, post, run, sink_for
from tests.unit.test_httpget import BODY, Server, get


def cause_of(exc: BaseException, kind: type[BaseException]) -> BaseException:
    """The first exception of ``kind`` in ``exc``'s chain (aiohttp wraps what a body writer raised)."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, kind):
        seen = seen.__cause__ or seen.__context__
    assert seen is not None, f"no {kind.__name__} behind {exc!r}"
    return seen


# -- request bodies (httpbody) -------------------------------------------------------------------------------
def test_a_server_that_stops_reading_the_body_ends_the_request_as_transient(tmp_path: Path) -> None:
    """The stall timer of a form upload (PDIS's): the server reads 256 KiB and then nothing; the request
    fails as transient naming the request, and the server never got a whole body."""
    sink, ctx = sink_for("http", tmp_path, pause_after=256 << 10)

    async def main() -> None:
        body = form_file_payload(ReusingSource(DATA), field="f", filename="a.bin", fields={"k": "v"},
                                 stall=0.5, what="pdis POST upload/")
        with pytest.raises(aiohttp.ClientError) as info:
            await post(sink.url, body, ctx)
        stalled = cause_of(info.value, TransientError)
        assert str(stalled) == "pdis POST upload/: the server stopped reading the body"

    with sink:
        try:
            run("asyncio", main)
        finally:
            sink.resume.set()
        assert sink.served.wait(60)
    assert sink.bodies == []
    assert len(sink.received) == 1 and 256 << 10 <= len(sink.received[0]) < len(DATA)


def test_a_source_that_grows_at_a_block_boundary_never_sends_its_last_byte(tmp_path: Path) -> None:
    """Declared two blocks, the source yields a third: the final byte of the declared size is held back until
    the source ended, so the server never sees a complete body of the wrong file."""
    sink, ctx = sink_for("http", tmp_path)

    class Grown(ReusingSource):
        def __init__(self) -> None:
            super().__init__(DATA)
            self.size = 2 * BLOCK

    async def main() -> None:
        with pytest.raises(aiohttp.ClientError) as info:
            await post(sink.url, SourcePayload(Grown()), ctx)
        assert str(cause_of(info.value, SourceChangedError)) == "request body: the source grew while it was read"

    with sink:
        run("asyncio", main)
        assert sink.served.wait(60)
    assert sink.bodies == []
    assert sink.received and all(len(r) < 2 * BLOCK and r == DATA[: len(r)] for r in sink.received)


def test_a_source_iterated_by_a_plain_async_iterator_arrives_intact(tmp_path: Path) -> None:
    """A ByteSource need not be an async generator: an iterator object without ``aclose`` is streamed too."""
    sink, ctx = sink_for("http", tmp_path)

    class Blocks:
        def __init__(self) -> None:
            self.at = 0

        def __aiter__(self) -> Blocks:
            return self

        async def __anext__(self) -> memoryview:
            if self.at >= len(DATA):
                raise StopAsyncIteration
            self.at += BLOCK
            return memoryview(DATA)[self.at - BLOCK : self.at]

    class PlainSource:
        def __init__(self) -> None:
            self.size: int | None = len(DATA)
            self.digests: dict[str, str] = {}

        def __aiter__(self) -> Blocks:
            return Blocks()

    with sink:
        answer = run("asyncio", lambda: post(sink.url, SourcePayload(PlainSource()), ctx))
    assert answer == {"sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA)}


async def test_a_streamed_body_is_sent_once_and_neither_body_decodes(tmp_path: Path) -> None:
    """A SourcePayload consumed by one request refuses a second (the engine retries with a new source)."""
    got: list[bytes] = []

    async def take(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_put("/up", take)
    from aiohttp.test_utils import TestServer

    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        body = SourcePayload(ReusingSource(b"x" * 1000))
        async with session.put(server.make_url("/up"), data=body) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientError) as info:
            async with session.put(server.make_url("/up"), data=body):
                pass
        assert str(cause_of(info.value, RuntimeError)) == (
            "a SourcePayload can be sent only once; make a new source to retry")
    assert got == [b"x" * 1000]
    with pytest.raises(TypeError):
        body.decode()
    with pytest.raises(TypeError):
        ViewPayload(memoryview(b"abc")).decode()


# -- the threaded GET (httpget, tlsbio) ----------------------------------------------------------------------
class Routes(Server):
    """test_httpget's server plus: an empty file, a redirect to ftp://, a body that stalls after 500 bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.server.app.router.add_get("/empty", self.empty)
        self.server.app.router.add_get("/ftp", self.ftp)
        self.server.app.router.add_get("/trickle", self.trickle)
        self.server.app.router.add_get("/close", self.close)

    async def close(self, request: web.Request) -> web.Response:
        resp = web.Response(body=BODY)
        resp.force_close()  # "Connection: close": the server ends the connection after this answer
        return resp

    async def empty(self, request: web.Request) -> web.Response:
        return web.Response(body=b"")

    async def ftp(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("ftp://127.0.0.1/f")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(BODY)
        await resp.prepare(request)
        await resp.write(BODY[:500])  # arrives with the head: the client has it before its first block read
        await self.release.wait()
        return resp


@pytest.fixture(params=["http", "https"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Routes]:
    srv = Routes()
    srv.client_ctx = await start_over(srv.server, request.param, tmp_path)
    httpget.POOL.close()
    yield srv
    srv.release.set()
    httpget.POOL.close()
    await srv.server.close()


class CountingBucket(TokenBucket):
    """The run's token bucket, recording what each receive asked it for."""

    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        self.asked: list[int] = []

    async def acquire(self, n: int) -> None:
        self.asked.append(n)
        await super().acquire(n)


@pytest.mark.parametrize("path", ["/f", "/chunked"])
async def test_the_bandwidth_limit_paces_every_receive_route(server: Routes, tmp_path: Path, path: str) -> None:
    part = tmp_path / "b.part"
    bucket = CountingBucket(1 << 30)
    hasher = MultiHash(("md5",))
    spec = httpget.PlainGet(url=server.url(path), what=f"GET {path}", ssl_context=server.client_ctx)
    n = await httpget.fetch(spec, 0, part, hasher, lambda _: None, then=lambda: part.stat().st_size,
                            bucket=bucket)
    assert n == len(BODY) and part.read_bytes() == BODY
    assert hasher.hexdigests()["md5"] == hashlib.md5(BODY).hexdigest()
    assert sum(bucket.asked) >= len(BODY)  # every block was paced before it was read


async def test_an_answer_with_connection_close_is_read_whole(server: Routes, tmp_path: Path) -> None:
    """http.client hands a "Connection: close" connection over to its response: the TLS stream must stay
    open until the body was read (a socket's makefile keeps it open the same way)."""
    part = tmp_path / "k.part"
    n, hasher, _ = await get(server, "/close", part)
    assert n == len(BODY) and part.read_bytes() == BODY
    assert hasher.hexdigests()["md5"] == hashlib.md5(BODY).hexdigest()


async def test_an_empty_file_is_fetched_as_empty(server: Routes, tmp_path: Path) -> None:
    part = tmp_path / "e.part"
    n, hasher, _ = await get(server, "/empty", part)
    assert n == 0 and part.read_bytes() == b""
    assert hasher.hexdigests()["md5"] == hashlib.md5(b"").hexdigest()


async def test_a_redirect_to_another_scheme_is_permanent(server: Routes, tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as info:
        await get(server, "/ftp", tmp_path / "x.part")
    assert str(info.value) == "GET /ftp: cannot fetch a ftp URL"
    assert (tmp_path / "x.part").read_bytes() == b""


async def test_a_tls_body_stalling_after_its_first_bytes_keeps_them(server: Routes, tmp_path: Path) -> None:
    part = tmp_path / "t.part"
    with anyio.fail_after(60):  # a bound on the test, not a timing assertion
        with pytest.raises(TransientError) as info:
            await get(server, "/trickle", part, timeout=0.3)
    assert str(info.value).startswith("GET /trickle: timed out")
    assert part.read_bytes() == BODY[:500]


async def test_an_answer_lost_on_a_fresh_connection_is_transient(tmp_path: Path) -> None:
    srv = Routes()
    await start_over(srv.server, "http", tmp_path)
    httpget.POOL.close()
    try:
        async with FaultProxy(("127.0.0.1", srv.server.port)) as proxy:  # type: ignore[arg-type]
            proxy.faults.add("GET /f lose first=1")
            part = tmp_path / "l.part"
            spec = httpget.PlainGet(url=f"{proxy.url}/f", what="GET /f")

            async def fetch() -> int:
                return await httpget.fetch(spec, part.stat().st_size if part.exists() else 0, part,
                                           MultiHash(("md5",)), lambda _: None, then=lambda: part.stat().st_size)

            with pytest.raises(TransientError) as info:
                await fetch()
            assert str(info.value).startswith("GET /f: ")
            assert part.read_bytes() == b""  # the answer never came: nothing written
            assert await fetch() == len(BODY)  # the retry, on a new connection
            assert proxy.faults.requests["GET /f"] == 2
    finally:
        httpget.POOL.close()
        await srv.server.close()
    assert part.read_bytes() == BODY


class CloseNotifyServer:
    """An HTTP/1.1 server over TLS whose answer has no length: the body ends with the connection (as an old
    server or a CGI script answers), which it closes with close_notify or, ``ragged``, with a bare TCP end."""

    def __init__(self, context: ssl.SSLContext, body: bytes, *, ragged: bool) -> None:
        self.context, self.body, self.ragged = context, body, ragged
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with self.context.wrap_socket(conn, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + self.body)
            if self.ragged:
                return  # closing the SSLSocket sends no close_notify
            with contextlib.suppress(ssl.SSLError, OSError):  # the client need not answer our close_notify
                tls.unwrap()  # close_notify, then the TCP end

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(timeout=30)


@pytest.fixture
def tls_contexts(tmp_path: Path) -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    from tests.tlscert import contexts

    yield contexts(tmp_path)


@pytest.mark.parametrize("ragged", [False, True], ids=["close_notify", "tcp_end"])
async def test_a_tls_body_ending_with_the_connection_is_whole(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path, ragged: bool
) -> None:
    server_ctx, client_ctx = tls_contexts
    part = tmp_path / "c.part"
    httpget.POOL.close()
    with CloseNotifyServer(server_ctx, BODY, ragged=ragged) as srv:
        spec = httpget.PlainGet(url=f"https://127.0.0.1:{srv.port}/f", what="GET /f", ssl_context=client_ctx)
        hasher = MultiHash(("md5",))
        n = await httpget.fetch(spec, 0, part, hasher, lambda _: None, then=lambda: part.stat().st_size)
    assert n == len(BODY) and part.read_bytes() == BODY
    assert hasher.hexdigests()["md5"] == hashlib.md5(BODY).hexdigest()


def test_idle_block_buffers_are_bounded() -> None:
    pool = httpget._BufferPool(keep=1)
    a, b = pool.take(), pool.take()
    pool.give(a)
    pool.give(b)  # over the bound: dropped, not kept
    assert pool.take() is a
    assert pool.take() is not b


# -- the status table's helpers (pure parsing) --------------------------------------------------------------
def test_retry_after_values_that_are_numbers_or_dates_without_a_zone() -> None:
    assert parse_retry_after(2.5) == 2.5
    assert parse_retry_after(-3) == 0.0  # never a negative wait
    # "-0000" is a date whose zone is unknown: read as UTC; long past, so no wait
    assert parse_retry_after("Thu, 01 Jan 2015 00:00:00 -0000") == 0.0


def test_a_json_error_body_without_a_message_gives_no_text() -> None:
    assert message_of(b"[1, 2]") == ""
    assert message_of(b'{"code": 17}') == ""
    assert message_of(b'{"detail": "quota used up"}') == "quota used up"
