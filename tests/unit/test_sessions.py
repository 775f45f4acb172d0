"""The engine's sessions (engine/sessions.py) through ``push`` and ``pull``, with a session adapter that copies
files between local folders the way a session transport does (many files per session, per-file reports), and
injects the failures the contract names: a transient session failure, a refused login, one file refused, a
corrupt copy, a kill in the middle. Assertions are on the files on disk, the journal's rows and the report."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdepo.config import EngineConfig
from asyncdepo.contract import (
    Adapter,
    ChunkWriter,
    Features,
    FetchPlan,
    Item,
    RemoteItem,
    SessionPlan,
    SessionProgress,
    SessionReader,
    SessionWriter,
)
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.pull import pull
from asyncdepo.engine.scheduler import push
from asyncdepo.errors import AuthError, PermanentError, TransientError
from asyncdepo.events import CollectSink, ItemDone, Reporter
from tests.fakeclock import FakeClock


class Copier(Adapter):
    """Sessions that copy files into ``dest`` (push) or out of ``src`` (pull), one file after the other.

    ``script`` says what a session does, by its number (1-based): ``("drop", k)`` copies k files then fails
    transiently; ``("auth",)`` refuses; ``("refuse", rel)`` fails that file for good; ``("hold", k)`` copies k
    files then waits for ``release`` (a test cancels there); ``("corrupt", rel)`` writes a damaged copy.
    """

    name = "copier"

    def __init__(self, dest: Path, *, src: Path | None = None, script: Mapping[int, tuple[Any, ...]] | None = None,
                 items: int = 1000, size: int | None = None, concurrency: int | None = None,
                 grouped: bool = True) -> None:
        self.dest, self.src, self.script, self.grouped = dest, src, dict(script or {}), grouped
        self.features = Features(sessions=True, pull=True, pull_sessions=True, session_items=items,
                                 session_bytes=size, max_concurrency=concurrency)
        self.plans: list[list[str]] = []
        self.rates: list[float | None] = []
        self.groups: list[set[str]] = []
        self.running = self.most_running = 0
        self.finished: list[bool] = []
        self.reached = anyio.Event()
        self.release = anyio.Event()

    def describe(self) -> str:
        return f"copier {self.dest}"

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        raise AssertionError("a session adapter is never asked for one item")

    def session_group(self, item: Item) -> str:
        return item.rel.split("/")[0] if "/" in item.rel and self.grouped else ""

    async def finish(self, ok: bool) -> dict[str, Any]:
        self.finished.append(ok)
        return {}

    async def open_session(self, plan: SessionPlan) -> SessionWriter:
        return _Send(self, plan, len(self.plans) + 1)

    async def list_remote(self) -> AsyncIterator[RemoteItem]:  # type: ignore[override]
        assert self.src is not None
        for p in sorted(self.src.rglob("*")):
            if p.is_file():
                md5 = hashlib.md5(p.read_bytes()).hexdigest()
                yield RemoteItem(p.relative_to(self.src).as_posix(), p.stat().st_size, {"md5": md5})

    async def open_fetch_session(self, plan: FetchPlan) -> SessionReader:
        return _Fetch(self, plan, len(self.plans) + 1)

    async def run(self, number: int, pairs: list[tuple[str, Path, Path]], progress: SessionProgress) -> None:
        """Copy ``pairs`` (rel, from, to) as session ``number``, following the script."""
        self.plans.append([rel for rel, _, _ in pairs])
        self.groups.append({rel.split("/")[0] if "/" in rel else "" for rel, _, _ in pairs})
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            step = self.script.get(number, ())
            if step[:1] == ("auth",):
                raise AuthError("the transfer password was refused")
            for i, (rel, source, target) in enumerate(pairs):
                await anyio.lowlevel.checkpoint()
                if step[:1] in (("drop",), ("hold",)) and i == step[1]:
                    if step[0] == "hold":
                        self.reached.set()
                        await self.release.wait()
                    raise TransientError("connection lost")
                if step == ("refuse", rel):
                    progress.failed(rel, PermanentError(f"{rel}: refused"))
                    continue
                data = source.read_bytes()
                if step == ("corrupt", rel):
                    data = b"X" + data[1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                progress.moved(rel, len(data))
                progress.done(rel)
        finally:
            self.running -= 1


class _Send(SessionWriter):
    def __init__(self, a: Copier, plan: SessionPlan, number: int) -> None:
        self.a, self.plan, self.number = a, plan, number
        a.rates.append(plan.rate)

    async def send(self, progress: SessionProgress) -> None:
        pairs = [(i.rel, Path(i.path), self.a.dest / i.rel) for i in self.plan.items]
        await self.a.run(self.number, pairs, progress)


class _Fetch(SessionReader):
    def __init__(self, a: Copier, plan: FetchPlan, number: int) -> None:
        self.a, self.plan, self.number = a, plan, number

    async def fetch(self, progress: SessionProgress) -> None:
        assert self.a.src is not None
        pairs = [(f.item.rel, self.a.src / f.item.rel, f.part) for f in self.plan.fetches]
        await self.a.run(self.number, pairs, progress)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for i in range(12):
        p = root / f"set{i % 3}" / f"f{i:02}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(1000 + 100 * i))
    (root / "top.txt").write_bytes(b"outside every set\n")
    return root


async def rows(journal: Path, job: str) -> dict[str, dict[str, Any]]:
    j = await Journal.open(journal)
    try:
        st = await j.status(job)
        return {state: c["files"] for state, c in st["counts"].items()}  # type: ignore[misc]
    finally:
        await j.close()


async def test_sessions_are_bounded_by_count_bytes_and_group(source: Path, tmp_path: Path, journal: Path) -> None:
    a = Copier(tmp_path / "dst", items=3, size=3500, concurrency=2)
    sink = CollectSink()
    report = await push(source, a, EngineConfig(transfers=4, bwlimit=1000.0), reporter=Reporter([sink]),
                        journal_path=journal, clock=FakeClock())
    assert report.ok and report.files_done == 13
    assert tree(tmp_path / "dst") == tree(source)
    assert all(len(p) <= 3 for p in a.plans) and all(len(g) == 1 for g in a.groups)  # one group per session
    sizes = {rel: len(data) for rel, data in tree(source).items()}
    assert all(len(p) == 1 or sum(sizes[r] for r in p) <= 3500 for p in a.plans)
    assert a.most_running <= 2 and set(a.rates) == {500.0}  # max_concurrency caps --transfers; --bwlimit is shared
    assert sorted(e.rel for e in sink.of(ItemDone)) == sorted(sizes)  # one event per file
    assert await rows(journal, report.job_id) == {"done": 13}
    again = await push(source, a, EngineConfig(transfers=4), journal_path=journal, clock=FakeClock())
    assert again.ok and again.files_skipped == 13 and len(a.plans) == len(set(map(tuple, a.plans)))


async def test_a_failed_session_is_retried_with_only_the_files_still_open(source: Path, tmp_path: Path,
                                                                           journal: Path) -> None:
    a = Copier(tmp_path / "dst", script={1: ("drop", 2)}, items=100, concurrency=1)
    clock = FakeClock()
    report = await push(source / "set0", a, EngineConfig(transfers=1), journal_path=journal, clock=clock)
    assert report.ok and report.retries == 1 and len(clock.slept) == 1
    assert a.plans[1] == a.plans[0][2:]  # the two files the first session completed are not sent again
    assert tree(tmp_path / "dst") == tree(source / "set0")


async def test_a_refused_login_ends_the_job(source: Path, tmp_path: Path, journal: Path) -> None:
    a = Copier(tmp_path / "dst", script={1: ("auth",)}, concurrency=1)
    with pytest.raises(AuthError):
        await push(source, a, EngineConfig(transfers=1), journal_path=journal, clock=FakeClock())
    assert len(a.plans) == 1 and a.finished == [False]
    j = await Journal.open(journal)
    try:
        (job,) = await j.jobs()
        assert job["state"] == "failed"
    finally:
        await j.close()


async def test_one_refused_file_fails_alone(source: Path, tmp_path: Path, journal: Path) -> None:
    a = Copier(tmp_path / "dst", script={1: ("refuse", "f03.bin")}, items=100, concurrency=1)
    report = await push(source / "set0", a, EngineConfig(transfers=1, retries=0), journal_path=journal,
                        clock=FakeClock())
    assert not report.ok and [r for r, _ in report.failures] == ["f03.bin"] and "refused" in report.failures[0][1]
    assert len(a.plans) == 1 and a.finished == [False]  # permanent: no second session
    assert await rows(journal, report.job_id) == {"done": 3, "failed": 1}


async def test_a_cancelled_run_resumes_with_what_is_missing(source: Path, tmp_path: Path, journal: Path) -> None:
    a = Copier(tmp_path / "dst", script={1: ("hold", 3)}, items=100, concurrency=1)
    with pytest.raises(anyio.get_cancelled_exc_class()):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: push(source / "set1", a, EngineConfig(transfers=1), journal_path=journal,
                                       clock=FakeClock()))
            await a.reached.wait()
            tg.cancel_scope.cancel()
            raise anyio.get_cancelled_exc_class()()
    first = a.plans[0]
    b = Copier(tmp_path / "dst", items=100)
    report = await push(source / "set1", b, EngineConfig(transfers=1), journal_path=journal, clock=FakeClock())
    assert report.ok and report.files_skipped == 3 and b.plans == [first[3:]]
    assert tree(tmp_path / "dst") == tree(source / "set1")
    assert await rows(journal, report.job_id) == {"done": 4}


async def test_pull_sessions_check_digests_and_retry_a_corrupt_copy_once(source: Path, tmp_path: Path,
                                                                         journal: Path) -> None:
    out = tmp_path / "out"
    a = Copier(tmp_path / "unused", src=source, script={1: ("corrupt", "set2/f05.bin")}, grouped=False)
    report = await pull(a, out, EngineConfig(transfers=2), journal_path=journal, clock=FakeClock())
    assert report.ok and report.files_done == 13 and report.retries == 1
    assert a.plans[1] == ["set2/f05.bin"] and tree(out) == tree(source)
    assert await rows(journal, report.job_id) == {"done": 13}
    # the archive's own copy is bad: two damaged copies fail the file, the part is gone
    shutil.rmtree(out)
    b = Copier(tmp_path / "unused", src=source, script={1: ("corrupt", "top.txt"), 2: ("corrupt", "top.txt")},
               grouped=False)
    report = await pull(b, out, EngineConfig(transfers=1, retries=0), journal_path=journal, clock=FakeClock())
    assert [r for r, _ in report.failures] == ["top.txt"] and "md5 mismatch" in report.failures[0][1]
    assert not (out / "top.txt").exists() and not (out / "top.txt.asyncdepo-part").exists()
    assert await rows(journal, report.job_id) == {"done": 12, "failed": 1}


async def test_pull_job_is_journaled_and_a_rerun_moves_nothing(source: Path, tmp_path: Path, journal: Path) -> None:
    out = tmp_path / "out"
    report = await pull(Copier(tmp_path / "x", src=source), out, EngineConfig(), journal_path=journal,
                        argv=["pull", "copier", str(out)])
    j = await Journal.open(journal)
    try:
        row = await j.job(report.job_id)
        assert row is not None and row["kind"] == "pull" and row["state"] == "done"
        assert row["target"] == str(out) and row["argv"] == ["pull", "copier", str(out)]
    finally:
        await j.close()
    b = Copier(tmp_path / "x", src=source)
    again = await pull(b, out, EngineConfig(), journal_path=journal)
    assert again.job_id == report.job_id and again.files_skipped == 13 and b.plans == []

