"""The ImmPort adapter's recovery and refusal paths, each reached on the wire: faults of the simulator's injector
(5xx, 429, dropped and Range-ignoring file responses), tokens the simulator expires, and a server that answers
in shapes ImmPort does not (the adapter's checks of what it is told)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from asyncdepo.adapters.immport import READ_BLOCK, Endpoints, ImmportAdapter, Secret
from asyncdepo.contract import Fetch, FetchPlan, Item, RemoteItem
from asyncdepo.engine.pull import pull
from asyncdepo.errors import AuthError, RemoteValidationError, TransientError, UsageError
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.immport import IMMPORT_KEY, build_app
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.pacer import Pacer, RetryPolicy
from tests.adapters.test_immport_sim import FAST, _ascp_opts, sim, study  # noqa: F401  (fixtures)
from tests.fakeclock import FakeClock

LOGIN = "POST /auth/token"
FILE = "GET /_s3/immport-shared/{key}"


def _adapter(url: str | Endpoints, **kw) -> ImmportAdapter:
    kw.setdefault("user", "alice")
    kw.setdefault("password", "s3cret")
    kw.setdefault("paths", ["/SDY1"])
    return ImmportAdapter(endpoints=url if isinstance(url, Endpoints) else Endpoints.single(url), **kw)


def _pacer(clock: FakeClock, attempts: int = 3) -> Pacer:
    return Pacer(RetryPolicy(attempts=attempts, base=1.0, cap=1.0), clock=clock, rng=lambda: 0.5)


async def _item(adapter: ImmportAdapter, rel: str) -> RemoteItem:
    return {i.rel: i async for i in adapter.list_remote()}[rel]


async def _drain(adapter: ImmportAdapter, item: RemoteItem, offset: int, into: list[bytes]) -> None:
    async for block in adapter.read(item, offset):
        into.append(block)


# -- options: refused before anything is sent --------------------------------------------------------


@pytest.mark.parametrize(("kw", "words"), [
    ({"study": "study1"}, "--study 'study1': expected an accession like SDY1"),
    ({"drs": "ftp"}, "DRS access method 'ftp': expected s3 or stream"),
    ({"paths": []}, "nothing to pull"),
    ({"paths": ["/SDY1/../../etc"]}, "not an ImmPort path among ['/SDY1/../../etc']"),
    ({"paths": ["/"]}, "not an ImmPort path"),
    ({"ascp": object(), "session_files": 0}, "--batch-files must be at least 1"),
])
def test_bad_options_are_usage_errors(kw: dict, words: str) -> None:
    with pytest.raises(UsageError) as info:
        _adapter("http://127.0.0.1:9", **kw)
    assert words in str(info.value)


async def test_the_password_never_prints_and_misuse_says_what_to_do(tmp_path: Path) -> None:
    a = _adapter("http://127.0.0.1:9", password="pw-Very-Secret")
    assert repr(a._password) == str(a._password) == "Secret(***)" == repr(Secret("x"))
    assert "pw-Very-Secret" not in repr(vars(a)) and "pw-Very-Secret" not in a.describe()
    with pytest.raises(RuntimeError, match="async with ImmportAdapter"):
        _ = a.http
    async with a:
        with pytest.raises(UsageError, match="no ascp options"):
            await a.open_fetch_session(FetchPlan(root=tmp_path, fetches=()))
        with pytest.raises(UsageError, match="read-only here: use 'asyncdepo pull immport'"):
            await a.open_item(Item(path=str(tmp_path / "x"), rel="x", size=1, mtime_ns=0), None)


def test_a_manifest_row_whose_path_is_its_directory_names_the_file() -> None:
    row = {"path": "/SDY1/ResultFiles/", "fileName": "a.fcs", "generatedMD5": "AB" * 16, "filesizeBytes": 3,
           "fileUUID": "u1"}
    item = ImmportAdapter.item_of(row)
    assert (item.rel, item.size, item.digests, item.ref) == ("SDY1/ResultFiles/a.fcs", 3, {"md5": "ab" * 16}, "u1")
    bare = ImmportAdapter.item_of({"path": "/SDY1/ResultFiles/b.fcs", "fileName": "b.fcs", "generatedMD5": "n/a"})
    assert (bare.rel, bare.size, bare.digests, bare.ref) == ("SDY1/ResultFiles/b.fcs", None, {}, "")


# -- authentication against the simulator --------------------------------------------------------------


async def test_a_login_answered_503_then_429_is_retried_and_logs_in_once(sim) -> None:  # noqa: F811
    server, state = sim
    server.faults.add(FaultRule(kind="status", method="POST", path="/auth/token", status=503, first=1))
    server.faults.add(FaultRule(kind="status", method="POST", path="/auth/token", status=429, retry_after=7,
                                first=1))  # the next one: the 503 rule counts only its own hits
    clock = FakeClock()
    async with _adapter(server.url, pacer=_pacer(clock)) as a:
        await a.authenticate()
        items = [i async for i in a.list_remote()]
    assert len(items) == 6 and a.logins == 1
    assert state.events["tokens_issued"] == 1 and server.faults.requests[LOGIN] == 3
    assert clock.slept == [0.5, 7.0]  # the backoff, then the wait the 429 named


async def test_a_login_that_keeps_failing_gives_up_with_the_status(sim) -> None:  # noqa: F811
    server, state = sim
    server.faults.add(FaultRule(kind="status", method="POST", path="/auth/token", status=500, first=0))
    async with _adapter(server.url, pacer=_pacer(FakeClock())) as a:
        with pytest.raises(TransientError) as info:
            await a.authenticate()
    assert "ImmPort login failed with HTTP 500" in str(info.value)
    assert server.faults.requests[LOGIN] == 3 and a.logins == 0 and state.events["tokens_issued"] == 0


async def test_a_token_refused_again_after_its_renewal_is_an_auth_error(sim) -> None:  # noqa: F811
    server, state = sim
    state.token_uses = 0  # every token is dead on arrival
    async with _adapter(server.url) as a:
        with pytest.raises(AuthError) as info:
            [i async for i in a.list_remote()]
    assert "failed with HTTP 401: Access token expired" in str(info.value)
    assert a.logins == 2 and state.events["token_expired"] == 2  # one renewal, not a loop


async def test_concurrent_workers_log_in_once_and_renew_an_expired_token_once(sim, study: Path) -> None:  # noqa: F811
    server, state = sim
    async with _adapter(server.url, study="SDY1") as a:
        rows = await anyio.to_thread.run_sync(state.manifest, "SDY1")
        items = [ImmportAdapter.item_of(r) for r in rows]
        urls: list[str] = []

        async def lookups() -> None:
            async def one(item: RemoteItem) -> None:
                urls.append(await a.signed_url(item))

            async with anyio.create_task_group() as tg:
                for item in items:
                    tg.start_soon(one, item)

        await lookups()  # six workers, no token yet: one login
        assert a.logins == 1 and state.events["tokens_issued"] == 1
        state.expire_all()
        await lookups()  # six workers meet the same expired token: one renewal
        assert a.logins == 2 and state.events["tokens_issued"] == 2
        assert state.events["token_expired"] >= 1
        for item in items:  # the URLs work
            got = b"".join([b async for b in a.read(item, 0)])
            assert got == (study / item.rel).read_bytes()
    assert len(urls) == 12


# -- listing --------------------------------------------------------------------------------------------


async def test_paths_outside_the_manifest_are_listed_nested_and_each_once(sim, study: Path) -> None:  # noqa: F811
    server, _ = sim
    top = study / "ALLSTUDIES"
    (top / "2024" / "q1").mkdir(parents=True)
    (top / "2024" / "q1" / "dump.zip").write_bytes(b"z" * 10)
    (top / "readme.txt").write_bytes(b"r" * 3)
    async with _adapter(server.url, paths=["/ALLSTUDIES", "/ALLSTUDIES/readme.txt",
                                           "/ALLSTUDIES/2024/q1/dump.zip"]) as a:
        items = [(i.rel, i.size, i.digests, i.ref) async for i in a.list_remote()]
    assert items == [("ALLSTUDIES/2024/q1/dump.zip", 10, {}, ""), ("ALLSTUDIES/readme.txt", 3, {}, "")]
    assert server.faults.requests["POST /data/list"] == 5  # 3 directories, then the two files by themselves


async def test_a_study_and_paths_in_it_use_one_manifest_and_give_each_file_once(sim) -> None:  # noqa: F811
    server, _ = sim
    async with _adapter(server.url, study="SDY1",
                        paths=["/SDY1/StudyFiles", "/SDY1/ResultFiles/d00/file00000.bin"]) as a:
        rels = [i.rel async for i in a.list_remote()]
    assert len(rels) == len(set(rels)) == 6
    assert server.faults.requests["GET /data/query/api/study/manifest/{study}"] == 1


async def test_a_path_in_an_unknown_study_is_not_found_by_both_services(sim) -> None:  # noqa: F811
    server, _ = sim
    async with _adapter(server.url, paths=["/SDY9/ResultFiles/x.fcs"]) as a:
        with pytest.raises(RemoteValidationError) as info:
            [i async for i in a.list_remote()]
    assert "Path not found: /SDY9/ResultFiles/x.fcs" in str(info.value)
    assert server.faults.requests["GET /data/query/api/study/manifest/{study}"] == 1  # Study SDY9 not found
    assert server.faults.requests["POST /data/list"] == 1


# -- reading the signed URLs: faults on the file GETs -----------------------------------------------------


REL = "SDY1/ResultFiles/d01/file00003.bin"


@pytest.mark.parametrize("after", [1000, 0])
async def test_a_body_cut_mid_way_keeps_what_arrived_and_the_next_read_resumes(sim, study: Path,  # noqa: F811
                                                                              after: int) -> None:
    server, state = sim
    data = (study / REL).read_bytes()
    server.faults.add(FaultRule(kind="drop", method="GET", path="/_s3/*", after=after))
    async with _adapter(server.url, paths=["/" + REL]) as a:
        item = await _item(a, REL)
        got: list[bytes] = []
        with pytest.raises(TransientError) as info:
            await _drain(a, item, 0, got)
        assert b"".join(got) == data[:after]
        assert str(info.value).startswith(f"GET {REL}") and "Signature" not in str(info.value)
        await _drain(a, item, after, got)
    assert b"".join(got) == data
    assert state.events["responses_cut"] == 1 and state.bytes_out[FILE] == len(data)


async def test_a_server_that_ignores_range_resends_the_start_which_is_dropped(sim, study: Path) -> None:  # noqa: F811
    server, state = sim
    data = (study / REL).read_bytes()
    server.faults.add(FaultRule(kind="norange", method="GET", path="/_s3/*"))
    async with _adapter(server.url, paths=["/" + REL]) as a:
        item = await _item(a, REL)
        got: list[bytes] = []
        await _drain(a, item, 1234, got)
    assert b"".join(got) == data[1234:]
    assert state.bytes_out[FILE] == len(data)  # the whole file came: Range was ignored


@pytest.mark.parametrize(("status", "error", "words"), [
    (503, TransientError, "failed with HTTP 503"),
    (404, RemoteValidationError, "failed with HTTP 404"),
])
async def test_a_file_get_answered_with_an_error_status(sim, status: int, error: type,  # noqa: F811
                                                         words: str) -> None:
    server, state = sim
    server.faults.add(FaultRule(kind="status", method="GET", path="/_s3/*", status=status))
    async with _adapter(server.url, paths=["/" + REL]) as a:
        item = await _item(a, REL)
        with pytest.raises(error) as info:
            await _drain(a, item, 0, [])
    assert type(info.value) is error and str(info.value).startswith(f"GET {REL} {words}")
    assert state.bytes_out[FILE] == 0


async def test_an_expired_signed_url_is_refused(sim) -> None:  # noqa: F811
    server, state = sim
    state.url_lifetime = 0  # the URL is stale when it arrives
    async with _adapter(server.url, paths=["/" + REL]) as a:
        item = await _item(a, REL)
        with pytest.raises(AuthError, match=f"GET {REL} failed with HTTP 403: Request has expired"):
            await _drain(a, item, 0, [])
    assert state.bytes_out[FILE] == 0


@pytest.mark.parametrize("size", [READ_BLOCK, 2 * READ_BLOCK + 5])
async def test_bodies_arrive_in_blocks_of_at_least_read_block(sim, study: Path, size: int) -> None:  # noqa: F811
    server, _ = sim
    path = study / "SDY1" / "StudyFiles" / "big.bin"
    path.write_bytes(hashlib.sha256(b"seed").digest() * (size // 32) + b"t" * (size % 32))
    async with _adapter(server.url, paths=["/SDY1/StudyFiles/big.bin"]) as a:
        item = await _item(a, "SDY1/StudyFiles/big.bin")
        blocks: list[bytes] = []
        await _drain(a, item, 0, blocks)
    assert b"".join(blocks) == path.read_bytes() and len(b"".join(blocks)) == size
    assert all(len(b) >= READ_BLOCK for b in blocks[:-1])  # the socket's pieces joined: only the last is short
    assert len(blocks) == 1 if size == READ_BLOCK else 2 <= len(blocks) <= 3


# -- a server that does not answer like ImmPort ---------------------------------------------------------


class Odd:
    """An HTTP server that answers the ImmPort routes with shapes ImmPort never sends (the login with a page
    of HTML or no token, a manifest that is no list ...), to reach the adapter's checks of each answer."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.login: Callable[[], web.Response] = lambda: web.json_response({"token": "t0"})
        self.answers: dict[str, object] = {}

    def app(self) -> web.Application:
        app = web.Application()

        async def login(_: web.Request) -> web.Response:
            return self.login()

        async def api(request: web.Request) -> web.StreamResponse:
            key = request.path.rsplit("/", 1)[0] if "/drs/" in request.path else request.path
            return web.json_response(self.answers[key])

        async def file(request: web.Request) -> web.Response:
            data = (self.store / request.match_info["rel"]).read_bytes()
            start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
            return web.Response(status=206, body=data[start - 1:],  # one byte early: the wrong range
                                headers={"Content-Range": f"bytes {start - 1}-{len(data) - 1}/{len(data)}"})

        app.router.add_post("/auth/token", login)
        app.router.add_route("*", "/data/{tail:.*}", api)
        app.router.add_get("/files/{rel:.*}", file)
        return app


