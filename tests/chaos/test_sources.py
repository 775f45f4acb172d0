"""The world changing under a job: two runs of one job at once, a source that grows, shrinks, is rewritten at the
same size (mtime restored) or vanishes between a kill and the resume, and the local target's disk filling up.
Each case ends with ``check``: the target equals the source, or the run exits non-zero naming the file, and
nothing half-done is left unless the journal keeps it for resume."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.outcome import FIGURES, Outcome, Watch, check, params, run, run_killed, start
from tests.chaos.world import LocalTarget, MiB, Target
from tests.tmpfs import small_tmpfs

CHANGES = ("grow", "shrink", "rewrite", "vanish")


def _big(world: Target) -> list[str]:
    """The source's multi-chunk files (the ones a kill leaves half sent)."""
    return sorted(rel for rel, data in world.files.items() if len(data) > 2 * MiB)


def _change(world: Target, how: str) -> list[str]:
    """Change the big files of the source in the way ``how`` says; returns their names."""
    rels = _big(world)
    for rel in rels:
        path = world.source_root() / rel
        st = path.stat()
        if how == "grow":
            with open(path, "ab") as fh:
                fh.write(random.Random(rel).randbytes(MiB + 3))
        elif how == "shrink":
            os.truncate(path, st.st_size // 3)
        elif how == "rewrite":  # same size, other bytes, the mtime put back: size+mtime cannot tell
            path.write_bytes(random.Random(rel + "new").randbytes(st.st_size))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif how == "vanish":
            path.unlink()
    return rels


#: (target, change) -> the item of #14 the case waits for (a strict xfail until it lands on main)
WAITING: dict[tuple[str, str], str] = {}
FAST = {("local", "vanish"), ("tus", "rewrite"), ("local", "grow"), ("local", "rewrite")}


def _params(fast: bool) -> list[object]:
    targets = ("local", "tus", "s3-moto", "gypsum", "pdis", "empiar-ascp")
    return params([(t, how, how) for t in targets for how in CHANGES], fast=fast, fast_cases=FAST, waiting=WAITING)


def _interrupted(world: Target, offset: int) -> Outcome:
    """Ctrl-C (SIGINT) once the transfer is held at ``offset``: the run flushes its journal and exits 130."""
    local = isinstance(world, LocalTarget)
    reached, env = world.hold(offset) if isinstance(world, LocalTarget) else world.arm(offset)
    watch = Watch(start(world, env=env))
    try:
        assert watch.until(reached), "the run ended before the hold point"
        os.kill(watch.proc.pid, signal.SIGINT)
    finally:
        world.release() if isinstance(world, LocalTarget) else world.disarm()
    outcome = watch.end()
    assert outcome.rc == 130 or not local, outcome.text
    return outcome


def _changed_between_runs(world: Target, how: str) -> None:
    offset = sum(len(world.files[r]) for r in world.files if r not in _big(world)) + MiB + 12345
    offset = min(offset, world.kill_range() - 1)
    if how == "rewrite":
        # interrupted (the journal then holds the digests of the chunks it confirmed, whatever the timing),
        # then rewritten: a resume that checks the target against the journal alone builds on the old bytes
        _interrupted(world, offset)
    else:
        assert run_killed(world, offset).killed, "the kill point lies past the end of the run"
    changed = _change(world, how)
    second = run(world)
    if world.name == "gypsum" and how in ("grow", "shrink"):  # killed: its session is kept for resume
        # a gypsum upload session holds the digests of its files: a changed file discards the session, says so
        # and asks for the push again
        check(world, second, ok=False)
        assert "run the push again" in second.text and all(rel in second.text for rel in changed), second.text
        second = run(world)
    if how == "vanish" and world.name != "pdis":  # pdis sends one tar of what exists: nothing is half-sent
        check(world, second, ok=False, after_kill=True)
        assert "vanished" in second.text and all(rel in second.text for rel in changed), second.text
    else:
        check(world, second, ok=True, after_kill=True)
    if how != "rewrite":
        FIGURES["kills_survived"] += 1


@pytest.mark.parametrize(("world", "how"), _params(fast=True), indirect=["world"])
def test_source_changed_between_kill_and_resume(world: Target, how: str) -> None:
    _changed_between_runs(world, how)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "how"), _params(fast=False), indirect=["world"])
