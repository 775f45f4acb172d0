"""Beamline mode end to end against the tus simulator and the local target: files written slowly by a
writer thread are sent only once settled and arrive intact; markers release files; a rewritten file is
sent again; a stop lets files in flight finish. The watch's clock is a ManualClock: settling happens when
the test moves time, never by waiting."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.local import LocalAdapter
from asyncdepo.adapters.tus import TusAdapter
from asyncdepo.engine.watch import Watch, WatchOptions
from asyncdepo.errors import UsageError
from asyncdepo.events import Event, ItemDone, Reporter
from tests.conftest import tree_digests, upload_bytes
from tests.fakeclock import ManualClock

SETTLE = 5.0

pytest_plugins = ["tests.adapters.s3_servers"]  # moto_server


class Seen:
    """What the watch observed and what the run finished, as conditions a test can wait for."""

    def __init__(self, watch: Watch, reporter: Reporter) -> None:
        self.observed: dict[str, int] = {}
        self.done: list[str] = []
        self._changed = anyio.Event()
        watch.on_observe(self._observe)
        watch.on_idle(self._poke)
        reporter.listeners.append(self._event)

    def _observe(self, rel: str) -> None:
        self.observed[rel] = self.observed.get(rel, 0) + 1
        self._poke()

    def _event(self, event: Event) -> None:
        if isinstance(event, ItemDone):
            self.done.append(event.rel)
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        with anyio.move_on_after(60):  # a guard against a hang, not a wait for tasks
            while not cond():
                changed = self._changed
                await changed.wait()
        assert cond(), f"{what}: observed {self.observed}, done {self.done}"


class Writer:
    """A thread that performs the steps the test asks for, one at a time (appends, so size always changes)."""

    def __init__(self) -> None:
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._steps: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._go.acquire()
            if not self._steps:
                return
            self._steps.pop(0)()
            self._done.release()

    async def do(self, step: Callable[[], None]) -> None:
        self._steps.append(step)
        self._go.release()
        await anyio.to_thread.run_sync(self._done.acquire)

    def close(self) -> None:
        self._go.release()
        self._thread.join(timeout=10)


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(data)


async def _watching(src: Path, adapter: Any, journal: Path, watch: Watch, reporter: Reporter,
                    body: Callable[[], Any], **kw: Any) -> Any:
    """Run ``push(..., watch=watch)`` while ``body()`` drives the test; stop the watch after it."""
    result: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await push(src, adapter, EngineConfig(chunk_size=1 << 20, **kw), reporter=reporter,
                                     journal_path=journal, watch=watch))

        tg.start_soon(run)
        try:
            await body()
        finally:
            watch.stop()
    return result[0]


async def test_slow_writer_files_sent_only_once_settled_and_intact(tus_server, tmp_path: Path,
                                                                   journal: Path) -> None:
    src = tmp_path / "beam"
    for d in ("run1", "run2", "run3"):  # new directories have their own test (the marker one)
        (src / d).mkdir(parents=True)
    (src / "before.bin").write_bytes(os.urandom(3000))  # there before the watch starts
    clock = ManualClock()
    watch = Watch(WatchOptions(settle=SETTLE, rescan=10_000), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)
    writer = Writer()
    # file -> the pieces the writer appends, one per round; between two rounds the clock moves by less than
    # the settle time, so a file still being written never goes unchanged for that long
    plan: dict[str, list[bytes]] = {
        "run1/frame_000.raw": [os.urandom(40_000)],
        "run1/frame_001.raw": [os.urandom(30_000), os.urandom(30_000), os.urandom(5)],
        "run1/frame_002.raw": [os.urandom(2 << 20), os.urandom(1 << 20)],  # multi-chunk once complete
        "run2/log.txt": [b"start\n", b"more\n", b"more\n", b"more\n", b"end\n"],
        "run2/empty.dat": [b""],
    }
    late = {"run3/late.bin": os.urandom(5000)}  # appears in round 3, in one piece
    finished: set[str] = {"before.bin"}
    sent_early: list[str] = []

    def check_done(event: Event) -> None:
        if isinstance(event, ItemDone) and event.rel not in finished:
            sent_early.append(event.rel)

    reporter.listeners.append(check_done)
    step = SETTLE * 0.8

    async def body() -> None:
        await seen.until(lambda: "before.bin" in seen.observed, "the first scan observes what exists")
        rounds = max(len(p) for p in plan.values())
        for k in range(rounds + 3):
            touched = {rel: pieces[k] for rel, pieces in plan.items() if k < len(pieces)}
            if k == 3:
                touched.update(late)
            if touched:
                def write(touched: dict[str, bytes] = touched) -> None:
                    for rel, piece in touched.items():
                        _append(src / rel, piece)

                await writer.do(write)
                finished.update(r for r, pieces in plan.items() if k == len(pieces) - 1)
                finished.update(r for r in late if k == 3)
                new = [rel for rel in touched if rel not in seen.observed]
                await seen.until(lambda new=new: all(r in seen.observed for r in new), f"observed {new}")
            # nothing of a file being written has moved: only the bytes of the files already sent
            assert upload_bytes(tus_server.faults) == sum((src / r).stat().st_size for r in seen.done)
            clock.advance(step)
            await seen.until(lambda: watch.idle and not watch.handed
                             and all(s.due > clock.now for s in watch.pending.values()), "the watch is idle")
        await seen.until(lambda: set(seen.done) == set(plan) | set(late) | {"before.bin"}, "every file sent")

    try:
        report = await _watching(src, TusAdapter(f"tus+{tus_server.url}/files/"), journal, watch, reporter, body)
    finally:
        writer.close()
    assert report.ok, report.failures
    assert not sent_early, f"sent before they were complete: {sent_early}"
    assert sorted(seen.done) == sorted([*plan, *late, "before.bin"])  # each file once
    assert seen.observed["run2/log.txt"] >= 3  # found changed when it came due, and observed again
    assert tree_digests(tus_server.store / "complete") == tree_digests(src)
    assert upload_bytes(tus_server.faults) == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


async def test_marker_releases_a_file_or_a_directory(tmp_path: Path, journal: Path) -> None:
    src, dst = tmp_path / "beam", tmp_path / "archive"
    src.mkdir()
    clock = ManualClock()
    watch = Watch(WatchOptions(ready="*.done", rescan=10_000), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)

    async def body() -> None:
        _append(src / "a.h5", b"A" * 5000)
        _append(src / "b.h5", b"B" * 5000)
        _append(src / "a.h5.done", b"")  # releases a.h5 only
        await seen.until(lambda: "a.h5" in seen.done, "a.h5 released by its marker")
        assert "b.h5" not in seen.done
        _append(src / "sub" / "x.bin", b"x" * 10)
        _append(src / "sub" / "y.bin", b"y" * 10)
        _append(src / "sub" / "all.done", b"")  # named after no file: releases the directory
        await seen.until(lambda: {"sub/x.bin", "sub/y.bin"} <= set(seen.done), "the directory released")
        assert "b.h5" not in seen.done
        _append(src / "b.h5.done", b"")
        await seen.until(lambda: "b.h5" in seen.done, "b.h5 released by its marker")

    report = await _watching(src, LocalAdapter(f"file://{dst}"), journal, watch, reporter, body)
    assert report.ok, report.failures
    assert sorted(seen.done) == ["a.h5", "b.h5", "sub/x.bin", "sub/y.bin"]
    assert not any(p.name.endswith(".done") for p in dst.rglob("*"))  # markers are never sent
    assert (dst / "b.h5").read_bytes() == b"B" * 5000


async def test_rewritten_file_is_sent_again_and_unchanged_ones_are_not(tus_server, tmp_path: Path,
                                                                       journal: Path) -> None:
    src = tmp_path / "beam"
    src.mkdir()
    (src / "keep.bin").write_bytes(os.urandom(10_000))
    (src / "redo.bin").write_bytes(os.urandom(10_000))
    clock = ManualClock()
    # a rescan at every advance: the rescan, not only the event, must not send an unchanged file again
    watch = Watch(WatchOptions(settle=SETTLE, rescan=SETTLE), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)
    new = os.urandom(7_000)

    async def body() -> None:
        await seen.until(lambda: len(seen.observed) == 2, "both observed")
        clock.advance(SETTLE + 2)
        await seen.until(lambda: len(seen.done) == 2, "both sent")
        (src / "redo.bin").write_bytes(new)
        await seen.until(lambda: seen.observed.get("redo.bin") == 2, "the rewrite observed")
        for _ in range(3):
            clock.advance(SETTLE + 2)
        await seen.until(lambda: len(seen.done) == 3, "the rewrite sent")
        assert watch.scans >= 2

    report = await _watching(src, TusAdapter(f"tus+{tus_server.url}/files/"), journal, watch, reporter, body)
    assert report.ok and sorted(seen.done) == ["keep.bin", "redo.bin", "redo.bin"]
    assert (tus_server.store / "complete" / "redo.bin").read_bytes() == new
    assert upload_bytes(tus_server.faults) == 20_000 + len(new)


async def test_watch_refuses_targets_that_take_the_whole_source_at_once(tmp_path: Path, journal: Path) -> None:
    from asyncdepo.adapters.gypsum.adapter import GypsumAdapter

    with pytest.raises(UsageError, match="watch mode does not apply"):
        await push(tmp_path, GypsumAdapter("http://127.0.0.1:9", "p", "a", "v", token="t"), journal_path=journal,
                   watch=Watch())
    with pytest.raises(UsageError, match="--watch needs a directory"):
        f = tmp_path / "one.bin"
        f.write_bytes(b"1")
        await push(f, LocalAdapter(f"file://{tmp_path / 'dst'}"), journal_path=journal, watch=Watch())
    with pytest.raises(UsageError, match="--settle"):
        WatchOptions(settle=-1)
    with pytest.raises(UsageError, match="every file a marker"):
        WatchOptions(ready="*")


async def test_watch_into_s3_multipart_and_small(moto_server, tmp_path: Path, journal: Path) -> None:
    from asyncdepo.adapters.s3.adapter import S3Adapter
    from tests.adapters.s3_helpers import PART

    src = tmp_path / "beam"
    src.mkdir()
    clock = ManualClock()
    watch = Watch(WatchOptions(settle=SETTLE, rescan=10_000), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)
    bucket = moto_server.new_bucket()
    config = EngineConfig(transfers=4, chunk_size=PART)
    files = {"small.bin": os.urandom(1000), "big.bin": os.urandom(2 * PART + 17)}

    async def body() -> None:
        for rel, data in files.items():
            (src / rel).write_bytes(data)
        await seen.until(lambda: set(files) <= set(seen.observed), "observed")
        clock.advance(SETTLE + 2)
        await seen.until(lambda: set(files) <= set(seen.done), "sent")

    adapter = S3Adapter(f"s3://{bucket}/bl", config, moto_server.secrets, endpoint_url=moto_server.endpoint_url)
    result: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await push(src, adapter, config, reporter=reporter, journal_path=journal, watch=watch))

        tg.start_soon(run)
        try:
            await body()
        finally:
            watch.stop()
    assert result[0].ok, result[0].failures
    client = moto_server.client()
    for rel, data in files.items():
        assert client.get_object(Bucket=bucket, Key=f"bl/{rel}")["Body"].read() == data
