"""Every recovery path of the engine, run through the CLI by a fault on the wire (a simulator's rule, the fault
proxy, a server's state changed between two requests), never by a Python stand-in in the client.

The tests assert behaviour, not internals, so they hold across rewrites of the retry code: the bytes on the
target (``check``), the exit status, the retry events of ``--json`` (their ``reason``), the journal's rows and
the servers' byte counters.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from asyncdepo.sim import tus as tus_sim
from asyncdepo.sim.faults import FaultInjector
from tests.chaos.outcome import Outcome, Watch, check, run, start
from tests.chaos.world import (
    ImmportTarget,
    LocalTarget,
    MiB,
    S3Target,
    Target,
    TusTarget,
    write_tree,
)
from tests.conftest import tus_args
from tests.tmpfs import small_tmpfs

ONE = {"one/big.bin": random.Random(1).randbytes(3 * MiB + 4567)}


def events(outcome: Outcome, kind: str) -> list[dict[str, Any]]:
    return [e for e in (json.loads(line) for line in outcome.out.splitlines() if line.startswith("{"))
            if e.get("event") == kind]


def reasons(outcome: Outcome) -> list[str]:
    return [e["reason"] for e in events(outcome, "item_retrying")]


def uploaded(faults: FaultInjector) -> int:
    """Body bytes a tus server received for uploads (creation-with-upload POSTs and PATCHes)."""
    return faults.total_bytes("PATCH") + faults.total_bytes("POST")


class PlainTus(TusTarget):
    """A tus server without the checksum extension: a broken PATCH keeps the bytes that arrived."""

    def _factory(self) -> Any:
        return tus_sim.build_app(self.tmp / "tus", FaultInjector(),
                                 tus_args(extensions="creation,creation-with-upload,termination"))


@pytest.fixture
def tus(tmp_path: Path) -> Any:
    with TusTarget(tmp_path) as target:
        target.make_source(ONE)
        yield target


@pytest.fixture
def plain_tus(tmp_path: Path) -> Any:
    with PlainTus(tmp_path) as target:
        target.make_source(ONE)
        yield target


# -- the chunk and item levels (engine/transfer.py) -------------------------------------------------------------
def test_a_dropped_chunk_is_resent_from_the_servers_offset(plain_tus: TusTarget) -> None:
    plain_tus.faults.add("PATCH * drop after=300K first=1")
    outcome = run(plain_tus, "--json")
    check(plain_tus, outcome, ok=True)
    assert "network" in reasons(outcome)
    # the server kept the 300K that arrived: the resend started there, so no byte crossed the wire twice
    assert uploaded(plain_tus.faults) == len(ONE["one/big.bin"])


def test_a_lost_answer_whose_chunk_had_landed_is_not_sent_again(plain_tus: TusTarget) -> None:
    plain_tus.faults.add("PATCH * lose first=1")
    outcome = run(plain_tus, "--json")
    check(plain_tus, outcome, ok=True)
    assert reasons(outcome) == ["network"]
    assert uploaded(plain_tus.faults) == len(ONE["one/big.bin"])


def test_a_checksummed_chunk_cut_mid_body_is_resent_whole(tus: TusTarget) -> None:
    tus.faults.add("PATCH * drop after=300K first=1")
    outcome = run(tus, "--json", "--chunk-size", "1M")
    check(tus, outcome, ok=True)
    # with Upload-Checksum the server threw the cut chunk away: exactly the 300K that arrived went twice
    assert uploaded(tus.faults) == len(ONE["one/big.bin"]) + 300 * 1024


def test_an_offset_conflict_409_resyncs_and_goes_on(tus: TusTarget) -> None:
    tus.faults.add("PATCH * status=409 first=1")
    outcome = run(tus, "--json")
    check(tus, outcome, ok=True)
    assert reasons(outcome) and set(reasons(outcome)) <= {"offset", "409"}, reasons(outcome)


def test_a_server_that_went_back_makes_the_item_start_again(plain_tus: TusTarget) -> None:
    """After a dropped PATCH the server's upload is truncated to nothing (a server restored from an old
    state): the resync finds less than the chunk's start, and the item is sent again from the server's offset."""
    faults = plain_tus.faults
    faults.add("PATCH * drop after=200K skip=1 first=1")
    assert plain_tus.sim.server is not None
    state = plain_tus.sim.server.app[tus_sim.STATE_KEY]

    def rewind(route: str, count: int) -> None:
        if route.startswith("HEAD ") and faults.rules[0].hits:
            for up in state.uploads.values():
                if up.offset:
                    up.offset = 0
                    os.truncate(state.data_path(up.id), 0)
            faults.on_request.clear()

    faults.on_request.append(rewind)
    outcome = run(plain_tus, "--json")
    check(plain_tus, outcome, ok=True)
    assert "offset" in reasons(outcome), reasons(outcome)


def test_the_item_level_reopens_the_upload_the_journal_holds(tus: TusTarget) -> None:
    """The request level gives up on the third chunk (2 attempts, 2 refusals); the item level reads the upload's
    location back from the journal and continues it: one upload, nothing sent twice."""
    tus.faults.add("PATCH * status=503 skip=2 first=2")  # the upload is created empty: PATCHes carry every chunk
    outcome = run(tus, "--json", "--request-attempts", "2", "--chunk-size", "1M")
    check(tus, outcome, ok=True)
    assert reasons(outcome).count("5xx") == 2
    assert tus.faults.requests["POST /files/"] == 1  # the same upload, found again ...
    assert [e["offset"] for e in events(outcome, "item_started")] == [0, 2 * MiB]  # ... and continued
    # on the wire: the file once, plus the two refused bodies of the third chunk (a refusal reads its body)
    assert uploaded(tus.faults) == len(ONE["one/big.bin"]) + 2 * MiB


def test_giving_up_after_the_last_attempt_fails_the_file_and_journals_it(tus: TusTarget) -> None:
    tus.faults.add("PATCH * status=503 first=0")
    outcome = run(tus, "--json", "--request-attempts", "2", "--retries", "0")
    check(tus, outcome, ok=False)
    (failed,) = events(outcome, "item_failed")
    assert failed["rel"] == "one/big.bin" and failed["transient"]
    db = sqlite3.connect(tus.journal)
    assert db.execute("SELECT state, transient FROM items WHERE rel='one/big.bin'").fetchall() == [("failed", 1)]


def test_the_end_of_run_round_sends_what_failed_transiently(tus: TusTarget) -> None:
    """Three refusals exhaust the item's attempts in the first pass (one request attempt each); the end-of-run
    round sends it."""
    tus.faults.add("POST /files/ status=503 first=3")
    outcome = run(tus, "--json", "--request-attempts", "1", "--retries", "1")
    check(tus, outcome, ok=True)
    said = [e["text"] for e in events(outcome, "message")]
    assert any("retrying 1 item(s) that failed transiently" in t for t in said), said


# -- sources that change during a run -----------------------------------------------------------------------
def _held(target: Target, offset: int, change: Any, *extra: str) -> Outcome:
    """Run, hold the server at ``offset`` bytes, ``change()`` the source, let go; the run's outcome."""
    reached, env = target.arm(offset)
    watch = Watch(start(target, "--json", *extra, env=env))
    try:
        assert watch.until(reached), "the run ended before the hold point"
        change()
    finally:
        target.disarm()
    return watch.end()


