"""The engine end to end over loopback against the tus simulator: faults, resume after SIGKILL, bounds
under a stalled server, bad input, secrets."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import orjson
import pytest

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.tus import TusAdapter
from asyncdepo.cli import main as cli_main
from asyncdepo.events import CollectSink, ItemStarted, Reporter
from tests.conftest import tree_digests, upload_bytes

CHUNK = 1 << 20


def _url(server: object) -> str:
    return f"tus+{server.url}/files/"  # type: ignore[attr-defined]


async def test_push_with_faults_stores_every_file_intact(tus_server, dataset: Path, journal: Path) -> None:
    faults = tus_server.faults
    faults.add("PATCH * drop after=300K first=3")
    faults.add("POST * status=503 first=2")
    faults.add("PATCH * status=429 retry-after=0.05 skip=5 first=2")
    faults.add("HEAD * status=500 first=1")
    report = await push(dataset, TusAdapter(_url(tus_server)),
                        EngineConfig(chunk_size=CHUNK, hash=("md5", "sha256")), journal_path=journal)
    assert report.ok, report.failures
    assert all(r.hits for r in faults.rules), [r.to_json() for r in faults.rules]
    assert report.retries >= 4  # the 503s and 429s at least (a drop only bites a body over 300K)
    assert tree_digests(tus_server.store / "complete") == tree_digests(dataset)


async def test_rerun_skips_done_files_and_resends_changed_ones(tus_server, dataset: Path, journal: Path) -> None:
    cfg = EngineConfig(chunk_size=CHUNK)
    first = await push(dataset, TusAdapter(_url(tus_server)), cfg, journal_path=journal)
    assert first.ok and first.files_done == 44
    changed = dataset / "d1" / "small_001.bin"
    changed.write_bytes(b"new content")
    tus_server.faults.reset_counters()
    second = await push(dataset, TusAdapter(_url(tus_server)), cfg, journal_path=journal)
    assert second.ok and second.files_done == 1 and second.files_skipped == 43
    assert upload_bytes(tus_server.faults) == len(b"new content")
    assert (tus_server.store / "complete" / "d1" / "small_001.bin").read_bytes() == b"new content"


async def test_stalled_server_keeps_inflight_and_buffers_bounded(tus_server, dataset: Path, journal: Path) -> None:
    cfg = EngineConfig(transfers=3, chunk_size=CHUNK, read_ahead=1)
    stalled = anyio.Event()
    faults = tus_server.faults
    faults.add("PATCH * stall first=0")
    faults.on_stall.append(lambda n: stalled.set() if n >= cfg.transfers else None)
    reporter = Reporter()
    stats = reporter.stats
    async with anyio.create_task_group() as tg:
        result: list[object] = []

        async def run() -> None:
            result.append(await push(dataset, TusAdapter(_url(tus_server)), cfg, reporter=reporter,
                                     journal_path=journal))

        tg.start_soon(run)
        with anyio.fail_after(120):  # a guard against a hang, not a wait for tasks
            await stalled.wait()
        # every request slot is taken by a stalled PATCH: nothing more may be in flight or buffered
        assert stats.requests_in_flight == cfg.transfers
        assert stats.in_flight <= cfg.transfers
        assert stats.buffered <= cfg.memory_bound()
        faults.clear()
        faults.release_stalls()
    report = result[0]
    assert report.ok  # type: ignore[attr-defined]
    assert stats.max_in_flight <= cfg.transfers
    assert stats.max_requests_in_flight <= cfg.transfers
    assert 0 < stats.max_buffered <= cfg.memory_bound()
    assert tree_digests(tus_server.store / "complete") == tree_digests(dataset)


async def test_file_growing_while_sent_is_resent_never_stored_corrupt(tus_server, tmp_path: Path,
                                                                     journal: Path) -> None:
    src = tmp_path / "grow"
    src.mkdir()
    target = src / "growing.dat"
    target.write_bytes(os.urandom(3 * CHUNK))
    sink = CollectSink()
    reporter = Reporter([sink])
    grown = []

    def grow(event: object) -> None:
        if isinstance(event, ItemStarted) and event.rel == "growing.dat" and not grown:
            grown.append(True)
            with open(target, "ab") as fh:
                fh.write(os.urandom(1000))

    reporter.listeners.append(grow)
    report = await push(src, TusAdapter(_url(tus_server)), EngineConfig(chunk_size=CHUNK), reporter=reporter,
                        journal_path=journal)
    assert report.ok, report.failures
    assert any("changed" in e.error for e in sink.events if e.kind == "item_retrying"), sink.events
    assert (tus_server.store / "complete" / "growing.dat").read_bytes() == target.read_bytes()


def test_cli_bad_input_gives_clear_message_and_exit_status(tmp_path: Path, capsys, journal: Path,
                                                           threaded_tus, monkeypatch) -> None:
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    assert cli_main(["push", str(tmp_path / "nope"), url, "--journal", str(journal)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["push", str(tmp_path), "ftp://x/", "--journal", str(journal)]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert cli_main(["push", str(tmp_path), url, "--transfers", "0", "--journal", str(journal)]) == 2
    assert "--transfers must be at least 1" in capsys.readouterr().err

    # an unreadable file (we run as root, so make open() refuse it): the run fails that file, says why,
    # sends the rest and exits 1
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.bin").write_bytes(b"fine")
    (src / "secret.bin").write_bytes(b"locked")
    real_open = os.open

    def guarded(path, flags, *a, **kw):  # type: ignore[no-untyped-def]
        if str(path).endswith("secret.bin"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", guarded)
    rc = cli_main(["push", str(src), url, "--journal", str(journal), "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "secret.bin: cannot open: Permission denied" in err
    assert (threaded_tus.store / "complete" / "ok.bin").read_bytes() == b"fine"
    assert not (threaded_tus.store / "complete" / "secret.bin").exists()


def test_token_never_reaches_json_logs_or_journal(tmp_path: Path, capfd, journal: Path, threaded_tus,
                                                  dataset: Path, monkeypatch) -> None:
    token = "sekret-token-6c1f0e9a"
    monkeypatch.setenv("ASYNCDEPO_TUS_TOKEN", token)
    threaded_tus.faults.add("PATCH * status=503 first=2")
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    rc = cli_main(["push", str(dataset), url, "--json", "-v", "--journal", str(journal), "--chunk-size", "1M"])
    out, err = capfd.readouterr()
    assert rc == 0
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert {"job_started", "item_done", "job_finished"} <= {d["event"] for d in lines}
    assert any(d["event"] == "item_retrying" for d in lines)
    assert token not in out and token not in err
    files = list(journal.parent.glob(journal.name + "*"))
    assert journal in files and journal.stat().st_size > 0  # the check below reads a journal that exists
    db = sqlite3.connect(journal)
    try:  # ... and holds this push: a check over an empty journal would pass without saying anything
        assert db.execute("SELECT count(*) FROM items WHERE state='done'").fetchone()[0] == 44
    finally:
        db.close()
    for f in journal.parent.glob(journal.name + "*"):
        assert token.encode() not in f.read_bytes()


def test_jobs_and_status_commands(tmp_path: Path, capsys, journal: Path, threaded_tus, dataset: Path) -> None:
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    assert cli_main(["push", str(dataset), url, "--journal", str(journal), "-q"]) == 0
    capsys.readouterr()
    assert cli_main(["jobs", "--journal", str(journal), "--json"]) == 0
    jobs = orjson.loads(capsys.readouterr().out)
    assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["done"] == 44
    assert cli_main(["status", jobs[0]["id"][:6], "--journal", str(journal)]) == 0
    assert "done" in capsys.readouterr().out


def _push_cmd(src: Path, url: str, journal: Path) -> list[str]:
    return [sys.executable, "-m", "asyncdepo.cli", "push", str(src), url, "--journal", str(journal),
            "--chunk-size", "1M", "--transfers", "4", "-q"]


def test_sigkill_mid_run_then_rerun_resends_at_most_one_chunk_per_inflight_file(
        tmp_path: Path, journal: Path, threaded_tus) -> None:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(6):
        (src / f"frame_{i}.bin").write_bytes(os.urandom(6 * CHUNK + i))
    total = sum(p.stat().st_size for p in src.iterdir())
    faults = threaded_tus.faults
    # let some chunks through, then hold every PATCH: the kill lands with uploads half done
    stalled = threading.Event()
    faults.on_stall.append(lambda n: stalled.set() if n >= 4 else None)
    threaded_tus.call(lambda: faults.add("PATCH * stall skip=14 first=0"))
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    proc = subprocess.Popen(_push_cmd(src, url, journal), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert stalled.wait(timeout=120), "the push never reached the stall"
        assert 0 < upload_bytes(faults) < total
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # new requests pass; the dead client's stalled requests stay held until the rerun is over, so the
    # bytes left in their sockets cannot land in the middle of the count
    threaded_tus.call(faults.clear)
    rerun = subprocess.run(_push_cmd(src, url, journal), capture_output=True, text=True, timeout=300)
    threaded_tus.call(faults.release_stalls)
    assert rerun.returncode == 0, rerun.stderr
    resent = upload_bytes(faults) - total
    in_flight = 4  # --transfers: at most this many files had a chunk on the wire when killed
    assert 0 <= resent <= in_flight * CHUNK, resent
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(src)


async def test_compressed_push_roundtrips(tus_server, dataset: Path, journal: Path) -> None:
    import zstandard

    report = await push(dataset, TusAdapter(_url(tus_server)),
                        EngineConfig(chunk_size=CHUNK, compress=("zstd", 3)), journal_path=journal)
    assert report.ok, report.failures
    stored = tus_server.store / "complete"
    for p in dataset.rglob("*"):
        if p.is_file():
            z = stored / (p.relative_to(dataset).as_posix() + ".zst")
            assert zstandard.ZstdDecompressor().decompressobj().decompress(z.read_bytes()) == p.read_bytes()


async def test_bwlimit_is_applied_to_every_chunk(tus_server, dataset: Path, journal: Path) -> None:
    from asyncdepo.engine import transfer

    seen: list[int] = []
    real = transfer.Run.throttle

    async def spy(self, n):  # type: ignore[no-untyped-def]
        seen.append(n)
        await real(self, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer.Run, "throttle", spy)
        report = await push(dataset, TusAdapter(_url(tus_server)),
                            EngineConfig(chunk_size=CHUNK, bwlimit=1e9), journal_path=journal)
    assert report.ok
    assert sum(seen) == sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
