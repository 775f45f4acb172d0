"""Behind a site HTTP proxy: with ``HTTP_PROXY`` set, every request of an ImmPort pull (API calls and file
bodies) and of a tus push goes through the proxy, its credentials reach only the proxy, and the bytes land
intact; with ``NO_PROXY`` naming the host, the proxy sees nothing. The proxy is a small forward proxy written
here (absolute-form requests, ``GET http://host:port/path``) that counts what it forwarded."""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport import build_app
from asyncdepo.sim.immport_store import write_study
from asyncdepo.sim.server import ThreadedSim
from tests.conftest import cli_process, tree_digests

PASSWORD = "pa55-w0rd-xyz"
PROXY_USER, PROXY_PASSWORD = "site", "pr0xy-s3cret"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length", "host"}


class ForwardProxy:
    """The proxy's state: ``(method, host:port, path)`` of each request forwarded, and each request's
    ``Proxy-Authorization`` header."""

    def __init__(self) -> None:
        self.forwarded: Counter[tuple[str, str, str]] = Counter()
        self.proxy_auth: Counter[str | None] = Counter()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if "session" in self.__dict__:
            await self.__dict__.pop("session").close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        url = request.url
        if not request.raw_path.startswith("http://"):  # origin-form: a client talking to us as a server
            return web.Response(status=400, text="not a proxy request")
        self.forwarded[(request.method, f"{url.host}:{url.port}", url.path)] += 1
        self.proxy_auth[request.headers.get("Proxy-Authorization")] += 1
        if "session" not in self.__dict__:
            self.__dict__["session"] = aiohttp.ClientSession(auto_decompress=False)
        session: aiohttp.ClientSession = self.__dict__["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with session.request(request.method, request.raw_path, headers=headers, data=body or None,
                                   allow_redirects=False, skip_auto_headers=("Content-Type",)) as upstream:
            data = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=upstream.status, headers=out, body=data)

    def paths(self, method: str | None = None) -> set[str]:
        return {p for (m, _, p) in self.forwarded if method in (None, m)}


@pytest.fixture
def proxy() -> Iterator[tuple[ForwardProxy, str]]:
    state = ForwardProxy()
    with ThreadedSim(state.app) as sim:
        yield state, sim.url


def _immport_pull(tmp_path: Path, sim_url: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_"))}
    base.update(ASYNCDEPO_IMMPORT_PASSWORD=PASSWORD, XDG_CONFIG_HOME=str(tmp_path / "cfg"), **env)
    return subprocess.run([sys.executable, "-m", "asyncdepo.cli", "pull", "immport", "--study", "SDY1", str(out),
                           "--server", sim_url, "--user", "alice", "-q"],
                          env=base, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def immport(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    store = tmp_path / "store"
    write_study(store, "SDY1", 6, 300_000, per_dir=3)
    args = argparse.Namespace(user=[("alice", PASSWORD)], token_lifetime=60.0, token_uses=None,
                              url_lifetime=3600.0)
    with ThreadedSim(lambda: build_app(store, FaultInjector(), args)) as sim:
        yield store, sim.url


def _proxy_env(proxy_url: str, no_proxy: str = "") -> dict[str, str]:
    host = proxy_url.removeprefix("http://")
    return {"HTTP_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@{host}", "NO_PROXY": no_proxy}


def _expected_proxy_auth() -> str:
    return "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()


def test_immport_pull_goes_through_the_proxy(tmp_path: Path, proxy, immport) -> None:
    state, proxy_url = proxy
    store, sim_url = immport
    out = tmp_path / "out"
    res = _immport_pull(tmp_path, sim_url, out, _proxy_env(proxy_url))
    assert res.returncode == 0, res.stderr
    assert tree_digests(out) == tree_digests(store)
    files = {p.relative_to(store).as_posix() for p in store.rglob("*.bin")}
    sim_host = sim_url.removeprefix("http://")
    assert {h for (_, h, _) in state.forwarded} == {sim_host}
    got = state.paths("GET")
    assert all(any(p.endswith(f) for p in got) for f in files), got  # every file body came through the proxy
    assert len(state.paths()) > len(files)  # and the API calls (login, manifest, DRS lookups) too
    assert set(state.proxy_auth) == {_expected_proxy_auth()}  # every request carried the proxy's credentials
    assert PROXY_PASSWORD not in res.stderr + res.stdout


def test_immport_pull_with_no_proxy_goes_direct(tmp_path: Path, proxy, immport) -> None:
    state, proxy_url = proxy
    store, sim_url = immport
    out = tmp_path / "out"
    res = _immport_pull(tmp_path, sim_url, out, _proxy_env(proxy_url, no_proxy="127.0.0.1"))
    assert res.returncode == 0, res.stderr
    assert tree_digests(out) == tree_digests(store)
    assert not state.forwarded


@pytest.mark.parametrize("no_proxy", ["", "127.0.0.1"])
def test_tus_push_through_the_proxy(tmp_path: Path, proxy, threaded_tus, dataset: Path,
                                    monkeypatch: pytest.MonkeyPatch, no_proxy: str) -> None:
    state, proxy_url = proxy
    for k, v in _proxy_env(proxy_url, no_proxy).items():
        monkeypatch.setenv(k, v)
    url = f"tus+{threaded_tus.url}/files/"
    res = cli_process("push", str(dataset), url, "--journal", str(tmp_path / "j.sqlite"), "--chunk-size", "1M",
                      "-q", timeout=120)
    assert res.returncode == 0, res.stderr
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(dataset)
    if no_proxy:
        assert not state.forwarded
        return
    methods = Counter(m for (m, _, _) in state.forwarded.elements())
    assert methods["POST"] >= 44 - 1 and methods["PATCH"] >= 3, methods  # creations and the big files' bodies
    assert {h for (_, h, _) in state.forwarded} == {threaded_tus.url.removeprefix("http://")}
    assert set(state.proxy_auth) == {_expected_proxy_auth()}


async def test_credentials_go_only_where_they_belong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``~/.netrc`` is not read (aiohttp's ``trust_env`` would send its ``default`` entry to every host), a
    cross-origin redirect drops the caller's ``Authorization``, and the proxy's credentials never go to a host
    that ``NO_PROXY`` sends direct."""
    from aiohttp.test_utils import TestServer

    from asyncdepo.transport.httpbody import client_session

    seen: dict[str, list[dict[str, str]]] = {"a": [], "b": []}

    def recorder(name: str, redirect: str | None = None) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            seen[name].append({k.lower(): v for k, v in request.headers.items()})
            if redirect is not None:
                raise web.HTTPFound(redirect)
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        return app

    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password netrc-s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:9")  # never connected to
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with TestServer(recorder("b")) as b:
        a = TestServer(recorder("a", redirect=str(b.make_url("/target"))))
        async with a, client_session() as session:
            async with session.get(a.make_url("/start"), headers={"Authorization": "Bearer tok"}) as r:
                assert r.status == 200 and await r.text() == "ok"
            async with session.get(b.make_url("/plain")) as r:
                assert r.status == 200
    assert seen["a"][0]["authorization"] == "Bearer tok"
    assert len(seen["b"]) == 2 and all("authorization" not in h for h in seen["b"]), seen["b"]
    assert all("proxy-authorization" not in h for h in seen["a"] + seen["b"])
