"""Any name Linux allows: a file name that is not UTF-8 is journaled and reported, sent where the target can
name it (a local directory, tus metadata) and failed on its own where it cannot (an S3 key must be UTF-8)
while the rest of the push goes on; a directory the walk cannot read is a failure, not a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest

from asyncdepo.cli import main as cli_main
from tests.conftest import tree_digests

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

pytest_plugins = ["tests.adapters.s3_servers"]

LATIN1 = b"caf\xe9.bin"  # "café" in Latin-1: not UTF-8
BAD_DIR = b"\xff\xfe dir"


def _tree(root: Path) -> dict[bytes, bytes]:
    files = {LATIN1: os.urandom(3000), BAD_DIR + b"/inner.bin": os.urandom(2 << 20 | 77),
             b"plain/ok.txt": b"fine\n", "utf8/é.txt".encode(): b"accent\n"}
    for rel, body in files.items():
        path = os.path.join(os.fsencode(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(body)
    return files


def _cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "asyncdepo.cli", *argv], capture_output=True, timeout=300)


def _bytes_tree(root: Path) -> dict[bytes, bytes]:
    out = {}
    base = os.fsencode(root)
    for dirpath, _, names in os.walk(base):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, base)] = open(full, "rb").read()  # noqa: SIM115 - test helper
    return out


def test_local_target_stores_names_that_are_not_utf8(tmp_path: Path, journal: Path) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    dest = tmp_path / "dest"
    run = _cli("push", str(src), f"file://{dest}", "--journal", str(journal), "--chunk-size", "1M", "--json")
    assert run.returncode == 0, run.stderr
    assert _bytes_tree(dest) == files
    events = [orjson.loads(line) for line in run.stdout.splitlines()]  # every line is valid JSON
    assert {e["rel"] for e in events if e["event"] == "item_done"} >= {"caf\\xe9.bin", "\\xff\\xfe dir/inner.bin"}
    again = _cli("push", str(src), f"file://{dest}", "--journal", str(journal), "--json")
    assert again.returncode == 0
    report = next(e["report"] for e in map(orjson.loads, again.stdout.splitlines()) if e["event"] == "job_finished")
    assert report["files_skipped"] == len(files)  # found in the journal under the same (byte) names


def test_tus_target_gets_names_that_are_not_utf8_in_its_metadata(tmp_path: Path, journal: Path,
                                                                threaded_tus: Any) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    run = _cli("push", str(src), url, "--journal", str(journal), "--chunk-size", "1M", "-q")
    assert run.returncode == 0, run.stderr
    assert _bytes_tree(threaded_tus.store / "complete") == files


def test_s3_fails_only_the_file_it_cannot_name(moto_server: S3TestServer, tmp_path: Path, journal: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    bucket = moto_server.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    rc = cli_main(["push", str(src), f"s3://{bucket}/ds", "--endpoint-url", moto_server.endpoint_url,
                   "--journal", str(journal), "--chunk-size", "5M", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "failed: caf\\xe9.bin: caf\\xe9.bin: the name is not valid UTF-8" in err
    assert "failed: \\xff\\xfe dir/inner.bin:" in err
    listed = moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert sorted(o["Key"] for o in listed) == ["ds/plain/ok.txt", "ds/utf8/é.txt"]
    assert len(files) == 4


def test_unreadable_directory_is_a_failure_in_report_status_and_exit(
        tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "x.bin").write_bytes(b"x" * 100)
    (src / "open.bin").write_bytes(b"y" * 100)
    dest = tmp_path / "dest"
    real = os.scandir

    def scandir(path: Any = ".") -> Any:  # tests run as root, for whom permissions do not apply
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rc = cli_main(["push", str(src), f"file://{dest}", "--journal", str(journal), "-q"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 1
    assert "failed: locked/: cannot list directory: Permission denied" in err
    assert (dest / "open.bin").exists() and not (dest / "locked").exists()
    jid = err.split("job ", 1)[1].split(":", 1)[0]
    assert cli_main(["status", jid, "--journal", str(journal)]) == 1
    assert "failed: locked/: cannot list directory" in capsys.readouterr().out
    # readable again: the next run sends it, and the job is clean
    assert cli_main(["push", str(src), f"file://{dest}", "--journal", str(journal), "-q"]) == 0
    assert cli_main(["status", jid, "--journal", str(journal)]) == 0
    assert tree_digests(dest) == tree_digests(src)
