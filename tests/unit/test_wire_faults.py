"""The fault kinds on the wire: in a simulator (the injector's middleware and counted body reads) and in the
proxy in front of any server. Each fault is checked by what the server received and what the client saw."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from asyncdepo.sim.faults import FaultInjector, FaultRule, falsify, parse_rule
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.sim.server import SimServer, make_app

BODY = os.urandom(300_000)


class Echo:
    """A server that reads each body through the injector and answers its md5, in an ETag, a JSON digest
    field and an S3-style XML document; it records every body it got and the sizes of the reads."""

    def __init__(self) -> None:
        self.faults = FaultInjector()
        self.bodies: list[bytes] = []
        self.pieces: list[int] = []
        self.handled = asyncio.Event()  # a handler has ended (its body read whole, or its connection reset)
        app = make_app(self.faults)
        app.router.add_get("/file", self.file_response)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = SimServer(app)

    async def file_response(self, request: web.Request) -> web.StreamResponse:
        """``bytes=N-`` ranges, read in the handler as the simulators do."""
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            return web.Response(status=206, body=BODY[int(rng[6:-1]):])
        return web.Response(body=BODY)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        got = bytearray()
        try:
            async for data in self.faults.body(request):
                self.pieces.append(len(data))
                got += data
        finally:
            self.handled.set()
        self.bodies.append(bytes(got))
        md5 = hashlib.md5(got).hexdigest()
        if request.query.get("as") == "xml":
            return web.Response(body=f'<?xml version="1.0"?><R><ETag>"{md5}"</ETag></R>'.encode(),
                                content_type="application/xml", headers={"ETag": f'"{md5}"'})
        return web.json_response({"md5hash": md5, "size": len(got)}, headers={"ETag": f'"{md5}"'})


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    async with e.server:
        yield e


@pytest.fixture
async def proxied(echo: Echo) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(("127.0.0.1", echo.server.port)) as proxy:
        yield proxy


MD5 = hashlib.md5(BODY).hexdigest()


async def put(url: str, body: bytes = BODY, **kw: object) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s, \
            s.put(url, data=body, **kw) as r:  # type: ignore[arg-type]
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def test_rules_parse_the_new_kinds() -> None:
    assert parse_rule("PUT /x/* corrupt after=1K").after == 1024
    assert parse_rule("* * slow delay=0.001 first=0").kind == "slow"
    assert parse_rule("POST * digest").kind == "digest"
    with pytest.raises(ValueError, match="unknown fault kind"):
        FaultRule("melt")


async def test_simulator_corrupt_flips_one_bit_where_asked(echo: Echo) -> None:
    echo.faults.add("PUT * corrupt after=123457")
    status, _, _ = await put(echo.server.url + "/a")
    assert status == 200
    (got,) = echo.bodies
    diff = [i for i in range(len(BODY)) if got[i] != BODY[i]]
    assert diff == [123457] and got[123457] ^ BODY[123457] == 1


async def test_simulator_slow_reads_odd_pieces_and_keeps_every_byte(echo: Echo) -> None:
    echo.faults.add("PUT * slow first=0")
    assert (await put(echo.server.url + "/a"))[0] == 200
    assert echo.bodies == [BODY]
    assert {1, 7, 127} <= set(echo.pieces) and max(echo.pieces) <= 65521


async def test_simulator_digest_falsifies_header_and_json(echo: Echo) -> None:
    echo.faults.add("PUT * digest")
    status, headers, body = await put(echo.server.url + "/a")
    assert status == 200 and echo.bodies == [BODY]  # stored right, answered wrong
    assert headers["etag"].strip('"') != MD5 and len(headers["etag"].strip('"')) == 32
    assert b'"md5hash"' in body and MD5.encode() not in body
    assert falsify(b'{"size": 3}', "application/json") == b'{"size": 3}'


async def test_pause_point_holds_at_exactly_n_bytes_across_requests(echo: Echo) -> None:
    hit: list[int] = []
    paused = asyncio.Event()
    echo.faults.on_pause.append(lambda n: (hit.append(n), paused.set()))
    echo.faults.pause_at(len(BODY) + 4321)
    first = await put(echo.server.url + "/one")
    second = asyncio.create_task(put(echo.server.url + "/two"))
    await asyncio.wait_for(paused.wait(), 60)
    assert hit == [len(BODY) + 4321] and echo.faults.total_in() == len(BODY) + 4321
    assert not second.done()
    echo.faults.pause_at(None)
    assert first[0] == 200 and (await second)[0] == 200
    assert echo.bodies == [BODY, BODY] and echo.faults.total_in() == 2 * len(BODY)


async def test_proxy_passes_requests_through_untouched(echo: Echo, proxied: FaultProxy) -> None:
    for _ in range(3):  # keep-alive: several requests on one connection
        status, headers, _ = await put(proxied.url + "/a?as=xml")
        assert status == 200 and headers["etag"] == f'"{MD5}"'
    async with aiohttp.ClientSession() as s:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(BODY), 70_001):
                yield BODY[i:i + 70_001]
        async with s.put(proxied.url + "/chunked", data=chunks()) as r:  # chunked transfer encoding
            assert r.status == 200
        async with s.head(proxied.url + "/h") as r:
            assert r.status == 200
    assert echo.bodies[:4] == [BODY] * 4
    assert proxied.faults.total_bytes("PUT") == 4 * len(BODY)


async def test_proxy_status_answers_itself_with_retry_after(echo: Echo, proxied: FaultProxy) -> None:
    rule = proxied.faults.add("PUT /a status=503 retry-after=2")
    status, headers, body = await put(proxied.url + "/a")
    assert status == 503 and headers["retry-after"] == "2" and b"<Code>SlowDown</Code>" in body
    assert echo.bodies == [] and rule.hits == 1
    assert (await put(proxied.url + "/a"))[0] == 200 and echo.bodies == [BODY]


async def test_proxy_drop_resets_after_n_bytes(echo: Echo, proxied: FaultProxy) -> None:
    proxied.faults.add("POST * drop after=100000")
    with pytest.raises(aiohttp.ClientError):  # POST: aiohttp repeats an idempotent PUT on a reset by itself
        async with aiohttp.ClientSession() as s, s.post(proxied.url + "/a", data=BODY) as r:
            await r.read()
    await asyncio.wait_for(echo.handled.wait(), 30)  # the server's side of the reset connection caught up
    assert echo.faults.total_in() == 100_000 and proxied.faults.total_in() == 100_000


async def test_proxy_corrupt_flips_a_bit_in_transit(echo: Echo, proxied: FaultProxy) -> None:
    proxied.faults.add("PUT * corrupt after=0")
    status, headers, _ = await put(proxied.url + "/a")
    assert status == 200 and headers["etag"] != f'"{MD5}"'
    assert echo.bodies[0][0] == BODY[0] ^ 1 and echo.bodies[0][1:] == BODY[1:]


async def test_proxy_slow_reader_keeps_every_byte(echo: Echo, proxied: FaultProxy) -> None:
    proxied.faults.add("PUT * slow first=0")
    assert (await put(proxied.url + "/a"))[0] == 200
    assert echo.bodies == [BODY]


async def test_proxy_digest_falsifies_etag_and_xml(echo: Echo, proxied: FaultProxy) -> None:
    proxied.faults.add("PUT * digest")
    status, headers, body = await put(proxied.url + "/a?as=xml")
    assert status == 200 and echo.bodies == [BODY]
    assert headers["etag"] != f'"{MD5}"' and b"<ETag>" in body and MD5.encode() not in body


async def test_proxy_pause_point_and_stall(echo: Echo, proxied: FaultProxy) -> None:
    paused = asyncio.Event()
    proxied.faults.on_pause.append(lambda n: paused.set())
    proxied.faults.pause_at(77_777)
    task = asyncio.create_task(put(proxied.url + "/a"))
    await asyncio.wait_for(paused.wait(), 30)
    assert proxied.faults.total_in() == 77_777 and not task.done()
    proxied.faults.pause_at(None)
    assert (await task)[0] == 200 and echo.bodies == [BODY]
    stalled = asyncio.Event()
    proxied.faults.on_stall.append(lambda n: stalled.set())
    proxied.faults.add("PUT * stall")
    task = asyncio.create_task(put(proxied.url + "/b"))
    await asyncio.wait_for(stalled.wait(), 30)
    assert len(echo.bodies) == 1
    proxied.faults.release_stalls()
    assert (await task)[0] == 200 and echo.bodies == [BODY, BODY]


async def test_raw_proxy_corrupts_the_byte_stream(echo: Echo) -> None:
    faults = FaultInjector([parse_rule("TCP * corrupt after=40000")])
    async with FaultProxy(("127.0.0.1", echo.server.port), faults, http=False) as raw:
        status, _, _ = await put(raw.url + "/a")
    assert status == 200 and faults.rules[0].hits == 1
    got = echo.bodies[0]
    assert got != BODY and sum(a != b for a, b in zip(got, BODY, strict=True)) <= 1  # the bit hit the head or body


async def _post(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, data=BODY) as r:
        await r.read()
        return r.status


async def test_simulator_lose_does_the_work_and_loses_the_answer(echo: Echo) -> None:
    echo.faults.add("POST * lose")
    with pytest.raises(aiohttp.ClientError):
        await _post(echo.server.url + "/a")
    assert echo.bodies == [BODY]  # stored: only the answer was lost
    assert await _post(echo.server.url + "/a") == 200


async def test_proxy_lose_does_the_work_and_loses_the_answer(echo: Echo, proxied: FaultProxy) -> None:
    proxied.faults.add("POST * lose")
    with pytest.raises(aiohttp.ClientError):
        await _post(proxied.url + "/a")
    assert echo.bodies == [BODY]


async def test_simulator_norange_answers_the_whole_body(echo: Echo) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(echo.server.url + "/file", headers={"Range": "bytes=1000-"}) as r:
            assert r.status == 206 and await r.read() == BODY[1000:]
        echo.faults.add("GET /file norange")
        async with s.get(echo.server.url + "/file", headers={"Range": "bytes=1000-"}) as r:
            assert r.status == 200 and await r.read() == BODY