def _changed_after_hashing(tmp_path: Path) -> Outcome:
    """gypsum needs every digest before the first byte: a file rewritten (same size) after that, while the
    upload of another file is held."""
    from tests.chaos.world import GypsumTarget

    with GypsumTarget(tmp_path) as target:
        target.make_source({"a/first.bin": random.Random(2).randbytes(2 * MiB),
                            "b/second.bin": random.Random(3).randbytes(MiB)})
        path = target.src / "b/second.bin"
        outcome = _held(target, 100_000, lambda: path.write_bytes(random.Random(4).randbytes(MiB)),
                        "--transfers", "1", "--retries", "0")
        check(target, outcome)
        assert "changed" in outcome.text and "b/second.bin" in outcome.text, outcome.text
        return outcome


def test_a_file_changed_after_it_was_hashed_is_caught(tmp_path: Path) -> None:
    assert "source-changed" in reasons(_changed_after_hashing(tmp_path))


def test_a_file_changed_after_it_was_hashed_fails_fast_when_the_archive_holds_the_old_digest(tmp_path: Path) -> None:
    assert len(reasons(_changed_after_hashing(tmp_path))) <= 3


def test_a_file_that_vanishes_during_the_run_fails_naming_it(tmp_path: Path) -> None:
    with TusTarget(tmp_path) as target:
        target.make_source({"a/first.bin": random.Random(2).randbytes(2 * MiB),
                            "b/second.bin": random.Random(3).randbytes(MiB)})
        outcome = _held(target, 100_000, (target.src / "b/second.bin").unlink, "--transfers", "1")
        check(target, outcome, ok=False)
        assert "b/second.bin" in outcome.text


