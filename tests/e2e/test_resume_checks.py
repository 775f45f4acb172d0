"""A resume checks what the target holds before building on it, and a run never ends "done" while the target
differs from the source: a corrupted part file is re-sent from its last good chunk, a source deleted between
runs fails "source vanished" (and what the target held of it is removed), ``--checksum`` catches a rewrite
that kept size and mtime. Each case runs the CLI as a user does (the first, interrupted run in-process with a
fault injected at the adapter's write boundary; the runs that follow as real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import zstandard
import pytest

from asyncdepo.adapters.local import PART_SUFFIX, LocalWriter
from asyncdepo.cli import main as cli_main
from asyncdepo.contract import Chunk
from asyncdepo.errors import TransientError
from tests.conftest import cli_process, tree_digests

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

pytest_plugins = ["tests.adapters.s3_servers"]

CHUNK = 1 << 20



def _report(out: str) -> dict[str, Any]:
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    return next(e["report"] for e in lines if e["event"] == "job_finished")  # type: ignore[no-any-return]


def _tree(root: Path, files: dict[str, int]) -> Path:
    root.mkdir(parents=True)
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(os.urandom(size))
    return root


def _stop_writes_at(monkeypatch: pytest.MonkeyPatch, offset: int) -> None:
    """The local adapter's writes fail from ``offset`` on: the run ends with part files and journal state."""
    real = LocalWriter.write

    async def failing(self: LocalWriter, chunk: Chunk) -> None:
        if chunk.offset >= offset:
            raise TransientError(f"write {self.item.rel}: injected I/O error")
        await real(self, chunk)

    monkeypatch.setattr(LocalWriter, "write", failing)


def _first_run(monkeypatch: pytest.MonkeyPatch, src: Path, url: str, journal: Path, stop_at: int) -> None:
    _stop_writes_at(monkeypatch, stop_at)
    rc = cli_main(["push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "-q",
                   "--request-attempts", "1", "--retries", "0"])
    monkeypatch.undo()
    assert rc == 1


