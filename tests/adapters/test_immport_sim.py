"""The ImmPort simulator over loopback, then the ImmPort adapter against it (HTTPS and ascp routes)."""

from __future__ import annotations

import filecmp
import fnmatch
import hashlib
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from asyncdepo.adapters.immport import Endpoints, ImmportAdapter
from asyncdepo.config import EngineConfig
from asyncdepo.engine.pull import pull
from asyncdepo.errors import AuthError, PermanentError, RemoteValidationError
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.immport import IMMPORT_KEY, ImmportSim, build_app
from asyncdepo.sim.immport_store import file_uuid, write_study
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.ascp.runner import AscpOptions
from tests import requires
from tests.adapters.contract_suite import AdapterContract, Harness


class Clock:
    """A clock the test steps by hand (token expiry without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_study(root, "SDY1", 5, 3000, per_dir=3)
    (root / "SDY1" / "StudyFiles").mkdir()
    (root / "SDY1" / "StudyFiles" / "summary.txt").write_bytes(b"hello immport\n")
    (root / "SDY1" / ".hidden").write_bytes(b"x")
    return root


@pytest.fixture
async def sim(study: Path):
    app = build_app(study, FaultInjector(), None)
    state: ImmportSim = app[IMMPORT_KEY]
    state.users = {"alice": "s3cret"}
    state.clock = Clock()
    async with SimServer(app) as server:
        yield server, state


async def _login(http: aiohttp.ClientSession, url: str, user: str = "alice", password: str = "s3cret") -> str:
    async with http.post(f"{url}/auth/token", data={"username": user, "password": password}) as r:
        assert r.status == 200
        body = await r.json()
    assert body["token"] == body["access_token"]
    return str(body["token"])


async def test_login_wrong_password_and_expiry(sim) -> None:
    server, state = sim
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/auth/token", data={"username": "alice", "password": "no"}) as r:
            assert r.status == 401
            assert "invalid username or password" in (await r.json())["message"]
        token = await _login(http, server.url)
        hdr = {"Authorization": f"bearer {token}"}
        async with http.post(f"{server.url}/data/list", json={"path": "/SDY1"}, headers=hdr) as r:
            assert r.status == 200
        state.clock.now += 61  # past the 60 s default lifetime
        async with http.post(f"{server.url}/data/list", json={"path": "/SDY1"}, headers=hdr) as r:
            assert r.status == 401
            assert "expired" in (await r.json())["message"]
        async with http.post(f"{server.url}/data/list", json={"path": "/SDY1"}) as r:
            assert r.status == 401
    assert state.events["token_expired"] == 1


async def test_token_uses_limit(study: Path) -> None:
    app = build_app(study, FaultInjector(), None)
    state = app[IMMPORT_KEY]
    state.token_uses = 2
    async with SimServer(app) as server, aiohttp.ClientSession() as http:
        token = await _login(http, server.url, "demo", "demo")
        hdr = {"Authorization": f"Bearer {token}"}
        statuses = []
        for _ in range(3):
            async with http.post(f"{server.url}/data/list", json={"path": "/SDY1"}, headers=hdr) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 401]


async def test_list_manifest_and_sidecar(sim, study: Path) -> None:
    server, _ = sim
    target = study / "SDY1/ResultFiles/d00/file00001.bin"
    target.with_name(target.name + ".sim-md5").write_text("0" * 32)
    async with aiohttp.ClientSession() as http:
        hdr = {"Authorization": f"bearer {await _login(http, server.url)}"}
        async with http.post(f"{server.url}/data/list", json={"path": "/SDY1"}, headers=hdr) as r:
            listing = await r.json()
        assert listing["self"]["type"] == "directory"
        assert listing["self"]["fileCount"] == 6
        assert [i["basename"] for i in listing["items"]] == ["ResultFiles", "StudyFiles"]
        async with http.post(f"{server.url}/data/list", json={"path": "/SDY9"}, headers=hdr) as r:
            assert r.status == 404
        async with http.post(f"{server.url}/data/list", json={"path": "/../etc"}, headers=hdr) as r:
            assert r.status == 404
        async with http.get(f"{server.url}/data/query/api/study/manifest/SDY1", headers=hdr) as r:
            rows = await r.json()
    by_path = {row["path"]: row for row in rows}
    assert len(rows) == 6  # the hidden file and the sidecar are not published
    summary = by_path["/SDY1/StudyFiles/summary.txt"]
    assert summary["fileName"] == "summary.txt"
    assert summary["filesizeBytes"] == 14
    assert summary["generatedMD5"] == hashlib.md5(b"hello immport\n").hexdigest()
    assert summary["fileUUID"] == file_uuid("SDY1/StudyFiles/summary.txt")
    assert by_path["/SDY1/ResultFiles/d00/file00001.bin"]["generatedMD5"] == "0" * 32


@pytest.mark.parametrize("kind", ["s3", "stream"])
async def test_drs_and_ranges(sim, study: Path, kind: str) -> None:
    server, state = sim
    rel = "SDY1/ResultFiles/d01/file00003.bin"
    data = (study / rel).read_bytes()
    async with aiohttp.ClientSession() as http:
        hdr = {"Authorization": f"bearer {await _login(http, server.url)}"}
        async with http.get(f"{server.url}/data/query/drs/download/{kind}/{file_uuid(rel)}", headers=hdr) as r:
            body = await r.json()
        assert body["status"] == 200 and body["message"] == "success"
        url = body["url"]
        async with http.get(url) as r:  # signed: no Authorization needed
            assert r.status == 200
            assert await r.read() == data
        async with http.get(url, headers={"Range": "bytes=1000-"}) as r:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
            assert await r.read() == data[1000:]
        async with http.get(url, headers={"Range": "bytes=10-19"}) as r:
            assert await r.read() == data[10:20]
        async with http.get(url, headers={"Range": "bytes=-5"}) as r:
            assert await r.read() == data[-5:]
        async with http.get(url, headers={"Range": f"bytes={len(data)}-"}) as r:
            assert r.status == 416
            assert r.headers["Content-Range"] == f"bytes */{len(data)}"
        async with http.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")) as r:
            assert r.status == 403
        async with http.get(f"{server.url}/data/query/drs/download/{kind}/nope", headers=hdr) as r:
            assert r.status == 404 and (await r.json())["url"] is None
        async with http.get(f"{server.url}/_sim/stats") as r:
            stats = await r.json()
    route = "GET /_s3/immport-shared/{key}" if kind == "s3" else "GET /data/query/drs/stream/{uuid}"
    sent = len(data) + (len(data) - 1000) + 10 + 5
    assert stats["bytes_out"] == {route: sent}
    assert state.bytes_out[route] == sent


async def test_drop_fault_cuts_the_response(sim, study: Path) -> None:
    server, state = sim
    rel = "SDY1/ResultFiles/d00/file00000.bin"
    server.faults.add(FaultRule(kind="drop", method="GET", path="/_s3/*", after=1000))
    async with aiohttp.ClientSession() as http:
        hdr = {"Authorization": f"bearer {await _login(http, server.url)}"}
        async with http.get(f"{server.url}/data/query/drs/download/s3/{file_uuid(rel)}", headers=hdr) as r:
            url = (await r.json())["url"]
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(url) as r:
                async for piece in r.content.iter_any():
                    got += piece
        assert got == (study / rel).read_bytes()[:1000]
        async with http.get(url, headers={"Range": "bytes=1000-"}) as r:  # the rule hit only the first GET
            assert await r.read() == (study / rel).read_bytes()[1000:]
    assert sum(state.bytes_out.values()) == 3000


async def test_aspera_token_scope(sim) -> None:
    server, _ = sim
    async with aiohttp.ClientSession() as http:
        hdr = {"Authorization": f"bearer {await _login(http, server.url)}"}
        async with http.post(f"{server.url}/data/download/token", headers=hdr,
                             json={"paths": ["/SDY1/StudyFiles/summary.txt", "/SDY1/ResultFiles/d01"]}) as r:
            token = (await r.json())["token"]
        async with http.post(f"{server.url}/data/download/token", headers=hdr, json={"paths": ["/SDY7/x"]}) as r:
            assert r.status == 404 and "/SDY7/x" in (await r.json())["message"]

        async def check(paths: list[str], tok: str = token) -> int:
            async with http.post(f"{server.url}/_sim/aspera/check", json={"token": tok, "paths": paths}) as r:
                return r.status

        assert await check(["/SDY1/StudyFiles/summary.txt", "SDY1/ResultFiles/d01/file00004.bin"]) == 200
        assert await check(["/SDY1/ResultFiles/d00/file00000.bin"]) == 401
        assert await check(["/SDY1/ResultFiles/d01/../d00/file00000.bin"]) == 401
        assert await check(["/SDY1/StudyFiles/summary.txt"], "forged") == 401


async def test_stats_reset_and_expire_endpoint(sim) -> None:
    server, _ = sim
    async with aiohttp.ClientSession() as http:
        token = await _login(http, server.url)
        async with http.post(f"{server.url}/_sim/immport/expire") as r:
            assert r.status == 200
        async with http.post(f"{server.url}/data/list", json={"path": "/SDY1"},
                             headers={"Authorization": f"bearer {token}"}) as r:
            assert r.status == 401
        async with http.post(f"{server.url}/_sim/reset") as r:
            assert r.status == 200
        async with http.get(f"{server.url}/_sim/stats") as r:
            stats = await r.json()
    assert stats["bytes_out"] == {} and stats["immport"] == {} and "requests" in stats


# -- the adapter against the simulator --------------------------------------------------------------


def _adapter(url: str, **kw) -> ImmportAdapter:
    kw.setdefault("user", "alice")
    kw.setdefault("password", "s3cret")
    return ImmportAdapter(endpoints=Endpoints.single(url), **kw)


async def _collect(adapter: ImmportAdapter) -> dict:
    return {item.rel: item async for item in adapter.list_remote()}


async def test_adapter_lists_study_paths_and_plain_listing(sim, study: Path) -> None:
    server, _ = sim
    (study / "ALLSTUDIES").mkdir()
    (study / "ALLSTUDIES" / "dump.zip").write_bytes(b"z" * 10)
    async with _adapter(server.url, study="SDY1") as a:
        items = await _collect(a)
    assert len(items) == 6
    summary = items["SDY1/StudyFiles/summary.txt"]
    assert summary.size == 14 and summary.digests == {"md5": hashlib.md5(b"hello immport\n").hexdigest()}
    assert summary.ref == file_uuid("SDY1/StudyFiles/summary.txt")

    async with _adapter(server.url, paths=["/SDY1/ResultFiles/d01", "SDY1/StudyFiles/summary.txt",
                                           "/ALLSTUDIES"]) as a:
        items = await _collect(a)
    assert sorted(items) == ["ALLSTUDIES/dump.zip", "SDY1/ResultFiles/d01/file00003.bin",
                             "SDY1/ResultFiles/d01/file00004.bin", "SDY1/StudyFiles/summary.txt"]
    plain = items["ALLSTUDIES/dump.zip"]
    assert plain.size == 10 and plain.digests == {} and plain.ref == ""
    async with _adapter(server.url, paths=["/ALLSTUDIES/dump.zip"]) as a:
        with pytest.raises(PermanentError, match="--via ascp"):
            [b async for b in a.read(plain, 0)]
    async with _adapter(server.url, paths=["/SDY1/nope"]) as a:
        with pytest.raises(RemoteValidationError, match="Path not found"):
            await _collect(a)


@pytest.mark.parametrize("drs", ["s3", "stream"])
async def test_adapter_reads_from_an_offset(sim, study: Path, drs: str) -> None:
    server, _ = sim
    rel = "SDY1/ResultFiles/d00/file00002.bin"
    data = (study / rel).read_bytes()
    async with _adapter(server.url, paths=["/" + rel], drs=drs) as a:
        (item,) = (await _collect(a)).values()
        assert b"".join([b async for b in a.read(item, 0)]) == data
        assert b"".join([b async for b in a.read(item, 1234)]) == data[1234:]
        assert [b async for b in a.read(item, len(data))] == []


async def test_adapter_renews_an_expired_token(sim, study: Path) -> None:
    server, state = sim
    state.token_uses = 3  # every token dies after three API calls
    async with _adapter(server.url, study="SDY1") as a:
        items = await _collect(a)
        for item in items.values():
            got = b"".join([b async for b in a.read(item, 0)])
            assert hashlib.md5(got).hexdigest() == item.digests["md5"]
        assert a.logins >= 3
    assert state.events["token_expired"] == a.logins - 1


async def test_adapter_wrong_password_is_a_clear_auth_error(sim) -> None:
    server, _ = sim
    async with _adapter(server.url, study="SDY1", password="wrong-pw-123") as a:
        with pytest.raises(AuthError) as info:
            await _collect(a)
    text = info.value.describe()
    assert "login refused for user 'alice'" in text and "invalid username or password" in text
    assert "ASYNCDEPO_IMMPORT_PASSWORD" in text and "wrong-pw-123" not in text


# -- whole pulls: the generic engine (https) and the ascp route ---------------------------------------------


SIM_ASCP = shutil.which("asyncdepo-sim-ascp") or str(Path(sys.executable).parent / "asyncdepo-sim-ascp")
FAST = EngineConfig(transfers=8, retries=1, request_attempts=2, item_attempts=1)


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths of the files under ``a``; asserts ``b`` holds byte-identical copies and nothing else."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file() and not p.name.startswith("."))
    got = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert got == files
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    return files


@pytest.fixture
async def big_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A study of 300 small files of varied sizes, and the stand-in ascp pointed at the same storage."""
    root = tmp_path / "store"
    write_study(root, "SDY1", 300, 1, per_dir=100)
    for i, p in enumerate(sorted((root / "SDY1").rglob("*.bin"))):
        p.write_bytes(bytes([i % 251]) * (i * 37 % 5000))  # 0 to 4999 bytes, empty files included
    app = build_app(root, FaultInjector(), None)
    state = app[IMMPORT_KEY]
    state.users = {"alice": "s3cret"}
    async with SimServer(app) as server:
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_ROOT", str(root))
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_TOKEN_URL", f"{server.url}/_sim/aspera/check")
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_COUNTERS", str(tmp_path / "ascp-counters.jsonl"))
        yield server, state, root