@pytest.fixture
async def odd(tmp_path: Path) -> AsyncIterator[tuple[str, Odd]]:
    host = Odd(tmp_path)
    async with SimServer(host.app()) as server:
        yield server.url, host


@pytest.mark.parametrize(("login", "error", "words"), [
    (lambda: web.Response(text="<html>Down for maintenance</html>", content_type="text/html"),
     RemoteValidationError, "ImmPort login: the answer is not JSON ('Down for maintenance')"),
    (lambda: web.json_response({"status": 200}), AuthError, "ImmPort login answered without a token"),
], ids=["html", "no-token"])
async def test_a_login_answer_without_a_token_is_refused(odd, login: Callable[[], web.Response], error: type,
                                                        words: str) -> None:
    url, host = odd
    host.login = login
    async with _adapter(url) as a:
        with pytest.raises(error) as info:
            await a.authenticate()
    assert words in str(info.value) and a.logins == 0


async def test_answers_of_the_wrong_shape_are_refused_or_skipped(odd, tmp_path: Path) -> None:
    url, host = odd
    manifest, listing = "/data/query/api/study/manifest/SDY1", "/data/list"
    row = {"path": "/SDY1/a.bin", "fileName": "a.bin", "fileUUID": "u-a", "filesizeBytes": 5}
    host.answers = {manifest: {"rows": []}, "/data/download/token": {"status": "ok"},
                    "/data/query/drs/download/s3": {"message": "File is being migrated", "url": None},
                    listing: {"self": {"type": "directory", "path": "/X"},
                              "items": [{"type": "link", "path": "/X/l"}, {"type": "file", "path": "/X/f", "size": 1}]}}
    async with _adapter(url, study="SDY1") as a:
        with pytest.raises(RemoteValidationError, match="manifest of SDY1: expected a list of files"):
            [i async for i in a.list_remote()]
        assert [i.rel async for i in a.resolve("/X")] == ["X/f"]  # an entry neither file nor directory: skipped
        with pytest.raises(AuthError, match="ImmPort gave no Aspera token"):
            await a.aspera_token(["/SDY1/a.bin"])
        with pytest.raises(RemoteValidationError, match="DRS lookup of SDY1/a.bin: File is being migrated"):
            await a.signed_url(ImmportAdapter.item_of(row))
    host.answers[manifest] = [row, row]  # a file listed twice is fetched once
    async with _adapter(url, study="SDY1") as a:
        assert [i.rel async for i in a.list_remote()] == ["SDY1/a.bin"]


