"""Watch units into gypsum (each batch a version), against the gypsum simulator: files that cannot go in
a unit fail alone (a name gypsum refuses, a file deleted, made unreadable or changed while it is hashed),
a unit with nothing left opens nothing; a completion the server refuses discards the version and its files
go again with the next rescan; a stop while a batch waits leaves it for the next run; the version an
earlier run left open is completed without a file deleted meanwhile; --compress is refused. Outcomes are
the simulator's versions and manifests, the failures' classes and messages, the journal's rows."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.gypsum.adapter import GypsumAdapter
from asyncdepo.engine.watch import Watch
from asyncdepo.errors import UsageError
from asyncdepo.events import Event, Message
from asyncdepo.sim.faults import FaultRule
from asyncdepo.sim.server import SimServer
from tests.e2e.test_watch_gypsum import (
    OWNER,
    SETTLE,
    Watching,
    bucket,
    latest,
    manifest,
    sim,  # noqa: F401 - a fixture
    versions,
    write,
)

COMPLETE = "/upload/complete/proj/asset/run"


def _on_hashing(w: Watching, act: list[object]) -> None:
    """Before each unit's files are hashed, do the next of ``act`` (a callable) to the source files."""

    def listen(event: Event) -> None:
        if isinstance(event, Message) and event.text.startswith("hashing ") and act:
            step = act.pop(0)
            assert callable(step)
            step()

    w.reporter.listeners.append(listen)


