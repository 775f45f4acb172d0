"""The watch's edge paths on real files: what an event's paths name when they are gone, links, outside the
root or excluded; markers that cannot be read; a stop with files still in flight (the stop timeout cuts
them short); a file rewritten while it is sent; a file deleted while it settles; the bound on files waiting
to settle; rescans only. Clocks are ManualClocks (time moves when the test says); outcomes are the files
on the target, the watch's counters and the messages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.local import LocalAdapter
from asyncdepo.adapters.tus import TusAdapter
from asyncdepo.contract import Features, Item
from asyncdepo.engine.watch import Watch, WatchOptions, refuse
from asyncdepo.engine.watchfs import look, markers, released, stat_file
from asyncdepo.errors import UsageError
from asyncdepo.events import Event, ItemFailed, Message, Reporter
from asyncdepo.sim.faults import FaultRule
from tests.conftest import tree_digests
from tests.e2e.test_watch import SETTLE, Seen, _append, _watching
from tests.fakeclock import ManualClock


def _rels(items: list[Item]) -> list[str]:
    return sorted(it.rel for it in items)


# -- what event paths name (watchfs.look), on a real tree ---------------------------------------------------
def test_look_skips_gone_outside_and_unfollowed_links_and_follows_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "beam"
    (root / "d").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a" * 10)
    (root / "d" / "keep.bin").write_bytes(b"k" * 20)
    (root / "d" / "skip.tmp").write_bytes(b"t")
    (root / "x.tmp").write_bytes(b"x")
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"o" * 30)
    (root / "link.bin").symlink_to(outside)
    (root / "dangling.bin").symlink_to(tmp_path / "nothing")
    (tmp_path / "linked_dir").mkdir()
    (tmp_path / "linked_dir" / "in.bin").write_bytes(b"i" * 5)
    (root / "ld").symlink_to(tmp_path / "linked_dir")
    paths = [str(root), str(outside), str(root / "gone.bin"), str(root / "a.bin"), str(root / "d"),
             str(root / "x.tmp"), str(root / "link.bin"), str(root / "dangling.bin"), str(root / "ld")]
    found, walked = look(root, paths, (), ("*.tmp",), False, None)
    assert {it.rel: it.size for it in found} == {"a.bin": 10, "d/keep.bin": 20}
    assert walked == [str(root / "d")]
    found, walked = look(root, paths, (), ("*.tmp",), True, None)
    # followed: the link to a file is that file's bytes; the link to a directory is walked; a dangling link
    # names nothing
    assert {it.rel: it.size for it in found} == {"a.bin": 10, "d/keep.bin": 20, "link.bin": 30, "ld/in.bin": 5}
    assert sorted(walked) == sorted([str(root / "d"), str(root / "ld")])
    assert stat_file(str(root / "dangling.bin"), True) is None and stat_file(str(root / "d"), False) is None


def test_look_in_marker_mode_releases_only_what_a_marker_covers(tmp_path: Path) -> None:
    root = tmp_path / "beam"
    (root / "run").mkdir(parents=True)
    for name in ("a.h5", "b.h5", "skip.tmp"):
        (root / "run" / name).write_bytes(name.encode())
    (root / "c.h5").write_bytes(b"c")
    (root / "run" / "a.h5.done").write_bytes(b"")
    # a walked directory: its marker releases a.h5 only; an excluded file is never released
    found, _ = look(root, [str(root / "run")], (), ("*.tmp",), False, "*.done")
    assert _rels(found) == ["run/a.h5"]
    # the marker named by an event releases what it covers; a file of the root, with no marker, waits
    (root / "DONE.done").write_bytes(b"")
    found, _ = look(root, [str(root / "DONE.done"), str(root / "run" / "b.h5")], (), ("*.tmp",), False, "*.done")
    assert _rels(found) == ["c.h5"]  # DONE.done covers the root's files; b.h5 has no marker of its own


def test_markers_that_cannot_be_read_release_nothing(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "f.h5").write_bytes(b"f")
    (d / "f.h5.done").symlink_to(tmp_path / "nothing")  # a marker whose stat fails
    assert markers(str(d), "*.done") == []
    st = (d / "f.h5").stat()
    item = Item(str(d / "f.h5"), "run/f.h5", st.st_size, st.st_mtime_ns)
    assert released([item], "*.done") == []
    gone = Item(str(tmp_path / "vanished" / "g.h5"), "vanished/g.h5", 1, 1)  # its directory is gone
    assert markers(str(tmp_path / "vanished"), "*.done") == [] and released([gone], "*.done") == []


def test_released_over_many_directories(tmp_path: Path) -> None:
    # more directories than the markers cache holds: each is still judged by its own markers
    items = []
    for i in range(70):
        d = tmp_path / f"d{i:02d}"
        d.mkdir()
        f = d / "f.bin"
        f.write_bytes(b"x")
        if i % 2 == 0:
            (d / "DONE").write_bytes(b"")
        st = f.stat()
        items.append(Item(str(f), f"d{i:02d}/f.bin", st.st_size, st.st_mtime_ns))
    assert _rels(released(items, "DONE")) == [f"d{i:02d}/f.bin" for i in range(0, 70, 2)]


# -- options and refusals -----------------------------------------------------------------------------------
def test_options_and_targets_refused() -> None:
    with pytest.raises(UsageError, match="--rescan must be"):
        WatchOptions(rescan=0)
    with pytest.raises(UsageError, match="--rescan must be"):
        WatchOptions(rescan=float("inf"))
    with pytest.raises(UsageError, match="--stop-timeout must be"):
        WatchOptions(stop_timeout=-1)
    with pytest.raises(UsageError, match="one archive"):
        refuse(Features(packed=True))
    with pytest.raises(UsageError, match="every file before the upload starts"):
        refuse(Features(needs_digests_before_start=True))
    refuse(Features(needs_digests_before_start=True, watch_units=True))  # gypsum: batches as units


# -- a watch on real trees ----------------------------------------------------------------------------------
class Messages:
    def __init__(self, reporter: Reporter) -> None:
        self.texts: list[str] = []
        self.failed: list[ItemFailed] = []
        reporter.listeners.append(self._event)

    def _event(self, event: Event) -> None:
        if isinstance(event, Message):
            self.texts.append(event.text)
        elif isinstance(event, ItemFailed):
            self.failed.append(event)

    def has(self, part: str) -> bool:
        return any(part in t for t in self.texts)


async def test_a_watch_stopped_before_it_starts_sends_nothing(tmp_path: Path, journal: Path) -> None:
    src, dst = tmp_path / "beam", tmp_path / "archive"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    watch = Watch(WatchOptions(settle=SETTLE, stop_timeout=0), clock=ManualClock())
    watch.stop()
    assert watch.stopping
    report = await push(src, LocalAdapter(f"file://{dst}"), EngineConfig(), journal_path=journal, watch=watch)
    assert report.ok and report.files_done == 0 and not report.interrupted
    assert watch.scans == 1 and not watch.pending and not (dst / "a.bin").exists()


async def test_rescans_only_bounded_pending_a_deleted_file_and_a_fifo(tmp_path: Path, journal: Path) -> None:
    src, dst = tmp_path / "beam", tmp_path / "archive"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(5)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    (src / "doomed.bin").write_bytes(b"d" * 50)
    os.mkfifo(src / "pipe")  # not a regular file: skipped with a warning at the first scan
    clock = ManualClock()
    # no events: only the rescans find files; at most 2 files wait to settle, so the first scan waits for the
    # ones it observed before it ends
    watch = Watch(WatchOptions(settle=SETTLE, rescan=2, events=False, max_pending=2), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)
    msgs = Messages(reporter)
    late = os.urandom(3000)

    async def body() -> None:
        await seen.until(lambda: len(seen.observed) == 6 and watch.idle, "the first scan observed every file")
        assert watch.scans == 1 and len(watch.pending) == 6  # one walk batch, then it waits (max_pending)
        (src / "doomed.bin").unlink()  # deleted while it settles: never sent
        clock.advance(SETTLE + 1)
        await seen.until(lambda: set(files) <= set(seen.done), "the settled files sent")
        await seen.until(lambda: watch.idle and not watch.handed, "idle")
        (src / "late.bin").write_bytes(late)  # no event: the next rescan finds it
        clock.advance(2.5)
        await seen.until(lambda: "late.bin" in seen.observed and watch.idle, "the rescan observed late.bin")
        scans = watch.scans
        clock.advance(2.5)  # a rescan while late.bin still settles: nothing new to observe
        await seen.until(lambda: watch.scans > scans and watch.idle, "a rescan")
        assert seen.observed["late.bin"] == 1 and "late.bin" not in seen.done
        clock.advance(SETTLE)
        await seen.until(lambda: "late.bin" in seen.done, "late.bin sent")

    report = await _watching(src, LocalAdapter(f"file://{dst}"), journal, watch, reporter, body)
    assert report.ok, report.failures
    assert not watch.events_live and watch.events == 0
    assert sorted(seen.done) == sorted([*files, "late.bin"])
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == {**files, "late.bin": late}
    assert msgs.has("skipped pipe: not a regular file")


async def test_stop_cuts_short_what_is_still_in_flight_after_the_stop_timeout(tus_server: Any, tmp_path: Path,
                                                                              journal: Path) -> None:
    src = tmp_path / "beam"
    src.mkdir()
    data = os.urandom(3 << 20)
    (src / "big.bin").write_bytes(data)
    stalled = anyio.Event()
    tus_server.faults.on_stall.append(lambda n: stalled.set())
    tus_server.faults.add(FaultRule("stall", method="PATCH", skip=1, first=0))  # its 2nd chunk hangs
    clock = ManualClock()
    watch = Watch(WatchOptions(settle=SETTLE, rescan=10_000, stop_timeout=30), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)
    msgs = Messages(reporter)

    async def body() -> None:
        await seen.until(lambda: "big.bin" in seen.observed, "observed")
        clock.advance(SETTLE + 1)
        await stalled.wait()
        watch.stop()
        await seen.until(lambda: msgs.has("may take up to 30 s"), "the stop began")
        clock.advance(31)
        await seen.until(lambda: watch.cut_short, "cut short")

    try:
        report = await _watching(src, TusAdapter(f"tus+{tus_server.url}/files/"), journal, watch, reporter, body)
    finally:
        tus_server.faults.release_stalls()
    assert report.interrupted and watch.cut_short and not seen.done
    assert msgs.has("files still in flight after 30 s are cut short")
    assert not (tus_server.store / "complete" / "big.bin").exists()
    assert tus_server.faults.total_bytes("PATCH") == 1 << 20  # the first chunk, kept for the next run


async def test_a_file_rewritten_while_it_is_sent_waits_and_goes_again(tus_server: Any, tmp_path: Path,
                                                                     journal: Path) -> None:
    src = tmp_path / "beam"
    src.mkdir()
    first, more = os.urandom(3 << 20), os.urandom(5000)
    (src / "big.bin").write_bytes(first)
    stalled = anyio.Event()
    tus_server.faults.on_stall.append(lambda n: stalled.set())
    tus_server.faults.add(FaultRule("stall", method="PATCH", skip=1, first=1))  # the 2nd chunk hangs, once
    clock = ManualClock()
    watch = Watch(WatchOptions(settle=SETTLE, rescan=10_000), clock=clock)
    reporter = Reporter()
    seen = Seen(watch, reporter)

    async def body() -> None:
        await seen.until(lambda: "big.bin" in seen.observed, "observed")
        clock.advance(SETTLE + 1)
        await stalled.wait()
        _append(src / "big.bin", more)  # the writer appends while the first version is sent
        await seen.until(lambda: seen.observed["big.bin"] == 2 and watch.idle, "the append observed")
        clock.advance(SETTLE + 1)  # it settles while its first version is still in the pass: it waits
        await seen.until(lambda: seen.observed["big.bin"] == 3 and watch.idle, "held back")
        assert "big.bin" in watch.handed and not seen.done
        assert tus_server.faults.total_bytes("PATCH") == 1 << 20  # nothing more moved meanwhile
        tus_server.faults.release_stalls()
        await seen.until(lambda: not watch.handed and watch.idle, "the first version's transfer ended")
        clock.advance(SETTLE + 1)
        await seen.until(lambda: (tus_server.store / "complete" / "big.bin").exists()
                         and (tus_server.store / "complete" / "big.bin").stat().st_size == len(first + more),
                         "the rewritten file sent")

    report = await _watching(src, TusAdapter(f"tus+{tus_server.url}/files/"), journal, watch, reporter, body)
    assert (tus_server.store / "complete" / "big.bin").read_bytes() == first + more
    assert tree_digests(tus_server.store / "complete") == tree_digests(src)
    assert report.ok or all(rel == "big.bin" for rel, _ in report.failures)
