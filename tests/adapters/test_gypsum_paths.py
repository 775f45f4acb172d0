"""The gypsum adapter's recovery and refusal paths, each reached by a real fault: the simulator's fault injector
(a stale layout file, a lost answer, a body damaged on the way, a refused completion), a FaultProxy in front of
it (answers that are not gypsum's JSON), a source file that vanishes mid-upload, a session file that went
stale. Assertions are on the simulator's bucket, its lock and manifests, the session files, and the exact
error with its message."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import pytest

from asyncdepo.adapters.gypsum import checks
from asyncdepo.adapters.gypsum.adapter import GypsumAdapter
from asyncdepo.adapters.gypsum.api import GypsumClient, normalize_server
from asyncdepo.adapters.gypsum.chain import Chain
from asyncdepo.adapters.gypsum.session import SessionRecord, SessionStore
from asyncdepo.config import EngineConfig
from asyncdepo.contract import Item, RemoteItem
from asyncdepo.engine.pull import pull
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.scheduler import push
from asyncdepo.errors import (
    AuthError,
    ConflictError,
    QuotaError,
    RemoteValidationError,
    TransientError,
    UsageError,
    ValidationError,
)
from asyncdepo.events import CollectSink, Reporter
from asyncdepo.sim import gypsum as gsim
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.pacer import Pacer, RetryPolicy

OWNER, ADMIN, STRANGER = "tok-owner", "tok-admin", "tok-stranger"
IDENTITIES = {OWNER: "olivia", ADMIN: "root", STRANGER: "sam"}
START = "POST /upload/start/{project}/{asset}/{version}"
PUT = "PUT /s3/{key}"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def some_files(n: int = 4, size: int = 3000, seed: str = "s") -> dict[str, bytes]:
    return {f"d{i % 2}/f{i}.bin": hashlib.sha256(f"{seed}{i}".encode()).digest() * (size // 32) for i in range(n)}


def first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = gsim.create_app(tmp_path / "sim", FaultInjector(), identities=IDENTITIES, admins=["root"])
    async with SimServer(app) as server:
        async with GypsumClient(server.url, ADMIN) as c:
            await c.create_project("proj", ["olivia"], [])
        yield server
        server.faults.release_stalls()


def bucket(sim: SimServer) -> Path:
    return sim.app[gsim.STATE_KEY].bucket.root


def stored(sim: SimServer, version: str) -> dict[str, bytes]:
    root = bucket(sim) / "proj/asset" / version
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith("..")}


def sessions_of(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "sessions").glob("*.session"))


def make(sim: SimServer | str, tmp_path: Path, version: str | None, **kw: Any) -> GypsumAdapter:
    kw.setdefault("token", OWNER)
    url = sim if isinstance(sim, str) else sim.url
    return GypsumAdapter(url, kw.pop("project", "proj"), "asset", version, sessions=tmp_path / "sessions", **kw)


async def run_push(target: GypsumAdapter, src: Path, tmp_path: Path, reporter: Reporter | None = None,
                   **cfg: Any) -> RunReport:
    return await push(src, target, EngineConfig(transfers=cfg.pop("transfers", 4), **cfg), reporter=reporter,
                      journal_path=tmp_path / "journal.sqlite")


async def push_error(target: GypsumAdapter, src: Path, tmp_path: Path) -> BaseException:
    with pytest.raises(BaseException) as info:
        await run_push(target, src, tmp_path)
    return first_error(info.value)


# -- the layout files read before the start: a stale cache leaves the server's refusal to say why ----------
async def test_a_lock_missed_by_a_stale_read_is_named_from_the_server_s_refusal(sim: SimServer,
                                                                               tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    async with GypsumClient(sim.url, OWNER) as c:
        await c.start("proj", "other", "held", [], False)  # another upload holds the project's lock
    sim.faults.add("GET /file/*..LOCK status=404 first=1")  # the precheck's read of ..LOCK: stale, "none"
    err = await push_error(make(sim, tmp_path, "v1"), src, tmp_path)
    # the start was refused (403 "already been locked"); the lock read again names the holder
    assert isinstance(err, ConflictError), err
    assert "locked by another upload (of other/held by olivia" in str(err)
    assert "asyncdepo gypsum unlock proj" in (err.hint or "")
    assert sim.faults.requests[START] == 2 and PUT not in sim.faults.requests
    lock = json.loads((bucket(sim) / "proj/..LOCK").read_text())
    assert (lock["asset"], lock["version"]) == ("other", "held")
    assert not (bucket(sim) / "proj/asset").exists() and not sessions_of(tmp_path)


async def test_a_lock_refusal_whose_lock_is_gone_when_read_again_keeps_the_server_s_words(sim: SimServer,
                                                                                          tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    async with GypsumClient(sim.url, OWNER) as c:
        await c.start("proj", "other", "held", [], False)
    sim.faults.add("GET /file/*..LOCK status=404 first=2")  # both reads of ..LOCK are stale
    err = await push_error(make(sim, tmp_path, "v1"), src, tmp_path)
    assert isinstance(err, ConflictError) and "already been locked" in str(err), err
    assert "gypsum upload start proj/asset/v1" in str(err)
    assert not (bucket(sim) / "proj/asset").exists() and not sessions_of(tmp_path)


async def test_a_version_missed_by_a_stale_read_is_refused_by_the_server(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = write_tree(src, some_files())
    assert (await run_push(make(sim, tmp_path, "v1"), src, tmp_path)).ok
    (src / "d0/f0.bin").write_bytes(b"other bytes")
    sim.faults.add("GET /file/*/v1/..summary status=404 first=1")
    err = await push_error(make(sim, tmp_path, "v1"), src, tmp_path)
    assert isinstance(err, ConflictError) and "already exists" in str(err), err
    assert stored(sim, "v1") == files  # the immutable version kept its bytes
    assert not (bucket(sim) / "proj/..LOCK").exists()


async def test_a_quota_missed_by_a_stale_read_is_refused_by_the_server(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files(size=4000))
    async with GypsumClient(sim.url, ADMIN) as c:
        await c.set_quota("proj", {"baseline": 5000, "growth_rate": 0})
    sim.faults.add("GET /file/*..quota status=404 first=1")  # stale: "no quota", the precheck lets it go
    err = await push_error(make(sim, tmp_path, "v1"), src, tmp_path)
    assert isinstance(err, QuotaError) and "quota" in str(err), err
    assert sim.faults.requests[START] == 1 and PUT not in sim.faults.requests
    assert not (bucket(sim) / "proj/asset").exists() and not (bucket(sim) / "proj/..LOCK").exists()


async def test_a_latest_manifest_missed_by_a_stale_read_predicts_no_dedup(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = write_tree(src, some_files())
    assert (await run_push(make(sim, tmp_path, "v1"), src, tmp_path)).ok
    (src / "new.bin").write_bytes(b"new")
    sim.faults.add("GET /file/*/v1/..manifest status=404 first=1")
    report = await run_push(make(sim, tmp_path, "v2"), src, tmp_path)
    assert report.ok, report.failures
    manifest = json.loads((bucket(sim) / "proj/asset/v2/..manifest").read_text())
    assert {rel for rel, e in manifest.items() if "link" in e} == set(files)  # the server linked them anyway
    assert stored(sim, "v2") == {"new.bin": b"new"}


async def test_a_project_that_does_not_exist_is_named_before_the_start(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    err = await push_error(make(sim, tmp_path, "v1", project="nope"), src, tmp_path)
    assert isinstance(err, RemoteValidationError) and "project 'nope' does not exist" in str(err), err
    assert "asyncdepo gypsum create nope" in (err.hint or "")
    assert START not in sim.faults.requests


# -- the start ----------------------------------------------------------------------------------------------
async def test_a_lost_start_answer_that_took_the_lock_is_a_conflict_naming_it(sim: SimServer,
                                                                              tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    sim.faults.add("POST /upload/start/* lose first=1")  # the server started the upload; its answer is lost
    err = await push_error(make(sim, tmp_path, "v1"), src, tmp_path)
    assert isinstance(err, ConflictError) and "the answer was lost" in str(err), err
    assert "asyncdepo gypsum unlock proj" in (err.hint or "")
    lock = json.loads((bucket(sim) / "proj/..LOCK").read_text())
    assert (lock["asset"], lock["version"]) == ("asset", "v1")
    assert sim.faults.requests[START] == 1 and PUT not in sim.faults.requests  # never started twice


async def test_a_start_without_a_token_is_refused_before_it_is_sent(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    err = await push_error(make(sim, tmp_path, "v1", token=None), src, tmp_path)
    assert isinstance(err, AuthError) and "no GitHub token given" in str(err), err
    assert "GITHUB_TOKEN" in (err.hint or "")
    assert START not in sim.faults.requests and not (bucket(sim) / "proj/..LOCK").exists()


async def test_an_uploader_the_project_does_not_know_is_told_who_can_add_them(sim: SimServer,
                                                                              tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    err = await push_error(make(sim, tmp_path, "v1", token=STRANGER), src, tmp_path)
    assert isinstance(err, AuthError) and err.status == 403, err
    assert "asyncdepo gypsum set-permissions proj --uploader" in (err.hint or "")
    assert not (bucket(sim) / "proj/..LOCK").exists() and not (bucket(sim) / "proj/asset").exists()


async def test_a_path_gypsum_cannot_store_fails_the_push_naming_it(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"ok.bin": b"fine", "d/..hidden": b"not storable"})
    err = await push_error(make(sim, tmp_path, "v1"), src, tmp_path)
    assert isinstance(err, ValidationError) and "'d/..hidden' cannot be stored in gypsum" in str(err), err
    assert START not in sim.faults.requests and not (bucket(sim) / "proj/asset").exists()


# -- the PUTs -------------------------------------------------------------------------------------------
async def test_a_body_damaged_on_the_way_is_sent_again(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = write_tree(src, {"one.bin": bytes(range(256)) * 400})
    sim.faults.add(FaultRule("corrupt", method="PUT", path="/s3/*", after=5000, first=1))
    report = await run_push(make(sim, tmp_path, "v1"), src, tmp_path)
    assert report.ok and report.retries == 1, report.failures
    state = sim.app[gsim.STATE_KEY]
    assert state.counters["bad_digest"] == 1 and state.counters["puts_ok"] == 1
    assert stored(sim, "v1") == files and not (bucket(sim) / "proj/..LOCK").exists()


async def test_a_file_that_vanishes_while_its_damaged_body_is_refused_fails_naming_it(sim: SimServer,
                                                                                      tmp_path: Path) -> None:
    """The store refuses the damaged body (BadDigest); the file is gone when the writer looks whether it
    changed, so it is not called changed: the next attempt finds it missing and the file fails, named."""
    src = tmp_path / "src"
    write_tree(src, {"gone.bin": bytes(range(256)) * 800})
    sim.faults.add(FaultRule("corrupt", method="PUT", path="/s3/*", after=1000, first=1))

    def vanish(_: int) -> None:
        (src / "gone.bin").unlink()  # the open PUT body still reads the unlinked file to its end
        sim.faults.pause_at(None)

    sim.faults.on_pause.append(vanish)
    sim.faults.pause_at(100_000)
    report = await run_push(make(sim, tmp_path, "v1"), src, tmp_path)
    assert not report.ok and [rel for rel, _ in report.failures] == ["gone.bin"], report.failures
    message = report.failures[0][1]
    assert "gone.bin" in message and "changed after it was hashed" not in message, message
    assert sim.app[gsim.STATE_KEY].counters["bad_digest"] == 1
    assert report.summary["state"].startswith("aborted")
    assert not (bucket(sim) / "proj/..LOCK").exists() and not (bucket(sim) / "proj/asset/v1").exists()


# -- complete and abort ---------------------------------------------------------------------------------
async def test_a_lost_complete_answer_is_checked_against_the_bucket(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = write_tree(src, some_files())
    sim.faults.add("POST /upload/complete/* lose first=1")  # completed; the answer lost; the retry gets 403
    report = await run_push(make(sim, tmp_path, "v1"), src, tmp_path)
    assert report.ok and report.summary["state"] == "completed", report.summary
    assert sim.faults.requests["POST /upload/complete/{project}/{asset}/{version}"] == 2
    assert "upload_finish" in json.loads((bucket(sim) / "proj/asset/v1/..summary").read_text())
    assert stored(sim, "v1") == files and not sessions_of(tmp_path)
    assert not (bucket(sim) / "proj/..LOCK").exists()


async def test_a_lost_abort_answer_is_checked_against_the_bucket(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    sim.faults.add("PUT /s3/* status=403 first=0")  # every PUT refused for good: the upload is aborted
    sim.faults.add("POST /upload/abort/* lose first=1")  # aborted; the answer lost; the retry gets 403
    report = await run_push(make(sim, tmp_path, "v1"), src, tmp_path)
    assert not report.ok and report.summary["state"].startswith("aborted"), report.summary
    assert sim.faults.requests["POST /upload/abort/{project}/{asset}/{version}"] == 2
    assert not (bucket(sim) / "proj/asset/v1").exists() and not (bucket(sim) / "proj/..LOCK").exists()
    assert not sessions_of(tmp_path)


@pytest.mark.parametrize(("keep", "retried"), [(False, True), (True, True), (False, False)])
async def test_a_completion_refused_is_aborted_unless_kept(sim: SimServer, tmp_path: Path, keep: bool,
                                                           retried: bool) -> None:
    """A completion refused (403) the first time, or after a first one that never reached the server (503)
    while the version is not finished: the refusal stands; the upload is aborted, or kept for a re-run with
    --keep-for-resume."""
    src = tmp_path / "src"
    files = write_tree(src, some_files())
    if retried:
        sim.faults.add("POST /upload/complete/* status=503 first=1")
    sim.faults.add("POST /upload/complete/* status=403 first=1")
    report = await run_push(make(sim, tmp_path, "v1", keep_for_resume=keep), src, tmp_path)
    assert not report.ok and report.files_done == len(files)
    assert report.failures == [("(job)", "gypsum complete proj/asset/v1 failed with HTTP 403: Forbidden")]
    assert sim.faults.statuses["POST /upload/complete/{project}/{asset}/{version}"] == 1 + retried
    root = bucket(sim)
    if keep:
        assert (root / "proj/..LOCK").exists() and len(sessions_of(tmp_path)) == 1
        assert stored(sim, "v1") == files  # every file is there: the re-run only completes it
        again = make(sim, tmp_path, "v1")
        report = await run_push(again, src, tmp_path)
        assert report.ok and again.resumed and report.files_skipped == len(files), report.failures
        assert "upload_finish" in json.loads((root / "proj/asset/v1/..summary").read_text())
    else:
        assert not (root / "proj/asset/v1").exists() and not (root / "proj/..LOCK").exists()
        assert sim.faults.requests["POST /upload/abort/{project}/{asset}/{version}"] == 1
    assert not (root / "proj/..LOCK").exists() or keep


# -- sessions ---------------------------------------------------------------------------------------------
async def test_a_session_the_lock_no_longer_names_is_deleted(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    sim.faults.add("PUT /s3/* status=403 skip=1 first=0")  # fails mid-way; the upload is kept
    report = await run_push(make(sim, tmp_path, "v1", keep_for_resume=True), src, tmp_path)
    assert report.summary["state"].startswith("kept for resume")
    assert len(sessions_of(tmp_path)) == 1
    sim.faults.clear()
    async with GypsumClient(sim.url, ADMIN) as c:
        await c.unlock("proj")  # an administrator cleared the lock: the kept session is stale
    again = make(sim, tmp_path, "v1")
    err = await push_error(again, src, tmp_path)
    assert not again.resumed and not sessions_of(tmp_path)
    assert isinstance(err, ConflictError) and "proj/asset/v1 already exists" in str(err), err


async def test_a_lock_that_cannot_be_read_on_entry_closes_the_client(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    sim.faults.add("PUT /s3/* status=403 skip=1 first=0")
    assert (await run_push(make(sim, tmp_path, "v1", keep_for_resume=True), src, tmp_path)).ok is False
    sim.faults.clear()
    sim.faults.add("GET /file/*..LOCK status=503 first=0")
    client = GypsumClient(sim.url, OWNER, pacer=Pacer(RetryPolicy(attempts=2, base=0.0)))
    target = make(sim, tmp_path, "v1", client=client)
    with pytest.raises(TransientError, match=r"\.\.LOCK"):
        await target.__aenter__()
    assert client.session is None  # closed: nothing leaks when entering fails
    assert sim.faults.statuses["GET /file/{key}"] == 2
    assert len(sessions_of(tmp_path)) == 1  # not read as stale: it is kept for the next run


async def test_session_files_that_are_not_a_record_of_this_target_are_no_session(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "s")
    rec = SessionRecord(label="l", server="http://h", project="p", asset="a", version="v", probation=False,
                        complete_url="/c", abort_url="/a", token="secret", file_urls={"x": "/u/x", "y": "/u/y"})
    path = store.save(rec)
    path.write_bytes(path.read_bytes() + b"\n  \n")  # blank lines (a hand edit) are skipped
    assert store.load("http://h", "p", "a", "v") == rec
    head, *rest = path.read_bytes().splitlines(keepends=True)
    fields = json.loads(head)
    del fields["abort_url"]  # a header without a field the record needs
    path.write_bytes(json.dumps(fields).encode() + b"\n" + b"".join(rest))
    assert store.load("http://h", "p", "a", "v") is None
    other = store.save(SessionRecord(**{**rec.__dict__, "version": "w"}))
    other.replace(store.path_for("http://h", "p", "a", "v"))  # a record of another target under this name
    assert store.load("http://h", "p", "a", "v") is None


# -- watch chains, driven through the adapter -----------------------------------------------------------
def items_of(src: Path, files: dict[str, bytes]) -> list[tuple[Item, dict[str, str]]]:
    out = []
    for rel, data in files.items():
        st = (src / rel).stat()
        out.append((Item(str(src / rel), rel, st.st_size, st.st_mtime_ns), {"md5": md5(data)}))
    return out


async def base_version(sim: SimServer, tmp_path: Path, files: dict[str, bytes]) -> Path:
    """Push ``files`` as version "base": a watch's versions declare the same files as dedup hits of it, so
    they need no PUT."""
    src = tmp_path / "src"
    write_tree(src, files)
    assert (await run_push(make(sim, tmp_path, "base"), src, tmp_path)).ok
    return src


async def test_a_watch_version_whose_completion_is_refused_is_aborted_and_discarded(sim: SimServer,
                                                                                    tmp_path: Path) -> None:
    files = some_files()
    src = await base_version(sim, tmp_path, files)
    sim.faults.add("POST /upload/complete/* status=503 first=1")
    sim.faults.add("POST /upload/complete/* status=403 first=1")
    async with make(sim, tmp_path, "w", watch=True) as target:
        skip = await target.prepare(items_of(src, files))
        assert skip == set(files) and await target.prepare(items_of(src, files)) is skip  # prepared once
        item = items_of(src, files)[0][0]
        with pytest.raises(UsageError, match="not part of the gypsum upload"):
            await target.open_item(item, None)  # a dedup hit has nothing to PUT
        assert target.chain.open
        with pytest.raises(AuthError, match="gypsum complete proj/asset/w"):
            await target.finish(True)
        assert not target.chain.open and target.version == "w"  # the name is free for the next batch
    assert not (bucket(sim) / "proj/asset/w").exists() and not (bucket(sim) / "proj/..LOCK").exists()
    assert not sessions_of(tmp_path)


async def test_a_watch_version_completed_before_the_journal_heard_is_taken_as_completed(sim: SimServer,
                                                                                        tmp_path: Path) -> None:
    files = some_files()
    src = await base_version(sim, tmp_path, files)
    async with make(sim, tmp_path, "w", watch=True) as first:
        await first.prepare(items_of(src, files))
        state = first.job_state()  # journaled after the start
        assert (await first.finish(True))["state"].startswith("completed")  # ... but not after the completion
    reporter_sink = CollectSink()
    async with make(sim, tmp_path, "w", watch=True, reporter=Reporter([reporter_sink])) as again:
        again.restore_job_state(state)
        assert again.chain.open and again.version == "w"
        assert await again.open_unit() == []
        assert again.version == "w-2" and again.chain.last == "w" and not again.chain.open
    assert "upload_finish" in json.loads((bucket(sim) / "proj/asset/w/..summary").read_text())


async def test_a_watch_version_whose_session_file_vanished_is_taken_up_again(sim: SimServer,
                                                                             tmp_path: Path) -> None:
    files = some_files()
    src = await base_version(sim, tmp_path, files)
    async with make(sim, tmp_path, "w", watch=True) as first:
        await first.prepare(items_of(src, files))
        state = first.job_state()
    (session,) = sessions_of(tmp_path)
    session.unlink()  # the session file is gone (a new machine, a cleaned state directory)
    async with make(sim, tmp_path, "w", watch=True) as again:
        again.restore_job_state(state)
        assert sorted(await again.open_unit()) == sorted(files)  # the batch is made again
        assert again.session is None and again.chain.open


async def test_a_watch_whose_last_version_was_removed_says_so(sim: SimServer, tmp_path: Path,
                                                              http: aiohttp.ClientSession) -> None:
    files = some_files()
    src = await base_version(sim, tmp_path, files)
    async with make(sim, tmp_path, "w", watch=True) as first:
        await first.prepare(items_of(src, files))
        await first.finish(True)
        state = first.job_state()
    async with http.delete(f"{sim.url}/remove/proj/asset/w", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200  # an administrator removed the chain's last version
    (src / "new.bin").write_bytes(b"new")
    async with make(sim, tmp_path, "w", watch=True) as again:
        again.restore_job_state(state)
        assert again.version == "w-2"
        with pytest.raises(RemoteValidationError, match="proj/asset/w, the last of this watch, is gone"):
            await again.prepare(items_of(src, {"new.bin": b"new"}))
    assert not (bucket(sim) / "proj/asset/w-2").exists() and not (bucket(sim) / "proj/..LOCK").exists()


# -- pulls and reads --------------------------------------------------------------------------------------
async def test_pulling_a_version_that_does_not_exist_says_so(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, some_files())
    assert (await run_push(make(sim, tmp_path, "v1"), src, tmp_path)).ok
    with pytest.raises(BaseException) as info:
        await pull(make(sim, tmp_path, "v9", token=None), tmp_path / "out", EngineConfig(transfers=2))
    err = first_error(info.value)
    assert isinstance(err, RemoteValidationError) and "proj/asset/v9 does not exist" in str(err), err
    assert not any((tmp_path / "out").rglob("*.bin")) if (tmp_path / "out").exists() else True


async def test_reads_past_the_end_with_a_range_ignored_and_of_a_removed_object(sim: SimServer, tmp_path: Path,
                                                                             http: aiohttp.ClientSession) -> None:
    src = tmp_path / "src"
    data = bytes(range(256)) * 8000  # 2 MB: more than one block of the reader
    write_tree(src, {"big.bin": data})
    assert (await run_push(make(sim, tmp_path, "v1"), src, tmp_path)).ok
    item = RemoteItem(rel="big.bin", size=len(data), digests={"md5": md5(data)}, ref="proj/asset/v1/big.bin")
    async with make(sim, tmp_path, "v1", token=None) as reader:
        assert [b async for b in reader.read(item, len(data))] == []  # 416: nothing left to read
        sim.faults.add("GET /file/* norange first=0")  # the server ignores Range and sends it all
        offset = (1 << 20) + 12_345  # past the whole first block of the answer
        assert b"".join([b async for b in reader.read(item, offset)]) == data[offset:]
        sim.faults.clear()
        async with http.delete(f"{sim.url}/remove/proj/asset/v1", headers={"Authorization": f"Bearer {ADMIN}"}):
            pass
        with pytest.raises(RemoteValidationError, match="object not found"):
            async for _ in reader.read(item, 0):
                pass


async def test_answers_that_are_not_gypsum_json_are_mapped_from_their_status(sim: SimServer,
                                                                             tmp_path: Path) -> None:
    """A proxy in front of gypsum answers with its own (XML) error pages: the status decides, the push is
    retried past them, and a read names the object."""
    src = tmp_path / "src"
    files = write_tree(src, {"a.bin": b"a" * 5000, "b.bin": b"b" * 7000})
    upstream = urlsplit(sim.url)
    async with FaultProxy((upstream.hostname or "", upstream.port or 0)) as proxy:
        proxy.faults.add("GET /file/* status=503 first=2")
        # a page answered 200 in place of the start's and a presign's JSON: malformed, asked again
        proxy.faults.add("POST /upload/start/* status=200 first=1")
        proxy.faults.add("POST /upload/presigned-file/* status=200 first=1")
        report = await run_push(make(proxy.url, tmp_path, "v1"), src, tmp_path)
        assert report.ok, report.failures
        assert sum(proxy.faults.statuses.values()) == 4
        assert sim.faults.requests[START] == 1 and sim.faults.requests[PUT] == 2  # the server saw one of each
        assert stored(sim, "v1") == files
        item = RemoteItem(rel="a.bin", size=5000, digests={"md5": md5(files["a.bin"])}, ref="proj/asset/v1/a.bin")
        proxy.faults.add("GET /file/* status=500 first=1")
        async with make(proxy.url, tmp_path, "v1", token=None) as reader:
            with pytest.raises(TransientError, match="gypsum GET /file/proj/asset/v1/a.bin"):
                async for _ in reader.read(item, 0):
                    pass
            assert b"".join([b async for b in reader.read(item, 0)]) == files["a.bin"]


# -- pure logic: names, targets, states ------------------------------------------------------------------
def test_names_gypsum_refuses_and_states_of_another_chain() -> None:
    with pytest.raises(ValueError, match="not an http"):
        normalize_server("gypsum.example.org")
    with pytest.raises(UsageError, match="cannot start with '..'"):
        checks.parse_target("proj/..asset/v1", need_version=True)
    with pytest.raises(UsageError, match="a watch needs PROJECT/ASSET/VERSION"):
        GypsumAdapter("http://127.0.0.1:9", "p", "a", None, watch=True)
    chain = Chain("run")
    chain.restore({"base": "other", "next": 4, "version": "other-4", "open": True, "files": ["x"]})
    assert chain.state() == Chain("run").state()  # another chain's state is not taken


async def test_a_push_without_a_version_and_a_copy_without_a_session(tmp_path: Path) -> None:
    target = GypsumAdapter("http://127.0.0.1:9", "p", "a", None, sessions=tmp_path)
    with pytest.raises(UsageError, match="a push needs PROJECT/ASSET/VERSION"):
        await target.prepare([])
    assert await target.handoff() == {}  # nothing started: nothing for the workers
    target.take_handoff({})
    assert target.session is None
    target.restore_job_state({"watch": {"base": "a", "next": 3}})  # not a watch: the session file is the truth
    assert target.version is None and target.chain.next == 1
    assert await GypsumAdapter("http://127.0.0.1:9", "p", "a", "v", watch=True).finish(False) == {
        "gypsum": "p/a/v", "files in the batch": 0, "state": "discarded (its files go in the next version)"}


async def test_a_project_created_with_a_quota_on_the_command_line_refuses_what_does_not_fit(
        sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncdepo.cli import gypsum as cli

    monkeypatch.setenv("ASYNCDEPO_GYPSUM_URL", sim.url)
    monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", ADMIN)
    argv = ["create", "small", "--owner", "olivia", "--baseline", "2000", "--growth-rate", "0"]
    assert await anyio.to_thread.run_sync(cli.group_main, argv) == 0  # the CLI runs its own loop
    quota = json.loads((bucket(sim) / "small/..quota").read_text())
    assert quota["baseline"] == 2000 and quota["growth_rate"] == 0
    src = tmp_path / "src"
    write_tree(src, some_files(size=1000))
    err = await push_error(make(sim, tmp_path, "v1", project="small"), src, tmp_path)
    assert isinstance(err, QuotaError) and "only 2.00 kB is left" in str(err), err
    assert START not in sim.faults.requests