def test_local_part_corrupted_between_runs_is_resent_from_its_last_good_chunk(
        tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _tree(tmp_path / "src", {"big.bin": 6 * CHUNK + 321})
    dest = tmp_path / "dest"
    url = f"file://{dest}"
    _first_run(monkeypatch, src, url, journal, 4 * CHUNK)
    part = dest / ("big.bin" + PART_SUFFIX)
    assert part.stat().st_size == 4 * CHUNK
    with open(part, "r+b") as fh:  # damage inside the second chunk, as a bad disk or another program would
        fh.seek(CHUNK + CHUNK // 2)
        fh.write(b"\0" * 64)
    rerun = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "--json")
    assert rerun.returncode == 0, rerun.stderr
    report = _report(rerun.stdout)
    # the first chunk matched its journaled digest; everything from the damaged one on was sent again,
    # without a single retry (before, the damage was found only at the end, again on every attempt)
    assert report["bytes_sent"] == (6 * CHUNK + 321) - CHUNK and report["retries"] == 0
    assert tree_digests(dest) == tree_digests(src)
    assert not part.exists()


def test_local_source_vanished_between_runs_fails_and_its_part_file_is_removed(
        tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _tree(tmp_path / "src", {"keep.bin": 3 * CHUNK, "gone.bin": 3 * CHUNK + 5, "small.txt": 100})
    dest = tmp_path / "dest"
    url = f"file://{dest}"
    _first_run(monkeypatch, src, url, journal, CHUNK)
    assert (dest / ("gone.bin" + PART_SUFFIX)).exists()
    (src / "gone.bin").unlink()
    rerun = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M")
    assert rerun.returncode == 1, rerun.stderr
    assert "failed: gone.bin: source vanished" in rerun.stderr
    assert not (dest / ("gone.bin" + PART_SUFFIX)).exists() and not (dest / "gone.bin").exists()
    assert tree_digests(dest) == tree_digests(src)
    jid = rerun.stderr.split("job ", 1)[1].split(":", 1)[0]
    status = cli_process("status", jid, "--journal", str(journal), "--json")
    assert status.returncode == 1
    st = orjson.loads(status.stdout)
    assert st["failures"] == [{"rel": "gone.bin", "error": "source vanished", "transient": False}]
    assert st["counts"]["done"]["files"] == 2
    # reported once: the next run that does not find it either is done (the journal drops it)
    third = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M")
    assert third.returncode == 0, third.stderr
    assert orjson.loads(cli_process("status", jid, "--journal", str(journal), "--json").stdout)["failures"] == []


def test_tus_source_vanished_between_runs_terminates_its_upload(
        tmp_path: Path, journal: Path, threaded_tus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncdepo.sim import tus

    src = _tree(tmp_path / "src", {"gone.bin": 3 * CHUNK + 5})
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    # the first run: every PATCH of gone.bin after the first fails (503), so its upload is left half done
    # (the file the second run sends besides is added after it: its PATCH would count among them)
    threaded_tus.call(lambda: threaded_tus.faults.add("PATCH * status=503 skip=1 first=0"))
    assert cli_main(["push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "-q",
                     "--request-attempts", "1", "--retries", "0"]) == 1
    threaded_tus.call(threaded_tus.faults.clear)
    state = threaded_tus.server.app[tus.STATE_KEY]
    started = [u for u in state.uploads.values() if u.metadata.get("relpath") == "gone.bin"]
    assert len(started) == 1 and 0 < started[0].offset < 3 * CHUNK + 5 and not started[0].terminated
    (src / "keep.txt").write_bytes(os.urandom(10))
    (src / "gone.bin").unlink()
    rerun = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M")
    assert rerun.returncode == 1 and "failed: gone.bin: source vanished" in rerun.stderr, rerun.stderr
    assert started[0].terminated  # DELETE: the server no longer keeps the half upload
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(src)


def test_tus_source_rewritten_with_same_size_and_mtime_between_runs_is_sent_again_from_zero(
        tmp_path: Path, journal: Path, threaded_tus: Any) -> None:
    """The resume re-reads the source's prefix against the journal's chunk digests: the upload of the old
    bytes is terminated and the new file sent whole, never the old prefix with the new rest."""
    from asyncdepo.sim import tus

    src = _tree(tmp_path / "src", {"big.bin": 3 * CHUNK + 5, "keep.txt": 10})
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    threaded_tus.call(lambda: threaded_tus.faults.add("PATCH * status=503 skip=2 first=0"))  # two chunks land
    assert cli_main(["push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "-q",
                     "--request-attempts", "1", "--retries", "0"]) == 1
    threaded_tus.call(threaded_tus.faults.clear)
    state = threaded_tus.server.app[tus.STATE_KEY]
    started = [u for u in state.uploads.values() if u.metadata.get("relpath") == "big.bin"]
    assert len(started) == 1 and started[0].offset >= CHUNK and not started[0].terminated
    target = src / "big.bin"
    st = target.stat()
    target.write_bytes(os.urandom(st.st_size))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    rerun = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(src)
    assert started[0].terminated  # the upload of the old bytes is not left behind
    assert _report(rerun.stdout)["bytes_sent"] == 3 * CHUNK + 5  # the new file whole, once


def test_checksum_resends_a_file_rewritten_with_same_size_and_mtime(tmp_path: Path, journal: Path) -> None:
    src = _tree(tmp_path / "src", {"a.bin": 5000, "b.bin": 7000})
    dest = tmp_path / "dest"
    url = f"file://{dest}"
    assert cli_process("push", str(src), url, "--journal", str(journal)).returncode == 0
    target = src / "a.bin"
    st = target.stat()
    target.write_bytes(os.urandom(5000))  # same size ...
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime back
    plain = cli_process("push", str(src), url, "--journal", str(journal), "--json")
    assert plain.returncode == 0 and _report(plain.stdout)["files_skipped"] == 2  # size+mtime cannot see it
    assert tree_digests(dest) != tree_digests(src)
    checked = cli_process("push", str(src), url, "--journal", str(journal), "--json", "--checksum")
    assert checked.returncode == 0, checked.stderr
    report = _report(checked.stdout)
    assert report["files_done"] == 1 and report["files_skipped"] == 1 and report["bytes_sent"] == 5000
    assert tree_digests(dest) == tree_digests(src)


def test_s3_source_vanished_between_runs_aborts_its_multipart_upload(
        moto_server: S3TestServer, tmp_path: Path, journal: Path) -> None:
    import anyio

    from asyncdepo.config import EngineConfig
    from asyncdepo.engine.scheduler import push
    from tests.adapters.s3_helpers import PART
    from tests.e2e.test_s3_push import CountingS3

    src = _tree(tmp_path / "src", {"gone.raw": 3 * PART + 10, "keep.txt": 100})
    bucket = moto_server.new_bucket()
    url = f"s3://{bucket}/ds"
    strict = EngineConfig(transfers=2, chunk_size=PART, request_attempts=1, item_attempts=1, retries=0)
    first = CountingS3(url, strict, moto_server.secrets, endpoint_url=moto_server.endpoint_url)
    first.fail = {("upload_part", 2): "before"}
    first.gate = 2
    report = anyio.run(lambda: push(src, first, strict, journal_path=journal))
    assert not report.ok
    client = moto_server.client()
    assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    (src / "gone.raw").unlink()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": moto_server.access_key, "AWS_SECRET_ACCESS_KEY": moto_server.secret_key}
    rerun = subprocess.run([sys.executable, "-m", "asyncdepo.cli", "push", str(src), url, "--endpoint-url",
                            moto_server.endpoint_url, "--journal", str(journal), "--chunk-size", str(PART)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 1 and "failed: gone.raw: source vanished" in rerun.stderr, rerun.stderr
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["ds/keep.txt"]


def test_tus_server_behind_the_journal_is_resumed_from_its_own_offset(
        tmp_path: Path, journal: Path, threaded_tus: Any) -> None:
    """The server lost the tail of an upload the journal had recorded as confirmed (a restore from backup):
    the resume builds on what the server holds (HEAD), not on the journal's chunks past it."""
    from asyncdepo.sim import tus

    size = 6 * CHUNK + 99
    src = _tree(tmp_path / "src", {"big.bin": size})
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    threaded_tus.call(lambda: threaded_tus.faults.add("PATCH * status=503 skip=4 first=0"))
    first = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "--request-attempts",
                 "1", "--retries", "0")
    assert first.returncode == 1, first.stderr
    state = threaded_tus.server.app[tus.STATE_KEY]
    (up,) = state.uploads.values()
    assert up.offset == 4 * CHUNK  # four PATCHes (a multi-chunk upload is created empty, then journaled)
    back = CHUNK + CHUNK // 2  # mid-chunk, as a server may keep part of a request

    def lose_tail() -> None:
        up.offset = back
        os.truncate(state.data_path(up.id), back)
        state.save(up)

    threaded_tus.call(lose_tail)
    threaded_tus.call(threaded_tus.faults.clear)
    threaded_tus.faults.reset_counters()
    rerun = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert _report(rerun.stdout)["bytes_sent"] == size - back
    assert threaded_tus.faults.total_bytes("PATCH") == size - back
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(src)


def test_checksum_of_a_file_deleted_after_the_walk_fails_as_a_vanished_source(
        tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from asyncdepo.engine import checks

    src = _tree(tmp_path / "src", {"a.bin": 5000, "b.bin": 7000})
    dest = tmp_path / "dest"
    url = f"file://{dest}"
    assert cli_main(["push", str(src), url, "--journal", str(journal), "-q"]) == 0
    real = checks.hash_path_sync

    def deleted_first(path: Any, algos: Any, **kw: Any) -> Any:
        if str(path).endswith("a.bin"):
            os.unlink(path)  # gone between the walk and the content check
        return real(path, algos, **kw)

    monkeypatch.setattr(checks, "hash_path_sync", deleted_first)
    capsys.readouterr()
    assert cli_main(["push", str(src), url, "--journal", str(journal), "-q", "--checksum"]) == 1
    err = capsys.readouterr().err
    assert "a.bin" in err and "vanished" in err
    assert (dest / "b.bin").read_bytes() == (src / "b.bin").read_bytes()


def test_compressed_stream_of_a_file_rewritten_between_runs_is_sent_again_from_zero(
        tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --compress the resume makes the stream again from the start; the chunks the part file holds are
    compared with the journal as they pass, so a rewrite that kept size and mtime starts the file over."""
    src = _tree(tmp_path / "src", {"big.bin": 6 * CHUNK + 321})
    dest = tmp_path / "dest"
    url = f"file://{dest}"
    _stop_writes_at(monkeypatch, 3 * CHUNK)
    assert cli_main(["push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "-q", "--compress",
                     "zstd", "--request-attempts", "1", "--retries", "0"]) == 1
    monkeypatch.undo()
    assert (dest / ("big.bin.zst" + PART_SUFFIX)).stat().st_size == 3 * CHUNK
    target = src / "big.bin"
    st = target.stat()
    target.write_bytes(os.urandom(st.st_size))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    rerun = cli_process("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "--compress",
                        "zstd", "--json")
    assert rerun.returncode == 0, rerun.stderr
    with zstandard.ZstdDecompressor().stream_reader((dest / "big.bin.zst").read_bytes()) as fh:
        assert fh.read() == target.read_bytes()
    assert _report(rerun.stdout)["retries"] == 1  # found on the first chunk the part file holds