def test_a_file_that_shrinks_while_it_is_read_is_sent_as_it_is_now(tmp_path: Path) -> None:
    with TusTarget(tmp_path) as target:
        target.make_source({"big.bin": random.Random(5).randbytes(6 * MiB)})
        outcome = _held(target, 2 * MiB + 10, lambda: os.truncate(target.src / "big.bin", 3 * MiB))
        check(target, outcome, ok=True)
        assert "source-changed" in reasons(outcome) or "changed" in outcome.text


# -- S3 through the proxy ------------------------------------------------------------------------------------
@pytest.fixture
def s3_one(tmp_path: Path, s3: dict[str, Any]) -> Any:
    with S3Target(tmp_path, s3["moto"]) as target:
        target.make_source({"big.bin": random.Random(6).randbytes(16 * MiB + 3)})
        yield target


def test_s3_a_lost_answer_to_a_part_is_sent_again(s3_one: S3Target) -> None:
    s3_one.faults.add("PUT * lose first=1")
    check(s3_one, run(s3_one, "--json"), ok=True)
    assert sum(n for route, n in s3_one.faults.requests.items() if route.startswith("PUT ")) == 5  # 4 parts, 1 again


def test_s3_a_lost_answer_to_complete_is_found_done(s3_one: S3Target) -> None:
    s3_one.faults.add("POST * lose skip=1 first=1")  # Create passes; Complete does its work, its answer is lost
    outcome = run(s3_one, "--json")
    check(s3_one, outcome, ok=True)
    assert "network" in reasons(outcome)


def test_s3_a_lost_answer_to_create_leaves_no_upload_behind(s3_one: S3Target) -> None:
    s3_one.faults.add("POST * lose first=1")
    check(s3_one, run(s3_one, "--json"), ok=True)


def test_s3_complete_meets_no_such_upload(s3_one: S3Target) -> None:
    """The multipart upload is aborted on the server just before Complete arrives (a lifecycle rule)."""
    client = s3_one.server.client()
    faults = s3_one.faults

    def abort_first(route: str, count: int) -> None:
        if route.startswith("POST ") and count == 1:
            for up in client.list_multipart_uploads(Bucket=s3_one.bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=s3_one.bucket, Key=up["Key"], UploadId=up["UploadId"])

    faults.on_request.append(abort_first)
    outcome = run(s3_one, "--json")
    check(s3_one, outcome)


def test_s3_a_changed_part_size_restarts_the_upload(s3_one: S3Target) -> None:
    from tests.chaos.outcome import run_killed

    first = run_killed(s3_one, 11 * MiB)
    assert first.killed
    outcome = run(s3_one, "--json", "--chunk-size", "6M")
    check(s3_one, outcome, ok=True, after_kill=True)


def test_s3_a_full_buffer_pool_waits_while_parts_are_held(s3_one: S3Target) -> None:
    stalled = threading.Event()
    s3_one.faults.on_stall[:] = [lambda n: stalled.set() if n >= 2 else None]
    s3_one.faults.add("PUT * stall first=2")
    watch = Watch(start(s3_one, "--transfers", "2", "--read-ahead", "0"))
    assert watch.until(stalled)
    s3_one.call(s3_one.faults.release_stalls)
    check(s3_one, watch.end(), ok=True)


# -- gypsum's complete and abort ----------------------------------------------------------------------------
def test_gypsum_complete_and_abort_are_retried(tmp_path: Path) -> None:
    from tests.chaos.world import GypsumTarget

    with GypsumTarget(tmp_path) as target:
        target.make_source({"a/one.bin": b"1" * 1000, "b/two.bin": b"2" * 2000})
        target.faults.add("POST /upload/complete/* status=503 first=2")
        outcome = run(target, "--json")
        check(target, outcome, ok=True)
        assert target.faults.requests["POST /upload/complete/{project}/{asset}/{version}"] == 3
    with GypsumTarget(tmp_path / "again") as target:
        target.make_source({"a/one.bin": b"1" * 1000})
        target.faults.add("PUT /s3/* status=403 first=0")  # refused for good: the upload is aborted ...
        target.faults.add("POST /upload/abort/* status=503 first=1")  # ... after one refusal of the abort
        outcome = run(target, "--json")
        check(target, outcome, ok=False)
        assert target.faults.requests["POST /upload/abort/{project}/{asset}/{version}"] == 2
        assert not target.leftovers()  # the lock went with the abort