def _ascp_opts(**kw) -> AscpOptions:
    return AscpOptions(ascp=SIM_ASCP, mode="recv", host="127.0.0.1", user="databrowser", tcp_port=33001,
                       udp_port=33001, resume=2, management_port=True, stall_timeout=60, **kw)


async def test_study_of_300_files_by_both_routes(big_sim, tmp_path: Path) -> None:
    server, state, root = big_sim
    state.token_uses = 97  # the bearer token dies several times mid-run: renewed, never a failure
    async with _adapter(server.url, study="SDY1") as a:
        report = await pull(a, tmp_path / "https", FAST)
    assert report.ok, report.failures
    assert report.files_done == 300 and a.logins > 3
    _same_tree(root, tmp_path / "https")
    total = sum(p.stat().st_size for p in root.rglob("*.bin"))
    assert sum(state.bytes_out.values()) == total  # each byte served once

    state.reset()
    async with _adapter(server.url, study="SDY1") as a:  # a rerun finds everything present
        again = await pull(a, tmp_path / "https", FAST)
    assert again.ok and again.files_skipped == 300 and sum(state.bytes_out.values()) == 0

    report = await pull(_adapter(server.url, study="SDY1", ascp=_ascp_opts()), tmp_path / "ascp", FAST)
    assert report.ok, report.failures
    assert report.files_done == 300 and report.bytes == total
    _same_tree(root, tmp_path / "ascp")
    sessions = [json.loads(x) for x in (tmp_path / "ascp-counters.jsonl").read_text().splitlines()]
    assert len(sessions) == 1 and sessions[0]["files"] == 300 and sessions[0]["bytes"] == total

    report = await pull(_adapter(server.url, study="SDY1", ascp=_ascp_opts()), tmp_path / "ascp", FAST)
    assert report.ok and report.files_skipped == 300
    assert len((tmp_path / "ascp-counters.jsonl").read_text().splitlines()) == 1  # no new session


