"""The API client (asyncdepo.transport.httpapi, on aiohttp): bodies, keep-alive reuse, stale connections,
errors through the boundary; each over plain HTTP and over TLS (a self-signed certificate only the test's
client context trusts)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncdepo.errors import PermanentError, TransientError, is_transient
from asyncdepo.transport.httpapi import ApiClient, Reply
from tests.conftest import start_over


class Server:
    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.transports: list[asyncio.Transport] = []
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_get("/echo", self.echo)
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


async def closing(client: ApiClient, method: str, url: str, **kw: Any) -> Reply:
    try:
        return await client.request(method, url, **kw)
    finally:
        await client.aclose()


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
    await client.aclose()


async def test_connections_are_kept_alive_and_reused(server: Server) -> None:
    client = server.client()
    url = str(server.server.make_url("/echo"))
    for _ in range(5):
        assert (await client.request("POST", url, json={})).status == 200
    assert len(server.peers) == 1
    await client.aclose()


async def test_a_connection_the_server_closed_while_idle_is_replaced(server: Server) -> None:
    """The server drops an idle keep-alive connection just before the next request: an idempotent request goes
    again on a new connection (aiohttp's own resend of a request that found its pooled connection closed; a
    POST would come out as a TransientError for the pacer to retry)."""
    client = server.client()
    url = str(server.server.make_url("/echo"))
    assert (await client.request("POST", url, json={"n": 1})).status == 200
    server.transports[-1].close()  # the server drops the idle keep-alive connection
    r = await client.request("GET", url)
    assert r.status == 200 and r.json()["body"] == ""
    assert len(server.peers) == 2  # the second request went on a new connection
    await client.aclose()


async def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        await ApiClient().request("GET", "ftp://example.org/x")


@pytest.mark.parametrize("server", ["https"], indirect=True)
async def test_a_certificate_the_client_does_not_trust_is_refused(server: Server) -> None:
    with pytest.raises(PermanentError, match=r"POST /echo: the server's TLS certificate is not trusted") as info:
        await closing(ApiClient(), "POST", str(server.server.make_url("/echo?sig=s3cret")), json={})
    assert info.value.hint is not None and "SSL_CERT_FILE" in info.value.hint
    assert not is_transient(info.value)


async def test_a_server_that_is_not_there_is_a_transient_error_naming_the_request(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientError, match=r"^POST /auth/token: ") as info:
        await closing(ApiClient(timeout=5), "POST", f"http://127.0.0.1:{port}/auth/token?x=s3cret", form={"a": "b"})
    assert "s3cret" not in str(info.value)


async def test_a_server_that_never_answers_times_out_as_transient() -> None:
    import socket

    with socket.socket() as listener:  # accepts (the kernel does) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/data/query/drs/x"
        with pytest.raises(TransientError, match=r"^GET /data/query/drs/x: timed out$"):
            await closing(ApiClient(timeout=0.5), "GET", url)