def test_every_change_on_every_target(world: Target, how: str) -> None:
    _changed_between_runs(world, how)


@pytest.mark.parametrize("world", ["local"], indirect=True)
def test_rewritten_at_the_same_size_after_a_complete_run_is_found_with_checksum(world: Target) -> None:
    check(world, run(world), ok=True)
    _change(world, "rewrite")
    check(world, run(world, "--checksum"), ok=True)


# -- two runs of one job --------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", ["local", "tus", "s3-moto"], indirect=True)
def test_a_second_run_of_a_running_job_refuses_and_the_first_ends_intact(world: Target) -> None:
    """The first run is held mid-transfer (the local target's writes block at a byte count; a server's run is
    stopped with SIGSTOP once its server counted that byte, and the server let go), the same command runs
    again, then the first one goes on."""
    local = isinstance(world, LocalTarget)
    reached, env = world.hold(MiB + 777) if isinstance(world, LocalTarget) else world.arm(MiB + 777)
    first = Watch(start(world, env=env))
    try:
        assert first.until(reached), "the first run ended before it was held mid-transfer"
        if not local:
            os.killpg(first.proc.pid, signal.SIGSTOP)
            world.disarm()
        second = run(world)
    finally:
        if isinstance(world, LocalTarget):
            world.release()
        else:
            world.disarm()
            os.killpg(first.proc.pid, signal.SIGCONT)
    one = first.end()
    check(world, one, ok=True)
    assert second.rc != 0 and str(first.proc.pid) in second.text, second.text


def test_different_jobs_sharing_a_journal_run_side_by_side(tmp_path: Path) -> None:
    """Two different pushes with one journal, the first held mid-transfer while the second runs whole."""
    one, two = LocalTarget(tmp_path / "one"), LocalTarget(tmp_path / "two")
    for i, t in enumerate((one, two)):
        t.journal = tmp_path / "shared.sqlite"
        t.make_source({"x/big.bin": random.Random(i).randbytes(3 * MiB), "y/small.bin": b"s" * 1000})
    reached, env = one.hold(MiB)
    first = Watch(start(one, env=env))
    try:
        assert first.until(reached)
        check(two, run(two), ok=True)
    finally:
        one.release()
    check(one, first.end(), ok=True)


# -- the local target's disk filling up -----------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (we run as root in CI; elsewhere the test cannot make a small disk and fails, loudly)."""
    with small_tmpfs(tmp_path / "disk", "16m") as mnt:
        yield mnt


def _fill(disk: Path, world: LocalTarget) -> Path:
    world.dst = disk / "dst"
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (12 * MiB))  # leaves ~4 MiB for a source of ~5.5 MB
    return filler


@pytest.mark.parametrize("world", ["local"], indirect=True)
def test_disk_full_then_freed_resumes_and_completes(world: LocalTarget, small_disk: Path) -> None:
    filler = _fill(small_disk, world)
    first = run(world, "--retries", "0", "--request-attempts", "2")
    # one message for the whole run names the full target (how much is missing, what is kept), not each file
    check(world, first, ok=False, also=(str(world.dst),))
    kept = sum(p.stat().st_size for p in world.dst.rglob("*.asyncdepo-part"))
    filler.unlink()
    second = run(world)
    check(world, second, ok=True)
    assert kept > 0, "the first run kept nothing of what it wrote before the disk filled up"


@pytest.mark.parametrize("world", ["local"], indirect=True)
def test_disk_full_fails_fast_and_says_how_much_is_missing(world: LocalTarget, small_disk: Path) -> None:
    _fill(small_disk, world)
    first = run(world, "--json")
    check(world, first, ok=False, also=(str(world.dst),))
    events = [json.loads(line) for line in first.out.splitlines() if line.startswith("{")]
    retries = [e for e in events if e.get("event") == "item_retrying"]
    assert len(retries) <= 2, f"{len(retries)} retries of a full disk"
    assert "space" in first.text and ("missing" in first.text or "more" in first.text), first.text