async def test_https_resumes_dropped_responses(big_sim, tmp_path: Path) -> None:
    server, state, root = big_sim
    server.faults.add(FaultRule(kind="drop", method="GET", path="/_s3/*", after=1500, every=7))
    async with _adapter(server.url, paths=["/SDY1/ResultFiles/d00"]) as a:
        report = await pull(a, tmp_path / "out", FAST.replace(request_attempts=4))
    assert report.ok, report.failures
    _same_tree(root / "SDY1/ResultFiles/d00", tmp_path / "out/SDY1/ResultFiles/d00")
    drops = state.events["responses_cut"]  # the rule also hits files shorter than 1500 bytes: no cut
    total = sum(p.stat().st_size for p in (root / "SDY1/ResultFiles/d00").iterdir())
    assert drops > 3 and report.retries == drops
    # each drop re-sends at most what the kernel had not delivered: never a whole file again
    assert total <= sum(state.bytes_out.values()) <= total + drops * 1500


@pytest.mark.parametrize("route", ["https", "ascp"])
async def test_corrupted_file_is_reported(big_sim, tmp_path: Path, route: str) -> None:
    server, _, root = big_sim
    bad = root / "SDY1/ResultFiles/d01/file00150.bin"
    bad.with_name(bad.name + ".sim-md5").write_text("0123456789abcdef0123456789abcdef")
    adapter = _adapter(server.url, paths=["/SDY1/ResultFiles/d01"], ascp=_ascp_opts() if route == "ascp" else None)
    async with adapter:
        report = await pull(adapter, tmp_path / "out", FAST)
    assert not report.ok and report.files_done == 99
    assert [rel for rel, _ in report.failures] == ["SDY1/ResultFiles/d01/file00150.bin"]
    assert "md5 mismatch" in report.failures[0][1]
    out = tmp_path / "out/SDY1/ResultFiles/d01"
    assert not (out / "file00150.bin").exists() and not (out / "file00150.bin.asyncdepo-part").exists()


