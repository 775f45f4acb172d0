"""Beamline mode into gypsum, against the gypsum simulator: each batch of files that became complete together
is a version of its own (``VERSION``, ``VERSION-2``...), each one the whole dataset (unchanged files linked
to the version before, never sent again); a batch the server refuses to start (another upload holds the
project's lock) waits for the next rescan. The watch's clock is a ManualClock: settling happens when the
test moves time, never by waiting. Assertions are on the simulator's bucket, manifests and counters."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.gypsum.adapter import GypsumAdapter
from asyncdepo.adapters.gypsum.api import GypsumClient
from asyncdepo.engine.pull import pull
from asyncdepo.engine.watch import Watch, WatchOptions
from asyncdepo.errors import AuthError, UsageError
from asyncdepo.events import Event, ItemFailed, Message, Reporter
from asyncdepo.sim import gypsum as gsim
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.server import SimServer
from tests.e2e.test_watch import Seen
from tests.fakeclock import ManualClock

SETTLE = 5.0
OWNER, ADMIN, UPLOADER = "tok-owner", "tok-admin", "tok-up"
PUT = "PUT /s3/{key}"


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = gsim.create_app(tmp_path / "sim", FaultInjector(),
                          identities={OWNER: "olivia", ADMIN: "root", UPLOADER: "ursula"}, admins=["root"])
    async with SimServer(app) as server:
        async with GypsumClient(server.url, ADMIN) as c:
            await c.create_project("proj", ["olivia"], [{"id": "ursula"}])
        yield server


def bucket(sim: SimServer) -> Path:
    return sim.app[gsim.STATE_KEY].bucket.root  # type: ignore[no-any-return]


def manifest(sim: SimServer, version: str) -> dict[str, Any]:
    return orjson.loads((bucket(sim) / "proj/asset" / version / "..manifest").read_bytes())  # type: ignore[no-any-return]


def latest(sim: SimServer) -> str | None:
    path = bucket(sim) / "proj/asset/..latest"
    return orjson.loads(path.read_bytes())["version"] if path.exists() else None


def versions(sim: SimServer) -> list[str]:
    asset = bucket(sim) / "proj/asset"
    return sorted(p.name for p in asset.iterdir() if p.is_dir()) if asset.exists() else []


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


class Watching:
    """``push(..., watch=...)`` into gypsum in a task; the test drives the clock and waits on conditions."""

    def __init__(self, sim: SimServer, tmp_path: Path, src: Path, *, rescan: float = 10_000,
                 token: str = OWNER) -> None:
        self.clock = ManualClock()
        self.watch = Watch(WatchOptions(settle=SETTLE, rescan=rescan), clock=self.clock)
        self.reporter = Reporter()
        self.seen = Seen(self.watch, self.reporter)
        self.messages: list[str] = []
        self.failed: list[ItemFailed] = []
        self.reporter.listeners.append(self._event)
        self.adapter = GypsumAdapter(sim.url, "proj", "asset", "run", token=token, sessions=tmp_path / "sessions",
                                     reporter=self.reporter, watch=True)
        self.src, self.journal = src, tmp_path / "journal.sqlite"

    def _event(self, event: Event) -> None:
        if isinstance(event, Message):
            self.messages.append(event.text)
        elif isinstance(event, ItemFailed):
            self.failed.append(event)

    async def completed(self, version: str) -> None:
        await self.seen.until(lambda: any(m.startswith(f"version proj/asset/{version} completed")
                                          for m in self.messages), f"version {version} completed")

    async def settle(self, rels: set[str]) -> None:
        """Wait until the watch observed ``rels``, then move the clock past the settle time."""
        await self.seen.until(lambda: rels <= set(self.seen.observed), f"observed {rels}")
        self.clock.advance(SETTLE + 2)

    async def run(self, body: Any) -> Any:
        result: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def go() -> None:
                result.append(await push(self.src, self.adapter, EngineConfig(transfers=4), reporter=self.reporter,
                                         journal_path=self.journal, watch=self.watch))

            tg.start_soon(go)
            try:
                await body()
            finally:
                self.watch.stop()
        return result[0]


async def test_two_waves_become_two_complete_versions(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "beam"
    wave1 = {"scan1/a.h5": os.urandom(30_000), "scan1/b.h5": os.urandom(20_000), "notes.txt": b"run 1\n"}
    wave2 = {"scan2/c.h5": os.urandom(25_000), "notes.txt": b"run 1\nrun 2\n"}  # one new, one rewritten
    write(src, wave1)
    w = Watching(sim, tmp_path, src)
    faults = sim.faults

    async def body() -> None:
        await w.settle(set(wave1))
        await w.completed("run")
        assert latest(sim) == "run" and faults.bytes_in[PUT] == sum(map(len, wave1.values()))
        write(src, wave2)
        await w.settle(set(wave2))
        await w.completed("run-2")
        # a file touched, not changed: no third version that would repeat the second
        st = (src / "scan1/a.h5").stat()
        os.utime(src / "scan1/a.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        await w.seen.until(lambda: w.seen.observed["scan1/a.h5"] == 2, "the touch observed")
        w.clock.advance(SETTLE + 2)
        await w.seen.until(lambda: any("no new version" in m for m in w.messages), "the touch settled")

    report = await w.run(body)
    assert report.ok, report.failures
    assert versions(sim) == ["run", "run-2"] and latest(sim) == "run-2"
    # only the new and the rewritten file crossed the wire for the second version
    assert faults.bytes_in[PUT] == sum(map(len, wave1.values())) + sum(map(len, wave2.values()))
    both = {**wave1, **wave2}
    second = manifest(sim, "run-2")
    assert set(second) == set(both)  # the whole dataset, not only the batch
    for rel, data in both.items():
        assert second[rel]["md5sum"] == hashlib.md5(data).hexdigest() and second[rel]["size"] == len(data)
    assert {rel for rel, e in second.items() if "link" in e} == {"scan1/a.h5", "scan1/b.h5"}
    assert all(second[rel]["link"]["version"] == "run" for rel in ("scan1/a.h5", "scan1/b.h5"))
    root = bucket(sim) / "proj/asset"
    assert (root / "run/notes.txt").read_bytes() == wave1["notes.txt"]  # versions are immutable
    assert (root / "run-2/notes.txt").read_bytes() == wave2["notes.txt"]
    assert (root / "run-2/scan2/c.h5").read_bytes() == wave2["scan2/c.h5"]
    assert not (root / "run-2/scan1/a.h5").exists()  # a link, not a copy
    assert not (bucket(sim) / "proj/..LOCK").exists()
    # a reader of ..latest gets the whole dataset as it is now
    out = tmp_path / "out"
    pulled = await pull(GypsumAdapter(sim.url, "proj", "asset", None), out, EngineConfig(transfers=2),
                        journal_path=tmp_path / "pull.sqlite")
    assert pulled.ok
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == both


async def test_a_batch_refused_at_start_waits_for_the_next_rescan(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "beam"
    first = {"a.bin": os.urandom(5000)}
    later = {"b.bin": os.urandom(6000), "c.bin": os.urandom(7000)}
    write(src, first)
    w = Watching(sim, tmp_path, src, rescan=60)
    other: dict[str, Any] = {}

    async def body() -> None:
        await w.settle(set(first))
        await w.completed("run")
        # another upload (another asset of the same project) holds the project's lock
        async with GypsumClient(sim.url, OWNER) as c:
            other.update(await c.start("proj", "other", "v1", [{"type": "simple", "path": "x", "md5sum": "0" * 32,
                                                               "size": 1}], False))
            write(src, later)
            await w.settle(set(later))
            await w.seen.until(lambda: {f.rel for f in w.failed} == set(later), "the batch refused")
            assert all(f.transient and "locked" in f.error for f in w.failed)
            assert versions(sim) == ["run"]
            await c.finish_upload(other["abort_url"], other["session_token"], "abort")
        w.clock.advance(60)  # the rescan offers them again
        await w.seen.until(lambda: all(w.seen.observed[rel] == 2 for rel in later), "observed again")
        w.clock.advance(SETTLE + 2)
        await w.completed("run-2")

    report = await w.run(body)
    assert report.ok, report.failures  # the files refused at first were sent: out of the report
    assert versions(sim) == ["run", "run-2"] and latest(sim) == "run-2"
    assert set(manifest(sim, "run-2")) == {*first, *later}


async def test_watch_needs_a_trusted_uploader_and_refuses_probation(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "beam"
    write(src, {"a.bin": b"a" * 100})
    w = Watching(sim, tmp_path, src, token=UPLOADER)  # ursula: an untrusted uploader, put on probation

    async def body() -> None:
        await w.settle({"a.bin"})
        await anyio.sleep_forever()

    with pytest.raises(BaseExceptionGroup) as group:  # the push's task in the test's task group
        await w.run(body)
    err = group.value.exceptions[0]
    assert isinstance(err, AuthError) and "on probation" in str(err)
    assert "--uploader ursula,trusted" in (err.hint or "")
    assert not (bucket(sim) / "proj/..LOCK").exists() and not (bucket(sim) / "proj/asset").exists()
    with pytest.raises(UsageError, match="--probation does not apply"):
        GypsumAdapter(sim.url, "proj", "asset", "run", token=OWNER, probation=True, watch=True)


async def test_what_exists_at_the_start_is_one_version_even_if_the_scan_is_slow(sim: SimServer,
                                                                                tmp_path: Path) -> None:
    src = tmp_path / "beam"
    files = {f"d{i}/f.bin": os.urandom(1000 + i) for i in range(4)}
    write(src, files)
    w = Watching(sim, tmp_path, src)
    # the first scan takes longer than the settle time: each file is observed 2 s after the one before
    slow = iter(range(len(files)))
    w.watch.on_observe(lambda rel: w.clock.advance(2) if next(slow, None) is not None else None)

    async def body() -> None:
        await w.seen.until(lambda: set(files) <= set(w.seen.observed) and w.watch.idle, "the first scan")
        w.clock.advance(SETTLE + 2)
        await w.completed("run")
        await w.seen.until(lambda: w.watch.idle and not w.watch.handed, "the watch is idle")

    report = await w.run(body)
    assert report.ok, report.failures
    assert versions(sim) == ["run"] and set(manifest(sim, "run")) == set(files)


async def test_a_version_name_taken_by_another_upload_is_passed_over(sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "beam"
    wave1, wave2 = {"a.bin": os.urandom(3000)}, {"b.bin": os.urandom(4000)}
    write(src, wave1)
    other = tmp_path / "other"
    write(other, {"x.bin": b"someone else's"})
    w = Watching(sim, tmp_path, src)

    async def body() -> None:
        await w.settle(set(wave1))
        await w.completed("run")
        report = await push(other, GypsumAdapter(sim.url, "proj", "asset", "run-2", token=OWNER,
                                                 sessions=tmp_path / "sessions"),
                            journal_path=tmp_path / "other.sqlite")
        assert report.ok
        write(src, wave2)
        await w.settle(set(wave2))
        await w.completed("run-3")

    report = await w.run(body)
    assert report.ok, report.failures
    assert versions(sim) == ["run", "run-2", "run-3"] and latest(sim) == "run-3"
    third = manifest(sim, "run-3")
    assert set(third) == {"a.bin", "b.bin"} and third["a.bin"]["link"]["version"] == "run"  # the chain's own
    assert any("run-2 exists already" in m for m in w.messages)


async def test_a_version_cut_short_is_completed_next_time_or_redone_if_its_files_changed(
        sim: SimServer, tmp_path: Path) -> None:
    src = tmp_path / "beam"
    files = {f"f{i}.bin": os.urandom(8000 + i) for i in range(3)}
    write(src, files)
    held = anyio.Event()
    sim.faults.on_stall.append(lambda n: held.set())
    sim.faults.add(FaultRule("stall", method="PUT", path="/s3/proj/asset/run/f2.bin"))
    w = Watching(sim, tmp_path, src)
    with anyio.CancelScope() as scope:

        async def body() -> None:
            await w.settle(set(files))
            await w.seen.until(lambda: {"f0.bin", "f1.bin"} <= set(w.seen.done), "two files sent")
            await held.wait()
            scope.cancel()  # as a second Ctrl-C: the version is cut short, no finish

        await w.run(body)
    assert (bucket(sim) / "proj/..LOCK").exists() and latest(sim) is None  # open, kept for the next run
    sim.faults.release_stalls()
    sim.faults.clear()
    # while it is down, a file already sent in the open version is rewritten
    write(src, {"f0.bin": (new := os.urandom(5000))})
    sim.faults.reset_counters()
    again = Watching(sim, tmp_path, src)

    async def body2() -> None:
        await again.completed("run")
        await again.seen.until(lambda: again.watch.idle and not again.watch.handed, "the watch is idle")

    report = await again.run(body2)
    assert report.ok, report.failures
    assert any("changed since" in m and "started again" in m for m in again.messages)
    assert versions(sim) == ["run"] and latest(sim) == "run"  # the same version, started again
    # the files of the aborted upload are sent again, whatever the journal had of them
    assert sim.faults.bytes_in[PUT] == len(new) + len(files["f1.bin"]) + len(files["f2.bin"])
    root = bucket(sim) / "proj/asset/run"
    assert (root / "f0.bin").read_bytes() == new
    assert all((root / rel).read_bytes() == data for rel, data in files.items() if rel != "f0.bin")
    assert not (bucket(sim) / "proj/..LOCK").exists()


async def test_a_version_with_a_failed_file_is_discarded_and_its_files_sent_again(sim: SimServer,
                                                                                  tmp_path: Path) -> None:
    src = tmp_path / "beam"
    files = {"a.bin": os.urandom(4000), "b.bin": os.urandom(5000), "c.bin": os.urandom(6000)}
    write(src, files)
    sim.faults.add(FaultRule("status", method="PUT", path="/s3/proj/asset/run/b.bin", status=400, first=0))
    w = Watching(sim, tmp_path, src, rescan=60)

    async def body() -> None:
        await w.settle(set(files))
        await w.seen.until(lambda: any("was discarded" in m for m in w.messages), "the version discarded")
        assert [(f.rel, f.transient) for f in w.failed] == [("b.bin", False)]
        assert versions(sim) == [] and not (bucket(sim) / "proj/..LOCK").exists()  # aborted, unlocked
        sim.faults.clear()
        w.clock.advance(60)  # the rescan offers the files sent in the discarded version again
        await w.seen.until(lambda: w.seen.observed["a.bin"] == 2 and w.seen.observed["c.bin"] == 2, "re-offered")
        write(src, {"b.bin": files["b.bin"] + b"fixed"})  # the refused file goes once it changed
        await w.seen.until(lambda: w.seen.observed["b.bin"] == 2, "the change observed")
        w.clock.advance(SETTLE + 2)
        await w.completed("run")

    report = await w.run(body)
    assert report.ok, report.failures
    assert versions(sim) == ["run"] and set(manifest(sim, "run")) == set(files)
    assert (bucket(sim) / "proj/asset/run/b.bin").read_bytes() == files["b.bin"] + b"fixed"
