"""gypsum end to end: the adapter under the engine (``asyncdepo.push``/``pull``) and the CLI, against the
gypsum simulator over loopback. Assertions are on the simulator's bucket, manifests and byte counters."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdepo.adapters.gypsum.adapter import GypsumAdapter
from asyncdepo.adapters.gypsum.api import GypsumClient
from asyncdepo.cli import gypsum as cli
from asyncdepo.config import EngineConfig
from asyncdepo.engine.pull import pull
from asyncdepo.engine.scheduler import RunReport, push
from asyncdepo.errors import ConflictError, QuotaError, SourceVanishedError
from asyncdepo.events import CollectSink, ItemDone, Reporter, Sink
from asyncdepo.sim import gypsum as gsim
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.server import SimServer, ThreadedSim

OWNER, ADMIN, UPLOADER = "tok-owner", "tok-admin", "tok-up"
PUT = "PUT /s3/{key}"
IDENTITIES = {OWNER: "olivia", ADMIN: "root", UPLOADER: "ursula"}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_tree(root: Path, n: int, size: int = 200, seed: int = 0) -> dict[str, bytes]:
    """``n`` small files of distinct content in 10 directories."""
    files = {}
    for i in range(n):
        rel = f"d{i % 10}/f{i:04d}.bin"
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32 + 1)
        files[rel] = data[: size + i % 7]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(files[rel])
    return files


def bucket_of(app: Any) -> Path:
    return app[gsim.STATE_KEY].bucket.root  # type: ignore[no-any-return]


def first_depo_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class DoneAfter(Sink):
    """Sets ``event`` once ``n`` items are done (to interrupt a push at a known point)."""

    def __init__(self, n: int) -> None:
        self.n, self.count, self.event = n, 0, anyio.Event()

    def emit(self, event: Any) -> None:
        if isinstance(event, ItemDone):
            self.count += 1
            if self.count >= self.n:
                self.event.set()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = gsim.create_app(tmp_path / "sim", FaultInjector(), identities=IDENTITIES, admins=["root"])
    async with SimServer(app) as server:
        async with GypsumClient(server.url, ADMIN) as c:
            await c.create_project("proj", ["olivia"], [{"id": "ursula"}])
        yield server
        server.faults.release_stalls()


def adapter(sim: SimServer, tmp_path: Path, version: str | None, **kw: Any) -> GypsumAdapter:
    kw.setdefault("token", OWNER)
    return GypsumAdapter(sim.url, "proj", "asset", version, sessions=tmp_path / "sessions", **kw)


async def run_push(sim: SimServer, tmp_path: Path, src: Path, version: str, *, reporter: Reporter | None = None,
                   transfers: int = 8, **kw: Any) -> RunReport:
    return await push(src, adapter(sim, tmp_path, version, **kw), EngineConfig(transfers=transfers),
                      reporter=reporter, journal_path=tmp_path / "journal.sqlite")


async def test_thousand_files_faults_expiry_and_dedup(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 1000)
    state = sim.app[gsim.STATE_KEY]
    state.expire_next = 5  # the first five presigned URLs arrive already expired
    for rule in ("PUT /s3/* status=503 every=97", "PUT /s3/* drop after=50 every=89",
                 "POST /upload/presigned-file/* status=500 every=151"):
        sim.faults.add(rule)
    report = await run_push(sim, tmp_path, src, "v1")
    assert report.ok, report.failures
    assert report.files_done == 1000 and report.retries > 0
    assert state.counters["expired_puts"] == 5 and state.counters["puts_ok"] == 1000
    root = bucket_of(sim.app)
    for rel, data in files.items():  # every object's md5 matches the source
        assert md5((root / "proj/asset/v1" / rel).read_bytes()) == md5(data)
    assert not (root / "proj/..LOCK").exists()

    # v2: ten files changed, five added; the rest deduplicate into links to v1
    changed = sorted(files)[::100]
    for rel in changed:
        files[rel] = b"changed " + rel.encode()
        (src / rel).write_bytes(files[rel])
    for i in range(5):
        files[f"new/n{i}"] = f"new file {i}".encode()
        (src / "new").mkdir(exist_ok=True)
        (src / f"new/n{i}").write_bytes(files[f"new/n{i}"])
    sim.faults.reset_counters()
    state.counters.clear()
    events = CollectSink()
    report = await run_push(sim, tmp_path, src, "v2", reporter=Reporter([events]))
    assert report.ok, report.failures
    done = events.of(ItemDone)  # the md5 computed while each body was streamed reached the engine
    assert len(done) == 15 and all(e.digests.get("md5") == md5(files[e.rel]) for e in done)
    async with GypsumClient(sim.url) as reader:
        m2 = await reader.fetch_json("proj/asset/v2/..manifest")
    linked = {rel for rel, e in m2.items() if "link" in e}
    assert linked == set(files) - set(changed) - {f"new/n{i}" for i in range(5)}
    assert all(m2[rel]["link"]["version"] == "v1" for rel in linked)
    assert all(m2[rel]["md5sum"] == md5(data) for rel, data in files.items())
    assert state.counters["puts_ok"] == 15
    for rel in set(files) - linked:
        assert (root / "proj/asset/v2" / rel).read_bytes() == files[rel]
    assert not (root / "proj/asset/v2" / min(linked)).exists()


async def test_interrupted_push_kept_for_resume_sends_only_the_rest(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 40, size=20_000)
    sim.faults.add(FaultRule("stall", method="PUT", path="/s3/*", skip=12, first=0))
    sink = DoneAfter(12)
    report: list[RunReport] = []
    async with anyio.create_task_group() as tg:
        async def go() -> None:
            try:
                report.append(await run_push(sim, tmp_path, src, "v1", reporter=Reporter([sink]), transfers=4,
                                             keep_for_resume=True))
            finally:
                sink.event.set()  # never leave the test waiting if the push ended early
        tg.start_soon(go)
        await sink.event.wait()
        tg.cancel_scope.cancel()  # as Ctrl-C: the engine's shielded cleanup runs finish(ok=False)
    assert not report  # it was interrupted, not finished
    root = bucket_of(sim.app)
    assert (root / "proj/..LOCK").exists()  # kept, as asked
    # the session token lives only in a 0600 file: not in the journal, not in the lock object
    (session,) = (tmp_path / "sessions").glob("*.session")
    assert session.stat().st_mode & 0o777 == 0o600
    token = json.loads(session.read_text().splitlines()[0])["token"]
    for path in [*tmp_path.glob("journal.sqlite*"), root / "proj/..LOCK"]:
        assert token.encode() not in path.read_bytes()
    sim.faults.clear()
    present = {p.relative_to(root / "proj/asset/v1").as_posix() for p in (root / "proj/asset/v1").rglob("*")
               if p.is_file() and not p.name.startswith("..")}
    assert len(present) >= 12
    sim.faults.reset_counters()
    again = adapter(sim, tmp_path, "v1")
    report2 = await push(src, again, EngineConfig(transfers=4), journal_path=tmp_path / "journal.sqlite")
    assert report2.ok, report2.failures
    assert again.resumed and report2.files_skipped >= 12
    missing = set(files) - present
    assert sim.faults.bytes_in[PUT] == sum(len(files[r]) for r in missing)
    assert sim.faults.requests[PUT] == len(missing)
    assert not (root / "proj/..LOCK").exists()
    for rel, data in files.items():
        assert (root / "proj/asset/v1" / rel).read_bytes() == data


async def test_ctrl_c_and_errors_leave_no_lock(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 30, size=5000)
    root = bucket_of(sim.app)
    # Ctrl-C mid-way: the upload is aborted, nothing is left behind
    sim.faults.add(FaultRule("stall", method="PUT", path="/s3/*", skip=5, first=0))
    sink = DoneAfter(5)
    async with anyio.create_task_group() as tg:
        async def go() -> None:
            try:
                await run_push(sim, tmp_path, src, "v1", reporter=Reporter([sink]), transfers=4)
            finally:
                sink.event.set()
        tg.start_soon(go)
        await sink.event.wait()
        tg.cancel_scope.cancel()
    assert not (root / "proj/..LOCK").exists()
    assert not (root / "proj/asset/v1/..manifest").exists()
    assert not list((tmp_path / "sessions").glob("*.session"))
    sim.faults.clear()
    sim.faults.release_stalls()
    # a permanent error (403 on PUT) fails the items; the upload is aborted
    sim.faults.add("PUT /s3/* status=403 skip=3")
    report = await run_push(sim, tmp_path, src, "v2")
    assert not report.ok and report.files_failed >= 1
    assert report.summary["state"].startswith("aborted")
    assert not (root / "proj/..LOCK").exists() and not (root / "proj/asset/v2").exists()
    sim.faults.clear()
    # transient errors that outlast the retries: same outcome
    sim.faults.add("PUT /s3/* status=500 first=0")
    report = await push(src, adapter(sim, tmp_path, "v3"), EngineConfig(transfers=4, request_attempts=2, retries=0,
                                                                       item_attempts=1),
                        journal_path=tmp_path / "journal.sqlite")
    assert not report.ok and not (root / "proj/..LOCK").exists()
    sim.faults.clear()
    # another upload holds the lock: a clear message naming it, before anything is sent
    sim.faults.reset_counters()
    async with GypsumClient(sim.url, OWNER) as c:
        await c.start("proj", "asset", "held", [], False)
    with pytest.raises(BaseException) as info:
        await run_push(sim, tmp_path, src, "v4")
    err = first_depo_error(info.value)
    assert isinstance(err, ConflictError) and "asset/held by olivia" in str(err)
    assert "asyncdepo gypsum unlock proj" in (err.hint or "")
    assert sim.faults.requests.get("POST /upload/start/{project}/{asset}/{version}") == 1


async def test_resume_refuses_changed_files_and_start_retries(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 10, size=1000)
    root = bucket_of(sim.app)
    # a dropped start request (the server never saw the body) is retried within prepare
    sim.faults.add("POST /upload/start/* drop after=10")
    sim.faults.add("PUT /s3/* status=403 skip=4")  # then a permanent failure mid-way; the upload is kept
    report = await run_push(sim, tmp_path, src, "v1", keep_for_resume=True)
    assert not report.ok and report.summary["state"].startswith("kept for resume")
    assert sim.faults.requests["POST /upload/start/{project}/{asset}/{version}"] == 2
    assert (root / "proj/..LOCK").exists() and list((tmp_path / "sessions").glob("*.session"))
    sim.faults.clear()
    # the files changed since: the kept upload cannot be continued; without --keep-for-resume it is discarded
    (src / "d0/f0000.bin").write_bytes(b"changed")
    with pytest.raises(BaseException) as info:
        await run_push(sim, tmp_path, src, "v1")
    err = first_depo_error(info.value)
    assert "differ from the interrupted upload" in str(err) and "d0/f0000.bin" in str(err)
    assert not (root / "proj/..LOCK").exists() and not (root / "proj/asset/v1").exists()
    assert not list((tmp_path / "sessions").glob("*.session"))
    assert (await run_push(sim, tmp_path, src, "v1")).ok


async def test_resume_with_a_vanished_file_fails_naming_it_and_discards_the_upload(sim: SimServer,
                                                                                    tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 10, size=1000)
    root = bucket_of(sim.app)
    sim.faults.add("PUT /s3/* status=403 skip=4")  # a permanent failure mid-way; the upload is kept
    report = await run_push(sim, tmp_path, src, "v1", keep_for_resume=True)
    assert not report.ok and report.summary["state"].startswith("kept for resume")
    sim.faults.clear()
    (src / "d0/f0000.bin").unlink()
    with pytest.raises(BaseException) as info:
        await run_push(sim, tmp_path, src, "v1")
    err = first_depo_error(info.value)
    assert isinstance(err, SourceVanishedError), err
    assert "source vanished" in str(err) and "d0/f0000.bin" in str(err)
    assert not (root / "proj/..LOCK").exists() and not (root / "proj/asset/v1").exists()
    assert not list((tmp_path / "sessions").glob("*.session"))
    assert (await run_push(sim, tmp_path, src, "v1")).ok


async def test_quota_refused_before_any_put(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 20, size=1000)
    async with GypsumClient(sim.url, ADMIN) as c:
        await c.set_quota("proj", {"baseline": 10_000, "growth_rate": 0})
    with pytest.raises(BaseException) as info:
        await run_push(sim, tmp_path, src, "v1")
    err = first_depo_error(info.value)
    assert isinstance(err, QuotaError)
    assert "20,0" in str(err) and "baseline" in str(err) and "set-quota" in (err.hint or "")
    assert "POST /upload/start/{project}/{asset}/{version}" not in sim.faults.requests
    assert PUT not in sim.faults.requests
    assert not (bucket_of(sim.app) / "proj/..LOCK").exists()


async def test_probation_approve_and_reject(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 5)
    assert (await run_push(sim, tmp_path, src, "v1")).ok
    report = await run_push(sim, tmp_path, src, "v2", token=UPLOADER)  # untrusted: forced onto probation
    assert report.ok and report.summary["state"] == "completed (on probation)"
    async with GypsumClient(sim.url, OWNER) as c:
        assert await c.fetch_json("proj/asset/..latest") == {"version": "v1"}
        await c.probation("approve", "proj", "asset", "v2")
        assert await c.fetch_json("proj/asset/..latest") == {"version": "v2"}
        (src / "extra").write_bytes(b"extra")
        assert (await run_push(sim, tmp_path, src, "v3", probation=True)).ok
        assert (await c.fetch_json("proj/asset/v3/..summary"))["on_probation"] is True
        await c.probation("reject", "proj", "asset", "v3")
        assert await c.fetch_json("proj/asset/v3/..summary") is None
        assert await c.fetch_json("proj/asset/..latest") == {"version": "v2"}
    assert not (bucket_of(sim.app) / "proj/asset/v3").exists()


async def test_pull_is_byte_identical_and_resumes_with_range(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 30, size=3000)
    big = os.urandom(300_000)
    files["big.bin"] = big
    (src / "big.bin").write_bytes(big)
    assert (await run_push(sim, tmp_path, src, "v1")).ok
    (src / "d0/f0000.bin").write_bytes(b"v2 only")
    files["d0/f0000.bin"] = b"v2 only"
    assert (await run_push(sim, tmp_path, src, "v2")).ok  # mostly links to v1
    out = tmp_path / "out"
    report = await pull(adapter(sim, tmp_path, None, token=None), out, EngineConfig(transfers=4))
    assert report.ok and report.files_done == len(files)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # a truncated partial file resumes with one Range request; a deleted file is fetched whole
    (out / "big.bin").unlink()
    (out / "big.bin.asyncdepo-part").write_bytes(big[:100_000])
    (out / "d1/f0001.bin").unlink()
    state = sim.app[gsim.STATE_KEY]
    state.counters.clear()
    report = await pull(adapter(sim, tmp_path, "v2", token=None), out, EngineConfig(transfers=4))
    assert report.ok and report.files_done == 2 and report.files_skipped == len(files) - 2
    assert state.counters["range_requests"] == 1
    manifest_size = (bucket_of(sim.app) / "proj/asset/v2/..manifest").stat().st_size  # read once by the pull
    assert state.counters["bytes_out"] == manifest_size + 100_000 * 2 + len(files["d1/f0001.bin"])
    assert (out / "big.bin").read_bytes() == big and not (out / "big.bin.asyncdepo-part").exists()
    # a connection cut mid-body is resumed from where it stopped
    (out / "big.bin").unlink()
    sim.faults.add(FaultRule("drop", method="GET", path="/file/*big.bin", after=150_000))
    report = await pull(adapter(sim, tmp_path, "v2", token=None), out, EngineConfig(transfers=2))
    assert report.ok and (out / "big.bin").read_bytes() == big
    assert state.counters["range_requests"] == 2


# -- the command line (a simulator in its own thread; the CLI runs its own event loop) ------------------
@pytest.fixture
def tsim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedSim]:
    root = tmp_path / "tsim"
    with ThreadedSim(lambda: gsim.create_app(root, identities=IDENTITIES, admins=["root"])) as server:
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_URL", server.url)
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        monkeypatch.delenv("GITHUB_TOKEN", raising=False)
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", ADMIN)
        assert cli.group_main(["create", "proj", "--owner", "olivia", "--uploader", "ursula,asset=asset"]) == 0
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", OWNER)
        yield server
        assert server.server is not None
        server.call(server.server.faults.release_stalls)


def test_cli_push_pull_and_group_commands(tsim: ThreadedSim, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 12)
    assert cli.push_main([str(src), "proj/asset/v1", "-q"]) == 0
    capsys.readouterr()
    assert cli.pull_main(["proj/asset", str(tmp_path / "out"), "-q"]) == 0
    assert {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
            for p in (tmp_path / "out").rglob("*") if p.is_file()} == files
    capsys.readouterr()
    assert cli.group_main(["ls"]) == 0 and capsys.readouterr().out.split() == ["proj/"]
    assert cli.group_main(["ls", "proj/asset/v1"]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(["..manifest", "..summary", *files])
    assert cli.group_main(["versions", "proj/asset"]) == 0 and "v1  (latest)" in capsys.readouterr().out
    assert cli.group_main(["usage", "proj"]) == 0
    assert int(capsys.readouterr().out) == sum(len(v) for v in files.values())
    assert cli.group_main(["manifest", "proj/asset"]) == 0 and '"d0/f0000.bin"' in capsys.readouterr().out
    assert cli.group_main(["set-permissions", "proj", "--uploader", "tim,trusted"]) == 0
    assert '"tim"' in capsys.readouterr().out
    assert cli.group_main(["permissions", "proj"]) == 0 and '"ursula"' in capsys.readouterr().out
    assert cli.group_main(["set-quota", "proj", "--baseline", "1e12"]) == 3  # owners cannot
    assert "administrative" in capsys.readouterr().err
    monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", ADMIN)
    assert cli.group_main(["set-quota", "proj", "--baseline", "1e12"]) == 0
    assert cli.group_main(["quota", "proj"]) == 0 and "1000000000000" in capsys.readouterr().out
    # probation through the CLI
    monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", UPLOADER)
    assert cli.push_main([str(src), "proj/asset/v2", "-q"]) == 0
    monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", OWNER)
    assert cli.group_main(["approve", "proj/asset/v2"]) == 0
    assert cli.group_main(["versions", "proj/asset"]) == 0 and "v2  (latest)" in capsys.readouterr().out
    assert cli.push_main([str(src), "proj/asset/v3", "--probation", "--no-dedup", "-q"]) == 0
    assert cli.group_main(["reject", "proj/asset/v3"]) == 0
    capsys.readouterr()
    assert cli.group_main(["versions", "proj/asset"]) == 0 and "v3" not in capsys.readouterr().out


def test_cli_errors_and_exit_statuses(tsim: ThreadedSim, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_tree(src, 3)
    assert cli.push_main([str(src), "proj/asset"]) == 2  # no version
    assert cli.push_main([str(src), "proj/asset/v1", "--compress", "zstd"]) == 2
    monkeypatch.delenv("ASYNCDEPO_GYPSUM_TOKEN")
    assert cli.push_main([str(src), "proj/asset/v1"]) == 2
    assert "GITHUB_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("GITHUB_TOKEN", "not-a-token")
    assert cli.push_main([str(src), "proj/asset/v1", "-q"]) == 3
    monkeypatch.setenv("GITHUB_TOKEN", OWNER)
    assert cli.push_main([str(src), "proj/asset/v1", "-q"]) == 0
    assert cli.push_main([str(src), "proj/asset/v1", "-q"]) == 4  # versions are immutable
    assert "already exists" in capsys.readouterr().err
    assert cli.pull_main(["proj/nothing", str(tmp_path / "o")]) == 4
    assert cli.group_main(["unlock", "proj"]) == 3  # administrators only


def test_cli_killed_push_resumes_without_resending(tsim: ThreadedSim, tmp_path: Path) -> None:
    """SIGKILL mid-way (no cleanup at all), then the same command again: only the missing files are sent."""
    assert tsim.server is not None
    faults, state = tsim.server.faults, tsim.server.app[gsim.STATE_KEY]
    src = tmp_path / "src"
    files = make_tree(src, 40, size=20_000)
    # once 4 PUTs (all of --transfers) are held, every earlier PUT has finished
    all_held = threading.Event()
    faults.on_stall.append(lambda n: all_held.set() if n >= 4 else None)
    tsim.call(lambda: faults.add(FaultRule("stall", method="PUT", path="/s3/*", skip=10, first=0)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-c", "import sys; from asyncdepo.cli import main; sys.exit(main(sys.argv[1:]))",
           "push", "gypsum", str(src), "proj/asset/v1", "-q", "--transfers", "4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert all_held.wait(timeout=60), "the push never reached the held PUTs"  # a guard, not a wait
        assert state.counters["puts_ok"] >= 10
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = tsim.server.app[gsim.STATE_KEY].bucket.root
    assert (root / "proj/..LOCK").exists()  # a killed process cleans up nothing
    tsim.call(faults.clear)
    version = root / "proj/asset/v1"
    present = {p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file() and "/.." not in
               "/" + p.relative_to(version).as_posix()}
    tsim.call(faults.reset_counters)
    assert cli.push_main([str(src), "proj/asset/v1", "-q", "--transfers", "4"]) == 0
    missing = set(files) - present
    assert faults.bytes_in[PUT] == sum(len(files[r]) for r in missing) and len(missing) <= 30
    assert not (root / "proj/..LOCK").exists()
    assert all((version / rel).read_bytes() == data for rel, data in files.items())


def test_group_options_are_accepted_after_the_command(tsim: ThreadedSim, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``asyncdepo gypsum create ... --server URL``: the global option after the subcommand is taken (and wins
    over one given before it), as a user types it."""
    monkeypatch.setenv("ASYNCDEPO_GYPSUM_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", ADMIN)
    assert cli.group_main(["create", "later", "--owner", "olivia", "--server", tsim.url]) == 0
    assert cli.group_main(["--server", tsim.url, "create", "before", "--owner", "olivia"]) == 0
    capsys.readouterr()
    assert cli.group_main(["--server", "http://127.0.0.1:9", "ls", "--server", tsim.url]) == 0
    assert capsys.readouterr().out.split() == ["before/", "later/", "proj/"]


def test_cli_streamed_bodies_reach_the_store_intact(tsim: ThreadedSim, tmp_path: Path) -> None:
    """Large random files through the CLI (uvloop, which keeps references to queued writes): the store's md5
    check never fails, so no PUT is retried and the bucket holds the files' bytes. A body that handed its
    block back while the transport still held part of it failed here (BadDigest, then retries)."""
    assert tsim.server is not None
    state = tsim.server.app[gsim.STATE_KEY]
    src = tmp_path / "src"
    src.mkdir()
    files = {f"big{i}.bin": os.urandom(24_000_000 + 4099 * i) for i in range(3)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    assert cli.push_main([str(src), "proj/asset/v1", "-q", "--transfers", "3"]) == 0
    assert state.counters["bad_digest"] == 0
    assert state.counters["puts_ok"] == len(files)
    version = bucket_of(tsim.server.app) / "proj/asset/v1"
    assert {name: (version / name).read_bytes() == data for name, data in files.items()} == dict.fromkeys(files, True)
