"""The engine core's recovery paths through the CLI, each reached by a real fault: a journal path that is no
journal, a job of a pull held by another process, a remote name that would climb out of the pull's folder, a
local copy damaged between two pulls, a source that vanishes (or cannot be stat'ed) between the first pass and
the end-of-run round, and a resume whose cut chunk no longer matches the source (or cannot be read)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from asyncdepo.cli.common import EXIT_LOCKED, EXIT_USAGE
from asyncdepo.engine.joblock import lock_path
from asyncdepo.engine.journal import VANISHED
from asyncdepo.sim import tus as tus_sim
from asyncdepo.sim.faults import FaultInjector
from tests.chaos.outcome import CLI, Outcome, check, run
from tests.chaos.world import (
    EmpiarTarget,
    GypsumTarget,
    ImmportTarget,
    LocalTarget,
    MiB,
    PdisTarget,
    Target,
    TusTarget,
)
from tests.conftest import cli_process, tree_digests, tus_args


def _events(outcome: Outcome, kind: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(line) for line in outcome.out.splitlines() if line.startswith("{"))
            if e.get("event") == kind]


def _unprivileged(target: Target, *extra: str) -> Outcome:
    """The run without root's power to ignore file permissions (the suite runs as root in CI)."""
    if os.geteuid() != 0:
        return run(target, *extra)
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run([*drop, *CLI, *target.argv(), *extra], env=target.env(), cwd=target.tmp,
                          capture_output=True, text=True, errors="replace", timeout=240, check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


# -- the journal ---------------------------------------------------------------------------------------------
def test_a_journal_that_is_no_journal_refuses_the_push_with_exit_2(tmp_path: Path) -> None:
    with LocalTarget(tmp_path) as target:
        target.make_source({"a.bin": b"a" * 1000})
        junk = random.Random(1).randbytes(8192)
        target.journal.write_bytes(junk)
        outcome = run(target)
        assert outcome.rc == EXIT_USAGE, outcome.text
        assert f"journal {target.journal} cannot be used: file is not a database" in outcome.err
        assert "--journal" in outcome.err and "Traceback" not in outcome.err
        assert target.journal.read_bytes() == junk and not target.dst.exists()


def test_status_of_a_job_the_journal_does_not_hold_exits_2(tmp_path: Path) -> None:
    with LocalTarget(tmp_path) as target:
        target.make_source({"a.bin": b"a" * 1000})
        check(target, run(target), ok=True)
        done = cli_process("status", "ffffffffffff", "--journal", str(target.journal))
        assert done.returncode == EXIT_USAGE, done.stderr
        assert "no job 'ffffffffffff'" in done.stderr


# -- pulls ---------------------------------------------------------------------------------------------------
def test_a_pull_whose_job_another_process_holds_exits_6_naming_it(tmp_path: Path) -> None:
    src, out, journal = tmp_path / "src", tmp_path / "out", tmp_path / "j.sqlite"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 5000)
    argv = ("pull", f"file://{src}", str(out), "--journal", str(journal), "-q")
    first = cli_process(*argv)
    assert first.returncode == 0, first.stderr
    db = sqlite3.connect(journal)
    try:
        ((jid,),) = db.execute("SELECT id FROM jobs WHERE kind='pull'").fetchall()
    finally:
        db.close()
    (out / "a.bin").unlink()
    hold = ("import fcntl, json, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'elsewhere'}).encode())\n"
            "print('held', flush=True)\n"
            "sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock_path(journal, jid))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = cli_process(*argv)
        assert refused.returncode == EXIT_LOCKED, refused.stderr
        assert f"job {jid} is already running: pid {holder.pid} on elsewhere" in refused.stderr
        assert not (out / "a.bin").exists()  # nothing was fetched by the refused run
    finally:
        holder.kill()
        holder.wait(timeout=30)
    again = cli_process(*argv)  # the holder is gone (killed): the job is free
    assert again.returncode == 0, again.stderr
    assert tree_digests(out) == tree_digests(src)


def test_a_remote_name_that_would_climb_out_of_the_folder_fails_alone(tmp_path: Path) -> None:
    """A file named ``..\\evil`` (a backslash is a plain character on Linux, a separator elsewhere): refused,
    named, nothing written outside the pull's folder; the other files land."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "d").mkdir(parents=True)
    (src / "d" / "..\\evil").write_bytes(b"e" * 100)
    (src / "ok.bin").write_bytes(b"o" * 3000)
    done = cli_process("pull", f"file://{src}", str(out), "--journal", str(tmp_path / "j.sqlite"))
    assert done.returncode == 1, done.stderr
    assert "would land outside" in done.stderr and "evil" in done.stderr, done.stderr
    assert (out / "ok.bin").read_bytes() == b"o" * 3000
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*evil*")) == ["src/d/..\\evil"]


def test_a_pulled_file_damaged_before_the_next_pull_is_fetched_again(tmp_path: Path) -> None:
    """The second pull finds every file of the right size, but one differs from the archive's digest: that one
    (only) is fetched again."""
    with ImmportTarget(tmp_path) as target:
        target.make_source({"d/one.bin": random.Random(7).randbytes(300_001),
                            "d/two.bin": random.Random(8).randbytes(200_003)})
        check(target, run(target, "--json"), ok=True)
        damaged = target.out / "SDY1/ResultFiles/d/one.bin"
        data = bytearray(damaged.read_bytes())
        data[1000] ^= 1
        damaged.write_bytes(bytes(data))
        target.faults.reset_counters()
        outcome = run(target, "--json")
        check(target, outcome, ok=True)
        fetched = [route for route, n in target.faults.requests.items() if route.startswith("GET /_s3/") and n]
        assert fetched and sum(target.faults.requests[r] for r in fetched) == 1, dict(target.faults.requests)
        assert damaged.read_bytes() == target.files["SDY1/ResultFiles/d/one.bin"]


# -- the end-of-run round --------------------------------------------------------------------------------------
def _refused_three_times(target: TusTarget, change: Any) -> None:
    """Refuse the first three creations (the item's attempts in the first pass) and ``change()`` the source
    as the third refusal is answered: between the first pass and the end-of-run round."""
    target.faults.add("POST /files/ status=503 first=3")
    changed = threading.Event()

    def on_request(route: str, count: int) -> None:
        if route.startswith("POST") and count == 3 and not changed.is_set():
            change()
            changed.set()

    target.faults.on_request.append(on_request)


def test_a_file_deleted_before_the_end_of_run_round_fails_as_vanished(tmp_path: Path) -> None:
    with TusTarget(tmp_path) as target:
        target.make_source({"one/gone.bin": random.Random(1).randbytes(3000)})
        _refused_three_times(target, (target.src / "one/gone.bin").unlink)
        outcome = run(target, "--json", "--request-attempts", "1", "--retries", "1")
        assert outcome.rc == 1, outcome.text
        (failed,) = _events(outcome, "item_failed")[-1:]
        assert failed["rel"] == "one/gone.bin" and VANISHED in failed["error"], failed
        db = sqlite3.connect(target.journal)
        try:
            assert db.execute("SELECT state, error, transient FROM items").fetchall() == [
                ("failed", VANISHED, 0)]
        finally:
            db.close()
        assert not target.stored()


def test_a_file_that_cannot_be_stated_in_the_end_of_run_round_fails_naming_it(tmp_path: Path) -> None:
    with TusTarget(tmp_path) as target:
        target.make_source({"locked/a.bin": random.Random(1).randbytes(3000)})
        folder = target.src / "locked"
        _refused_three_times(target, lambda: folder.chmod(0o000))
        try:
            outcome = _unprivileged(target, "--json", "--request-attempts", "1", "--retries", "1")
        finally:
            folder.chmod(0o755)
        assert outcome.rc == 1, outcome.text
        assert "locked/a.bin" in outcome.text and "cannot stat: Permission denied" in outcome.text, outcome.text
        assert not target.stored()


# -- a resume that finds the target's copy cut inside a chunk --------------------------------------------------
class PlainTus(TusTarget):
    """A tus server without the checksum extension: a PATCH cut short keeps the bytes that arrived."""

    def _factory(self) -> Any:
        return tus_sim.build_app(self.tmp / "tus", FaultInjector(),
                                 tus_args(extensions="creation,creation-with-upload,termination"))


class PlainDeferTus(TusTarget):
    """As :class:`PlainTus`, taking uploads of a length told at the end (a compressed stream's)."""

    def _factory(self) -> Any:
        return tus_sim.build_app(self.tmp / "tus", FaultInjector(), tus_args(
            extensions="creation,creation-with-upload,creation-defer-length,termination"))


def _cut_inside_the_second_chunk(target: PlainTus) -> Path:
    """One 3 MiB file whose upload ends 500 KB into its second chunk (the run fails); returns its path."""
    target.make_source({"big.bin": random.Random(3).randbytes(3 * MiB)})
    target.faults.add("PATCH * drop after=500K skip=1 first=0")
    outcome = run(target, "--request-attempts", "1", "--retries", "0")
    assert outcome.rc == 1, outcome.text
    target.faults.clear()
    return target.src / "big.bin"


def test_a_source_changed_inside_the_cut_chunk_is_sent_again_from_zero(tmp_path: Path) -> None:
    with PlainTus(tmp_path) as target:
        path = _cut_inside_the_second_chunk(target)
        st = path.stat()
        with open(path, "r+b") as f:  # rewritten in place, same size, mtime put back: the walk sees no change
            f.seek(MiB + 100_000)
            f.write(b"\xff" * 1000)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        outcome = run(target, "--json")
        check(target, outcome, ok=True)
        assert target.stored()["big.bin"] == path.read_bytes()
        # the bytes the first run's cut chunks left on the target kept their digests: the change is found there
        (retry,) = _events(outcome, "item_retrying")
        assert retry["reason"] == "source-changed" and f"bytes {MiB}-{MiB + 500 * 1024} differ" in retry["error"]
        (report,) = _events(outcome, "job_finished")
        assert report["report"]["bytes_sent"] == 3 * MiB  # sent again whole, once


def test_a_source_unreadable_at_the_resume_fails_naming_it_and_keeps_the_upload(tmp_path: Path) -> None:
    with PlainTus(tmp_path) as target:
        path = _cut_inside_the_second_chunk(target)
        path.chmod(0o000)
        try:
            outcome = _unprivileged(target, "--json", "--retries", "0")
        finally:
            path.chmod(0o644)
        check(target, outcome, ok=False)
        assert "big.bin: cannot read: Permission denied" in outcome.text, outcome.text
        assert target.leftovers() == {"big.bin"} <= target.journaled()
        check(target, run(target), ok=True)  # readable again: the same command finishes it


# -- the job's start and end ---------------------------------------------------------------------------------
def test_a_finish_the_archive_refuses_for_good_fails_the_job(tmp_path: Path) -> None:
    """gypsum's complete answered 400 (not retried): the files were sent, the version is not published, the
    run fails naming the job's step."""
    with GypsumTarget(tmp_path) as target:
        target.make_source({"a/one.bin": b"1" * 1000})
        target.faults.add("POST /upload/complete/* status=400 first=0")
        outcome = run(target, "--json")
        assert outcome.rc == 1, outcome.text
        (report,) = _events(outcome, "job_finished")
        (failure,) = report["report"]["failures"]
        assert failure["rel"] == "(job)" and "400" in failure["error"], report
        assert target.faults.requests["POST /upload/complete/{project}/{asset}/{version}"] == 1


def test_a_name_a_session_target_cannot_store_fails_alone(tmp_path: Path) -> None:
    """EMPIAR (sessions of the stand-in ascp) stores UTF-8 names only: the file named otherwise fails, named;
    the others land."""
    with EmpiarTarget(tmp_path) as target:
        target.make_source({"a/m1.tif": b"m" * 5000, "b/p1.tif": b"n" * 7000})
        bad = os.fsencode(target.src / "micrographs") + b"/bad\xff.tif"
        with open(bad, "wb") as f:
            f.write(b"x" * 3000)
        outcome = run(target, "--json")
        assert outcome.rc == 1, outcome.text
        (failed,) = _events(outcome, "item_failed")
        assert "not valid UTF-8" in failed["error"], failed
        stored = target.stored()
        assert {k: v for k, v in stored.items() if "bad" not in k} == {
            k: v for k, v in target.expected().items() if "bad" not in k}
        assert not any("bad" in k for k in stored)


def test_a_source_changed_since_its_cut_upload_is_sent_anew_when_the_old_upload_cannot_be_removed(
        tmp_path: Path) -> None:
    """The file grew since the run that left its upload cut: it is sent again from zero; the server refuses to
    terminate the old upload (403), which is a warning, not a failure."""
    with PlainTus(tmp_path) as target:
        path = _cut_inside_the_second_chunk(target)
        with open(path, "ab") as f:
            f.write(b"more")
        target.faults.add("DELETE * status=403 first=0")
        outcome = run(target, "--json")
        assert outcome.rc == 0, outcome.text
        assert "big.bin: could not remove what an earlier run left of it on the target" in outcome.text
        assert target.faults.requests["DELETE /files/{upload_id}"] == 1
        assert target.stored()["big.bin"] == path.read_bytes()
        assert target.leftovers() == {"big.bin"}  # the old upload stays (the warning said so)


def test_an_unfinished_file_left_out_of_a_run_is_kept_for_the_next(tmp_path: Path) -> None:
    """A run that excludes a file whose upload is cut does not take it for vanished: its row and the upload
    stay, and the next run without the filter finishes it from where the target is."""
    with PlainTus(tmp_path) as target:
        _cut_inside_the_second_chunk(target)
        (target.src / "small.txt").write_bytes(b"s" * 100)
        target.files["small.txt"] = b"s" * 100
        outcome = run(target, "--json", "--exclude", "big.bin")
        assert outcome.rc == 0, outcome.text
        assert target.stored() == {"small.txt": b"s" * 100}
        assert target.leftovers() == target.journaled() == {"big.bin"}
        db = sqlite3.connect(target.journal)
        try:
            assert db.execute("SELECT state, transient FROM items WHERE rel='big.bin'").fetchall() == [("failed", 1)]
        finally:
            db.close()
        outcome = run(target, "--json")
        check(target, outcome, ok=True)
        (report,) = _events(outcome, "job_finished")
        assert report["report"]["bytes_sent"] < 3 * MiB - MiB  # the rest only: the held part was kept


# -- a packed target (the whole tree as one tar) ---------------------------------------------------------------
def test_a_folder_that_cannot_be_read_fails_the_pack_naming_it(tmp_path: Path) -> None:
    with PdisTarget(tmp_path) as target:
        target.make_source({"a/one.bin": b"1" * 3000, "b/two.bin": b"2" * 2000})
        folder = target.src / "b"
        folder.chmod(0o000)
        try:
            outcome = _unprivileged(target, "--json")
        finally:
            folder.chmod(0o755)
        assert outcome.rc == 1, outcome.text
        (failed,) = _events(outcome, "item_failed")
        assert failed["rel"] == f"{target.src.name}.tar.zst" and "b: cannot list directory" in failed["error"], failed
        assert "the archive would miss it" in failed["error"]
        assert not target.stored() and not target.leftovers()


def test_an_upload_refused_as_a_duplicate_the_account_does_not_hold_fails_without_asking_again(
        tmp_path: Path) -> None:
    """PDIS answers the upload with 409 (it holds that archive) but none of this account's submissions has its
    md5: a conflict the run reports, not one it retries."""
    with PdisTarget(tmp_path) as target:
        target.make_source({"a/one.bin": b"1" * 3000})
        target.faults.add("POST /api/v1/upload/ status=409 first=0")
        outcome = run(target, "--json")
        assert outcome.rc != 0, outcome.text
        assert "PDIS already holds an archive with md5" in outcome.text, outcome.text
        assert target.faults.requests["POST /api/v1/upload/"] == 1
        assert not target.stored()


def test_a_compressed_stream_cut_inside_a_chunk_is_resumed_and_arrives_whole(tmp_path: Path) -> None:
    """With --compress the stream is made again on the resume: the chunks the target holds are compared with
    the journal's digests as they pass, the one held in part (no digest: it was cut) is checked by size and
    mtime, and the rest is sent."""
    import zstandard

    with PlainDeferTus(tmp_path) as target:
        target.make_source({"big.bin": random.Random(3).randbytes(3 * MiB)})
        target.faults.add("PATCH * drop after=500K skip=1 first=1")
        outcome = run(target, "--json", "--compress", "zstd", "--request-attempts", "1")
        assert outcome.rc == 0, outcome.text
        first, again = _events(outcome, "item_started")
        assert (first["offset"], again["offset"]) == (0, MiB + 500 * 1024)  # resumed where the cut left it
        stored = target.stored()["big.bin.zst"]
        assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == target.files["big.bin"]


def test_a_file_deleted_while_its_cut_upload_is_looked_up_fails_as_vanished(tmp_path: Path) -> None:
    """The file is removed as the resume asks the server where its upload stands (HEAD): the check of the cut
    chunk finds no file, the item fails as vanished, and its upload on the server is terminated."""
    with PlainTus(tmp_path) as target:
        path = _cut_inside_the_second_chunk(target)

        def on_request(route: str, count: int) -> None:
            if route.startswith("HEAD") and path.exists():
                path.unlink()

        target.faults.on_request.append(on_request)
        outcome = run(target, "--json")
        assert outcome.rc == 1, outcome.text
        (failed,) = _events(outcome, "item_failed")
        assert failed["rel"] == "big.bin" and VANISHED in failed["error"], failed
        assert not target.stored() and not target.leftovers()


def test_a_compressed_resume_with_another_chunk_size_arrives_whole(tmp_path: Path) -> None:
    """The resume cuts the stream into smaller chunks than the cut run did: the held chunks the journal has no
    digest of (all of them) are taken by size and mtime, and the stream arrives whole."""
    import zstandard

    with PlainDeferTus(tmp_path) as target:
        target.make_source({"big.bin": random.Random(4).randbytes(4 * MiB)})
        target.faults.add("PATCH * drop after=500K skip=2 first=0")
        cut = run(target, "--compress", "zstd", "--request-attempts", "1", "--retries", "0")
        assert cut.rc == 1, cut.text
        target.faults.clear()
        outcome = run(target, "--json", "--compress", "zstd", "--chunk-size", "512K")
        assert outcome.rc == 0, outcome.text
        (started,) = _events(outcome, "item_started")
        assert started["offset"] > 2 * MiB  # what the cut run left is built on, not sent again
        stored = target.stored()["big.bin.zst"]
        assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == target.files["big.bin"]
