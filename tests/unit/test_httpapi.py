"""The threaded API client (asyncdepo.transport.httpapi): bodies, keep-alive reuse, stale connections; each over
plain HTTP and over TLS (a self-signed certificate only the test's client context trusts)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncdepo.transport.httpapi import ApiClient
from tests.conftest import start_over


class Server:
    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.transports: list[asyncio.Transport] = []
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        self.server = TestServer(app, host="127.0.0.1")
        self.client_ctx: ssl.SSLContext | None = None

    def client(self) -> ApiClient:
        return ApiClient(ssl_context=self.client_ctx)

    async def echo(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.transports.append(request.transport)  # type: ignore[arg-type]
        body = await request.read()
        return web.json_response({"type": request.content_type, "body": body.decode(),
                                  "auth": request.headers.get("Authorization")})


@pytest.fixture(params=["http", "https"])
async def server(request: pytest.FixtureRequest, tmp_path: Path):
    srv = Server()
    srv.client_ctx = await start_over(srv.server, request.param, tmp_path)
    yield srv
    await srv.server.close()


async def test_json_and_form_bodies_and_headers(server: Server) -> None:
    client = server.client()
    url = str(server.server.make_url("/echo"))
    r = await client.request("POST", url, json={"paths": ["/SDY1"]}, headers={"Authorization": "bearer t"})
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {"type": "application/json", "body": '{"paths":["/SDY1"]}', "auth": "bearer t"}
    r = await client.request("POST", url, form={"username": "a b", "password": "p&q"})
    assert r.json()["type"] == "application/x-www-form-urlencoded"
    assert r.json()["body"] == "username=a+b&password=p%26q"
    client.close()


async def test_connections_are_kept_alive_and_reused(server: Server) -> None:
    client = server.client()
    url = str(server.server.make_url("/echo"))
    for _ in range(5):
        assert (await client.request("POST", url, json={})).status == 200
    assert len(server.peers) == 1
    client.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server) -> None:
    client = server.client()
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


@pytest.mark.parametrize("server", ["https"], indirect=True)
async def test_a_certificate_the_client_does_not_trust_is_refused(server: Server) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await ApiClient().request("POST", str(server.server.make_url("/echo")), json={})