async def test_an_untrusted_tls_certificate_fails_at_once_and_says_so(tmp_path: Path) -> None:
    requires.module("cryptography")
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from tests.tlscert import contexts

    server_ctx, _ = contexts(tmp_path)
    srv = TestServer(web.Application(), host="127.0.0.1")
    await srv.start_server(ssl=server_ctx)
    try:
        async with _adapter(str(srv.make_url("")).rstrip("/"), study="SDY1") as a:
            with pytest.raises(PermanentError, match="TLS certificate is not trusted"):
                await a.authenticate()
            assert a.logins == 0
    finally:
        await srv.close()


@pytest.mark.parametrize("route", ["https", "ascp"])
async def test_include_and_exclude_choose_the_files_on_both_routes(big_sim, tmp_path: Path, route: str) -> None:
    server, _, root = big_sim
    config = FAST.replace(include=("SDY1/ResultFiles/d02/*",), exclude=("file002[0-4]*.bin",))
    adapter = _adapter(server.url, study="SDY1", ascp=_ascp_opts() if route == "ascp" else None)
    async with adapter:
        report = await pull(adapter, tmp_path / "out", config)
    assert report.ok, report.failures
    want = sorted(p.name for p in (root / "SDY1/ResultFiles/d02").glob("*.bin")
                  if not fnmatch.fnmatchcase(p.name, "file002[0-4]*.bin"))
    got = sorted(p.name for p in (tmp_path / "out").rglob("*.bin"))
    assert got == want and report.files_done == len(want) > 0