async def test_a_ranged_answer_that_starts_elsewhere_is_not_used(odd, tmp_path: Path) -> None:
    url, host = odd
    (tmp_path / "SDY1").mkdir()
    (tmp_path / "SDY1" / "a.bin").write_bytes(bytes(range(200)))
    row = {"path": "/SDY1/a.bin", "fileUUID": "u-a", "filesizeBytes": 200}
    host.answers["/data/query/drs/download/s3"] = {"url": f"{url}/files/SDY1/a.bin"}
    async with _adapter(url, study="SDY1") as a:
        with pytest.raises(TransientError) as info:
            await _drain(a, ImmportAdapter.item_of(row), 50, [])
    assert str(info.value) == "GET SDY1/a.bin: asked for bytes from 50, got 'bytes 49-199/200'"



# -- the ascp route: a name ascp cannot carry, the token kept out of sight ---------------------------------


@pytest.fixture
async def ascp_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A study with a file whose name holds a line break (a pair list cannot name it) beside two plain ones,
    and the stand-in ascp pointed at the same storage."""
    root = tmp_path / "store"
    (root / "SDY2" / "StudyFiles").mkdir(parents=True)
    files = {"SDY2/StudyFiles/a.txt": b"alpha\n" * 50, "SDY2/StudyFiles/b.txt": b"beta\n" * 70,
             "SDY2/StudyFiles/two\nlines.txt": b"gamma\n"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    app = build_app(root, FaultInjector(), None)
    state = app[IMMPORT_KEY]
    state.users = {"alice": "s3cret"}
    async with SimServer(app) as server:
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_ROOT", str(root))
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_TOKEN_URL", f"{server.url}/_sim/aspera/check")
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_COUNTERS", str(tmp_path / "ascp-counters.jsonl"))
        monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL", raising=False)
        yield server, state, files


@pytest.mark.parametrize("batch", [1, 10], ids=["a-session-each", "one-session"])
async def test_a_name_with_a_line_break_fails_alone_on_the_ascp_route(ascp_sim, tmp_path: Path, batch: int) -> None:
    server, _, files = ascp_sim
    out = tmp_path / "out"
    adapter = _adapter(server.url, study="SDY2", paths=[], ascp=_ascp_opts(), session_files=batch)
    async with adapter:
        report = await pull(adapter, out, FAST)
    assert [rel for rel, _ in report.failures] == ["SDY2/StudyFiles/two\nlines.txt"]
    assert "ascp cannot name a path with a line break; fetch it with --via https" in report.failures[0][1]
    assert report.files_done == 2
    for rel in ("SDY2/StudyFiles/a.txt", "SDY2/StudyFiles/b.txt"):
        assert (out / rel).read_bytes() == files[rel]
    assert sorted(p.name for p in (out / "SDY2/StudyFiles").iterdir()) == ["a.txt", "b.txt"]
    sessions = [json.loads(x) for x in (tmp_path / "ascp-counters.jsonl").read_text().splitlines()]
    assert sum(s["files"] for s in sessions) == 2 and len(sessions) == (2 if batch == 1 else 1)


async def test_an_ascp_session_keeps_its_token_out_of_its_repr(ascp_sim, tmp_path: Path) -> None:
    server, state, _ = ascp_sim
    async with _adapter(server.url, study="SDY2", paths=[], ascp=_ascp_opts()) as a:
        item = await _item(a, "SDY2/StudyFiles/a.txt")
        reader = await a.open_fetch_session(FetchPlan(root=tmp_path, fetches=(
            Fetch(item=item, part=tmp_path / "a.part", offset=0),)))
    (token,) = state.aspera_tokens  # the one the simulator issued, for exactly that path
    assert state.aspera_tokens[token] == ("SDY2/StudyFiles/a.txt",)
    assert repr(reader) == "AscpFetch(1 file(s))"
