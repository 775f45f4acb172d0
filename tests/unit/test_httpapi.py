"""The threaded API client (asyncdepo.engine.httpapi): bodies, keep-alive reuse, stale connections."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncdepo.engine.httpapi import ApiClient


class Server:
    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.transports: list[asyncio.Transport] = []
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        self.server = TestServer(app, host="127.0.0.1")

    async def echo(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.transports.append(request.transport)  # type: ignore[arg-type]
        body = await request.read()
        return web.json_response({"type": request.content_type, "body": body.decode(),
                                  "auth": request.headers.get("Authorization")})


@pytest.fixture
async def server():
    srv = Server()
    await srv.server.start_server()
    yield srv
    await srv.server.close()


async def test_json_and_form_bodies_and_headers(server: Server) -> None:
    client = ApiClient()
    url = str(server.server.make_url("/echo"))
    r = await client.request("POST", url, json={"paths": ["/SDY1"]}, headers={"Authorization": "bearer t"})
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"type": "application/json", "body": '{"paths":["/SDY1"]}', "auth": "bearer t"}
    r = await client.request("POST", url, form={"username": "a b", "password": "p&q"})
    assert r.json()["type"] == "application/x-www-form-urlencoded"
    assert r.json()["body"] == "username=a+b&password=p%26q"
    client.close()


async def test_connections_are_kept_alive_and_reused(server: Server) -> None:
    client = ApiClient()
    url = str(server.server.make_url("/echo"))
    for _ in range(5):
        assert (await client.request("POST", url, json={})).status == 200
    assert len(server.peers) == 1
    client.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server) -> None:
    client = ApiClient()
    url = str(server.server.make_url("/echo"))
    assert (await client.request("POST", url, json={"n": 1})).status == 200
    server.transports[-1].close()  # the server drops the idle keep-alive connection
    r = await client.request("POST", url, json={"n": 2})
    assert r.status == 200 and r.json()["body"] == '{"n":2}'
    assert len(server.peers) == 2  # the second request went on a new connection
    client.close()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        ApiClient().request_sync("GET", "ftp://example.org/x")


async def test_over_tls_with_the_callers_ca(tmp_path) -> None:
    pytest.importorskip("cryptography")
    from tests.tlscert import contexts

    server_ctx, client_ctx = contexts(tmp_path)
    srv = Server()
    await srv.server.start_server(ssl=server_ctx)
    try:
        client = ApiClient(ssl_context=client_ctx)
        url = str(srv.server.make_url("/echo"))
        assert url.startswith("https://")
        for n in range(2):
            assert (await client.request("POST", url, json={"n": n})).json()["body"] == f'{{"n":{n}}}'
        assert len(srv.peers) == 1  # TLS connections are kept alive too
        client.close()
    finally:
        await srv.server.close()