async def test_behind_a_tls_front_the_signed_urls_say_https(sim, study: Path) -> None:
    """A proxy terminating TLS passes the client's Host and ``X-Forwarded-Proto: https``: the DRS URL must
    name the proxy with https (what the clients were given), and still serve the file when fetched."""
    server, _ = sim
    rel = "SDY1/ResultFiles/d01/file00003.bin"
    front = "front.example:8443"
    async with aiohttp.ClientSession() as http:
        hdr = {"Authorization": f"bearer {await _login(http, server.url)}"}
        async with http.get(f"{server.url}/data/query/drs/download/s3/{file_uuid(rel)}",
                            headers={**hdr, "Host": front, "X-Forwarded-Proto": "https"}) as r:
            url = (await r.json())["url"]
        assert url.startswith(f"https://{front}/"), url
        async with http.get(f"{server.url}/data/query/drs/download/s3/{file_uuid(rel)}", headers=hdr) as r:
            direct = (await r.json())["url"]
        assert direct.startswith(f"{server.url}/")  # without the header, the simulator's own origin
        async with http.get(server.url + url.removeprefix(f"https://{front}"), headers={"Host": front}) as r:
            assert r.status == 200 and await r.read() == (study / rel).read_bytes()  # the signature holds


class TestContract(AdapterContract):
    """The shared contract suite (tests/adapters/contract_suite.py) over the ImmPort adapter, a pull-only one:
    the suite's files are put into a study, faults aim at the signed file GETs, and the hold point of the
    simulator (response bytes) stops a pull mid-body."""

    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        import anyio

        store = tmp_path / "store"
        store.mkdir()
        app = build_app(store, FaultInjector(), None)
        host: ImmportSim = app[IMMPORT_KEY]
        host.users = {"alice": "s3cret"}

        def seed(files: dict[str, bytes]) -> None:
            for rel, data in files.items():
                (store / "SDY1" / rel).parent.mkdir(parents=True, exist_ok=True)
                (store / "SDY1" / rel).write_bytes(data)

        def pause(n: int) -> anyio.Event:
            reached = anyio.Event()
            host.on_hold[:] = [reached.set]
            host.hold(n)
            return reached

        async with SimServer(app) as server:
            yield Harness(lambda cfg: _adapter(server.url, study="SDY1"), seed=seed, faults=server.faults,
                          data=("GET", "/_s3/immport-shared/*"), pulled_prefix="SDY1", pause=pause,
                          resume=lambda: host.hold(None))