async def test_files_that_cannot_go_in_a_unit_fail_alone(sim: SimServer, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "beam"
    files = {"a.bin": os.urandom(3000), "gone.bin": b"g" * 100, "dir.bin": b"d" * 100, "grows.bin": b"x" * 100,
             "..hidden": b"h" * 10}
    write(src, files)
    w = Watching(sim, tmp_path, src)

    def first() -> None:  # while the unit is about to be hashed: a real delete, a directory, an append
        (src / "gone.bin").unlink()
        (src / "dir.bin").unlink()
        (src / "dir.bin").mkdir()
        with open(src / "grows.bin", "ab") as fh:
            fh.write(b"more")

    def second() -> None:
        (src / "late.bin").unlink()

    _on_hashing(w, [first, lambda: None, second])

    async def body() -> None:
        await w.settle(set(files))
        await w.completed("run")
        assert {f.rel for f in w.failed} == {"..hidden", "gone.bin", "dir.bin", "grows.bin"}
        assert [f.rel for f in w.failed if f.transient] == ["grows.bin"]
        # the file that changed while it was hashed is observed again, settles, and goes in a unit of its own
        await w.seen.until(lambda: w.seen.observed["grows.bin"] == 2 and w.watch.idle, "grows.bin again")
        w.clock.advance(SETTLE + 2)
        await w.completed("run-2")
        write(src, {"late.bin": b"late"})
        await w.settle({"late.bin"})
        await w.seen.until(lambda: "late.bin" in {f.rel for f in w.failed}, "late.bin failed")
        await w.seen.until(lambda: w.watch.idle and not w.watch.handed, "idle")

    report = await w.run(body)
    assert versions(sim) == ["run", "run-2"] and set(manifest(sim, "run")) == {"a.bin"}  # what it could keep
    assert set(manifest(sim, "run-2")) == {"a.bin", "grows.bin"}
    assert (bucket(sim) / "proj/asset/run/a.bin").read_bytes() == files["a.bin"]
    assert (bucket(sim) / "proj/asset/run-2/grows.bin").read_bytes() == files["grows.bin"] + b"more"
    why = dict(report.failures)
    assert "cannot be stored in gypsum" in why["..hidden"]
    assert "source vanished" in why["gone.bin"] and "source vanished" in why["late.bin"]
    assert "dir.bin: cannot read: Is a directory" in why["dir.bin"]
    assert sorted(why) == ["..hidden", "dir.bin", "gone.bin", "late.bin"]  # grows.bin went in the end
    assert any(f.rel == "grows.bin" and "changed while it was hashed" in f.error for f in w.failed)
    assert latest(sim) == "run-2"  # late.bin's unit had nothing left: no version opened for it


async def test_a_refused_completion_discards_the_version_and_the_rescan_sends_again(
        sim: SimServer, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "beam"
    files = {"a.bin": os.urandom(4000), "b.bin": os.urandom(5000)}
    write(src, files)
    sim.faults.add(FaultRule("status", method="POST", path=COMPLETE, status=400, first=1))
    w = Watching(sim, tmp_path, src, rescan=60)

    async def body() -> None:
        await w.settle(set(files))
        await w.seen.until(lambda: any("could not be closed" in m for m in w.messages), "the completion refused")
        await w.seen.until(lambda: any("was discarded" in m for m in w.messages), "the version discarded")
        assert versions(sim) == [] and not (bucket(sim) / "proj/..LOCK").exists()  # aborted, unlocked
        w.clock.advance(60)  # the rescan offers them again: the journal no longer has them done
        await w.seen.until(lambda: all(w.seen.observed[rel] == 2 for rel in files), "re-offered")
        w.clock.advance(SETTLE + 2)
        await w.completed("run")

    report = await w.run(body)
    assert report.ok, report.failures
    assert versions(sim) == ["run"] and set(manifest(sim, "run")) == set(files)
    assert all((bucket(sim) / "proj/asset/run" / rel).read_bytes() == data for rel, data in files.items())
    assert any("could not be closed" in m and "400" in m for m in w.messages)


async def test_compress_is_refused_in_watch_units(sim: SimServer, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "beam"
    write(src, {"a.bin": b"a"})
    adapter = GypsumAdapter(sim.url, "proj", "asset", "run", token=OWNER, sessions=tmp_path / "s", watch=True)
    with pytest.raises(UsageError, match="--compress does not apply"):
        await push(src, adapter, EngineConfig(compress=("zstd", 3)), journal_path=tmp_path / "j.sqlite",
                   watch=Watch())
    assert versions(sim) == []


async def test_a_stop_while_a_batch_waits_leaves_it_for_the_next_run(sim: SimServer,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    src = tmp_path / "beam"
    first, later = {"a.bin": os.urandom(6000)}, {"b.bin": os.urandom(7000)}
    write(src, first)
    held = anyio.Event()
    sim.faults.on_stall.append(lambda n: held.set())
    sim.faults.add(FaultRule("stall", method="PUT", path="/s3/proj/asset/run/a.bin"))
    w = Watching(sim, tmp_path, src)

    async def body() -> None:
        await w.settle(set(first))
        await held.wait()  # the first unit is being sent
        write(src, later)
        await w.settle(set(later))
        # handing b.bin over fires no hook (the producer then waits for the consumer): wait until every task
        # waits on something, as often as needed
        for _ in range(100_000):
            if "b.bin" in w.watch.handed:
                break
            await anyio.wait_all_tasks_blocked()
        assert "b.bin" in w.watch.handed, "b.bin handed over while the unit is sent"
        w.watch.stop()
        sim.faults.release_stalls()
        await w.completed("run")

    report = await w.run(body)
    assert report.ok, report.failures
    assert versions(sim) == ["run"] and set(manifest(sim, "run")) == set(first)  # b.bin went in no unit
    sim.faults.clear()
    again = Watching(sim, tmp_path, src)

    async def body2() -> None:
        await again.settle(set(later))  # a.bin is done in the journal: only b.bin is new
        await again.completed("run-2")

    report = await again.run(body2)
    assert report.ok, report.failures
    assert set(manifest(sim, "run-2")) == {"a.bin", "b.bin"}
    assert (bucket(sim) / "proj/asset/run-2/b.bin").read_bytes() == later["b.bin"]


async def test_a_unit_left_open_is_completed_without_a_file_deleted_meanwhile(sim: SimServer,  # noqa: F811
                                                                              tmp_path: Path) -> None:
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
            scope.cancel()  # as a second Ctrl-C: the version is cut short

        await w.run(body)
    assert (bucket(sim) / "proj/..LOCK").exists() and latest(sim) is None
    sim.faults.release_stalls()
    sim.faults.clear()
    (src / "f2.bin").unlink()  # the file not yet sent is deleted while nothing runs
    again = Watching(sim, tmp_path, src)

    async def body2() -> None:
        await again.seen.until(lambda: any("completing the unit an earlier run left open (3 file(s))" in m
                                           for m in again.messages), "the open unit taken up")
        await again.completed("run")

    report = await again.run(body2)
    assert report.ok and not report.interrupted, report.failures
    # the open upload listed f2.bin, which is gone: it is started again with what is there
    assert any("changed since (f2.bin" in m and "started again" in m for m in again.messages)
    assert versions(sim) == ["run"] and set(manifest(sim, "run")) == {"f0.bin", "f1.bin"}
    assert all((bucket(sim) / "proj/asset/run" / rel).read_bytes() == files[rel] for rel in ("f0.bin", "f1.bin"))
    assert not (bucket(sim) / "proj/..LOCK").exists()
