"""One contract suite over every adapter, in the manner of rclone's ``fstest/fstests``: an adapter's test module
gives a :class:`Harness` (the adapter on its server, and views of what the server holds) and subclasses
:class:`AdapterContract`; every case below then runs against it through the engine (``asyncdepo.push`` /
``pull``, in this process), skipping what its ``Features`` say it cannot do::

    class TestContract(AdapterContract):
        @pytest.fixture
        async def harness(self, tmp_path): ...        # yield Harness(...)

What every adapter promises (``asyncdepo.contract``): a pushed tree lands byte for byte, a re-run sends nothing
for unchanged files and re-sends a changed one; a resumable target reopened from a writer's journaled
``state()`` knows what it holds; ``abort`` leaves nothing; a pull gives the tree back; and all of it holds with
a fault on the wire — a connection dropped mid-body, 5xx, 429 with Retry-After, a stalled server — and when
the run is stopped at a byte offset and run again.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Chunk, Features, Item
from asyncdepo.digests import digest_bytes
from asyncdepo.engine.pull import pull
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.scheduler import push
from asyncdepo.errors import ConflictError
from asyncdepo.sim.faults import FaultInjector

MiB = 1 << 20


def tree_of(root: Path, skip: tuple[str, ...] = (".asyncdepo-part",)) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(skip)}


@dataclasses.dataclass
class Harness:
    """An adapter on its server, as the suite sees it.

    :param make: a fresh adapter for an engine config.
    :param stored: what the target holds now, ``rel -> bytes`` (for a pull-only adapter: None).
    :param faults: its server's injector (None: no server, no wire faults).
    :param data: the (method, path) patterns its bytes travel on, for the fault rules.
    :param seed: puts files on the archive for a pull-only adapter (``rel -> bytes``).
    :param chunk: the chunk size its pushes use (S3's parts are 5 MiB at least).
    :param mutable: a push may change what an earlier push stored (not so for gypsum's versions).
    :param pulled_prefix: where a pull puts the archive's files under its folder (ImmPort: the study).
    :param inject: installs fault ``name`` itself (an ascp or Globus fault, no HTTP rule) and returns how to
        count its hits; None (or returning None) for the default rule on ``data``.
    :param stops: the suite can stop a run at a byte offset (something counts the bytes on the way).
    :param pause: holds the server at a byte count (default: the injector's pause point); returns the event
        set when it holds. ``resume`` lets it go.
    """

    make: Callable[[EngineConfig], Adapter]
    stored: Callable[[], dict[str, bytes]] | None = None
    faults: FaultInjector | None = None
    data: tuple[str, str] = ("*", "*")
    seed: Callable[[dict[str, bytes]], None] | None = None
    chunk: int = MiB
    mutable: bool = True
    pulled_prefix: str = ""
    inject: Callable[[str], Callable[[], int] | None] | None = None
    stops: bool = True
    pause: Callable[[int], anyio.Event] | None = None
    resume: Callable[[], None] | None = None

    @property
    def features(self) -> Features:
        return self.make(EngineConfig()).features

    @property
    def pushes(self) -> bool:
        return self.seed is None

    def hold_at(self, n: int) -> anyio.Event:
        if self.pause is not None:
            return self.pause(n)
        assert self.faults is not None
        reached = anyio.Event()
        self.faults.on_pause[:] = [lambda _: reached.set()]
        self.faults.pause_at(n)
        return reached

    def let_go(self) -> None:
        if self.resume is not None:
            self.resume()
        elif self.faults is not None:
            self.faults.pause_at(None)


def source_tree(root: Path, chunk: int) -> dict[str, bytes]:
    """Small files in two folders, an empty file and one of two and a bit chunks."""
    rng = random.Random(11)
    files = {f"d{i % 2}/f{i}.bin": rng.randbytes(100 * i + 1) for i in range(6)}
    files["empty"] = b""
    files["big.raw"] = rng.randbytes(2 * chunk + 777)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


FAULTS = {
    "drop": "{m} {p} drop after=100K first=1",
    "5xx": "{m} {p} status=503 first=2",
    "429": "{m} {p} status=429 retry-after=0.05 first=2",
}


class AdapterContract:
    """The shared cases; a subclass provides the ``harness`` fixture (see the module docstring)."""

    # -- helpers ---------------------------------------------------------------------------------------
    @pytest.fixture
    def files(self, harness: Harness, tmp_path: Path) -> dict[str, bytes]:
        files = source_tree(tmp_path / "src", harness.chunk)
        if harness.seed is not None:
            harness.seed(files)
        return files

    def cfg(self, harness: Harness) -> EngineConfig:
        return EngineConfig(transfers=4, chunk_size=harness.chunk)

    async def move(self, harness: Harness, tmp_path: Path, journal: str = "j") -> RunReport:
        """Push the source (or pull the archive into ``tmp_path/back``)."""
        cfg = self.cfg(harness)
        if harness.pushes:
            return await push(tmp_path / "src", harness.make(cfg), cfg, journal_path=tmp_path / journal)
        return await pull(harness.make(cfg), tmp_path / "back", cfg)

    def landed(self, harness: Harness, tmp_path: Path) -> dict[str, bytes]:
        if harness.pushes:
            assert harness.stored is not None
            return harness.stored()
        return tree_of(tmp_path / "back" / harness.pulled_prefix)

    # -- pushes and pulls ------------------------------------------------------------------------------
    async def test_everything_lands_and_a_rerun_moves_nothing(self, harness: Harness, files: dict[str, bytes],
                                                               tmp_path: Path) -> None:
        first = await self.move(harness, tmp_path)
        assert first.ok, first.failures
        assert self.landed(harness, tmp_path) == files
        if not harness.mutable:  # an immutable upload (a gypsum version) refuses a second push of itself
            with pytest.raises(ConflictError):
                await self.move(harness, tmp_path)
            assert self.landed(harness, tmp_path) == files
            return
        again = await self.move(harness, tmp_path)
        assert again.ok and again.files_done == 0 and again.bytes_sent == 0

    async def test_a_changed_file_is_sent_again(self, harness: Harness, files: dict[str, bytes],
                                                 tmp_path: Path) -> None:
        if not harness.pushes or not harness.mutable:
            pytest.skip("a pull-only adapter, or one whose uploads are immutable")
        assert (await self.move(harness, tmp_path)).ok
        (tmp_path / "src" / "d1" / "f1.bin").write_bytes(b"changed")
        files["d1/f1.bin"] = b"changed"
        third = await self.move(harness, tmp_path)
        assert third.ok
        assert self.landed(harness, tmp_path) == files

    async def test_reopened_from_journaled_state_it_knows_what_it_holds(self, harness: Harness,
                                                                        files: dict[str, bytes],
                                                                        tmp_path: Path) -> None:
        f = harness.features
        if not harness.pushes or not f.resumable or not (f.chunked or f.multipart):
            pytest.skip("the target cannot say what it holds of a file")
        cfg = self.cfg(harness)
        path = tmp_path / "src" / "big.raw"
        data = files["big.raw"]
        item = Item(str(path), "big.raw", len(data), path.stat().st_mtime_ns)
        body = data[: harness.chunk]
        chunk = Chunk(offset=0, data=memoryview(body), last=False, part_number=1 if f.multipart else 0,
                      digests=digest_bytes(body, f.chunk_digests))
        async with harness.make(cfg) as adapter:
            writer = await adapter.open_item(item, None)
            if f.multipart:
                writer.parts[1] = await writer.write_part(chunk)
            else:
                await writer.write(chunk)
            saved = writer.state()
        async with harness.make(cfg) as adapter:
            reopened = await adapter.open_item(item, saved)
            if f.multipart:
                assert set(reopened.parts) == {1}
            else:
                assert reopened.confirmed == harness.chunk
            await reopened.abort()
        assert harness.stored is not None and "big.raw" not in harness.stored()

    async def test_pull_gives_the_tree_back(self, harness: Harness, files: dict[str, bytes],
                                            tmp_path: Path) -> None:
        if not harness.features.pull:
            pytest.skip("the target cannot be pulled from")
        if harness.pushes:
            assert (await self.move(harness, tmp_path)).ok
        report = await pull(harness.make(self.cfg(harness)), tmp_path / "back", self.cfg(harness))
        assert report.ok, report.failures
        assert tree_of(tmp_path / "back" / harness.pulled_prefix) == files

    # -- faults on the wire ----------------------------------------------------------------------------
    @pytest.mark.parametrize("fault", list(FAULTS))
    async def test_a_fault_on_the_wire_loses_nothing(self, harness: Harness, files: dict[str, bytes],
                                                     tmp_path: Path, fault: str) -> None:
        if harness.faults is None:
            pytest.skip("no server between the engine and the target")
        hits = harness.inject(fault) if harness.inject is not None else None
        if hits is None:
            method, path = harness.data
            rule = harness.faults.add(FAULTS[fault].format(m=method, p=path))

            def hits() -> int:
                return rule.hits
        report = await self.move(harness, tmp_path)
        assert report.ok, report.failures
        assert hits(), "the fault never hit: the case tests nothing"
        assert self.landed(harness, tmp_path) == files

    async def test_a_stalled_server_is_waited_out(self, harness: Harness, files: dict[str, bytes],
                                                  tmp_path: Path) -> None:
        if harness.faults is None:
            pytest.skip("no server between the engine and the target")
        faults = harness.faults
        stalled = anyio.Event()
        faults.on_stall[:] = [lambda n: stalled.set()]
        method, path = harness.data
        faults.add(f"{method} {path} stall first=1")
        result: list[RunReport] = []
        async with anyio.create_task_group() as tg:
            async def go() -> None:
                result.append(await self.move(harness, tmp_path))

            tg.start_soon(go)
            with anyio.fail_after(120):  # a guard against a hang, not a wait for tasks
                await stalled.wait()
            faults.release_stalls()
        assert result[0].ok, result[0].failures
        assert self.landed(harness, tmp_path) == files

    async def test_stopped_at_a_byte_offset_then_run_again(self, harness: Harness, files: dict[str, bytes],
                                                            tmp_path: Path) -> None:
        """The run is cancelled (as by Ctrl-C) while the server holds it at a byte offset; the same run again
        completes the target. SIGKILL at byte offsets, through the CLI, is the fault suite's (tests/chaos)."""
        if not harness.stops or (harness.faults is None and harness.pause is None):
            pytest.skip("nothing counts the bytes on the way (for ascp and Globus: tests/chaos, through the CLI)")
        offset = harness.chunk + 4321
        reached = harness.hold_at(offset)
        try:
            async with anyio.create_task_group() as tg:
                async def go() -> None:
                    await self.move(harness, tmp_path)

                tg.start_soon(go)
                with anyio.fail_after(120):
                    await reached.wait()
                tg.cancel_scope.cancel()
                harness.let_go()  # a pull's threads finish the read they are in before the cancel lands
        finally:
            harness.let_go()
        report = await self.move(harness, tmp_path)
        assert report.ok, report.failures
        assert self.landed(harness, tmp_path) == files