# -- pulls ---------------------------------------------------------------------------------------------------
@pytest.fixture
def pull(tmp_path: Path) -> Any:
    with ImmportTarget(tmp_path) as target:
        target.make_source({"d/one.bin": random.Random(7).randbytes(2 * MiB + 1),
                            "d/two.bin": random.Random(8).randbytes(300_001)})
        yield target


def test_pull_a_body_cut_short_resumes_with_range(pull: ImmportTarget) -> None:
    pull.faults.add("GET /_s3/immport-shared/*one.bin drop after=500K first=1")
    outcome = run(pull, "--json")
    check(pull, outcome, ok=True)
    assert reasons(outcome) and pull.host.events["responses_cut"] == 1
    # the cut body's bytes were kept in the part file: the next GET asked only for the rest. The cut resets
    # the connection, and a reset drops what the client's socket had received but not yet read, so the
    # rest may start a little before the 500K mark; sent again from zero, the cut's 500K would all be repeated
    total = sum(len(v) for v in pull.files.values())
    assert total <= sum(pull.host.bytes_out.values()) < total + 500_000


def test_pull_a_server_ignoring_range_does_not_corrupt(pull: ImmportTarget) -> None:
    pull.faults.add("GET /_s3/immport-shared/* drop after=500K first=1")
    pull.faults.add("GET /_s3/immport-shared/* norange first=0")
    check(pull, run(pull, "--json"), ok=True)


def test_pull_a_corrupted_body_is_fetched_again(pull: ImmportTarget) -> None:
    pull.faults.add("GET /_s3/immport-shared/* corrupt after=1000 first=1")
    outcome = run(pull, "--json")
    check(pull, outcome, ok=True)
    assert "integrity" in reasons(outcome), reasons(outcome)


def test_pull_an_oversized_part_file_is_dropped(pull: ImmportTarget) -> None:
    write_tree(pull.out, {"SDY1/ResultFiles/d/two.bin.asyncdepo-part": b"x" * 400_000})
    check(pull, run(pull, "--json"), ok=True)


def test_pull_a_failed_url_lookup_is_asked_again(pull: ImmportTarget) -> None:
    pull.faults.add("GET /data/query/drs/download/* status=503 first=3")
    check(pull, run(pull, "--json"), ok=True)


# -- the local target ----------------------------------------------------------------------------------------
def test_local_write_errors_fail_the_files_and_send_the_rest(tmp_path: Path) -> None:
    """A folder of the target that may not be written (permissions; the child runs without root's override):
    its files fail, named; the others land."""
    with LocalTarget(tmp_path) as target:
        target.make_source({"ro/a.bin": b"a" * 5000, "ok/b.bin": b"b" * 5000})
        (target.dst / "ro").mkdir(parents=True)
        (target.dst / "ro").chmod(0o555)
        outcome = run_unprivileged(target, "--json", "--retries", "0")
        check(target, outcome, ok=False)
        assert (target.dst / "ok/b.bin").read_bytes() == b"b" * 5000


def run_unprivileged(target: Target, *extra: str) -> Outcome:
    """The run without root's power to ignore file permissions (the suite runs as root in CI)."""
    if os.geteuid() != 0:
        return run(target, *extra)
    from tests.chaos import outcome as oc

    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run([*drop, *oc.CLI, *target.argv(), *extra], env=target.env(), cwd=target.tmp,
                          capture_output=True, text=True, errors="replace", timeout=oc.TIMEOUT, check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


def test_the_journal_on_a_full_disk_fails_the_run_clearly(tmp_path: Path) -> None:
    """The journal's commit fails (its disk is full): the transaction is rolled back, the run stops with a
    message naming the journal, and the target holds no file that differs."""
    with small_tmpfs(tmp_path / "jdisk", "1m") as disk, LocalTarget(tmp_path) as target:
        target.make_source({f"d/{i:04d}.bin": bytes([i % 256]) * 2000 for i in range(3000)})
        target.journal = disk / "journal.sqlite"
        outcome = run(target, "--json")
        check(target, outcome, ok=False, also=(str(target.journal),))
        assert "journal" in outcome.text, outcome.text
