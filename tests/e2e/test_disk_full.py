"""A full disk ends the run at once with one message saying how much space is missing: no retries, no
warning per attempt; partial files stay and the same command finishes the job once space is freed. On a real
small tmpfs (the tests run as root and mount one) for a push to file://, a pull from file:// (blocks written by
the engine) and a pull from S3 (plain GETs written by the HTTP transport); and with ENOSPC injected at the local
adapter's write boundary where mounting is not possible."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from asyncdepo.cli import main as cli_main
from tests.conftest import cli_process, tree_digests
from tests.tmpfs import remount, small_tmpfs

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

pytest_plugins = ["tests.adapters.s3_servers"]

MiB = 1 << 20



@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Callable[[str], None]]]:
    """A 4 MiB tmpfs, and a function that resizes it (``"32m"``): "freeing space"."""
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        yield disk, lambda size: remount(disk, f"size={size}")


def _source(root: Path) -> Path:
    root.mkdir()
    for i in range(3):
        (root / f"frame_{i}.bin").write_bytes(os.urandom(2 * MiB + i))
    for i in range(5):
        (root / f"small_{i}.txt").write_bytes(os.urandom(1000))
    return root


def _check_one_message(err: str, where: Path, *, kept: bool = True) -> None:
    assert f"failed: {where}: disk full: " in err, err
    assert re.search(r"[\d.]+ MB free, (at least )?[\d.]+ MB more needed", err), err
    assert "run the same command again" in err
    if kept:
        assert re.search(r"\d+ partial file\(s\) \([\d.]+ MB\) kept for resume", err), err
    assert re.search(r", 0 retries", err), err  # nothing retried ...
    assert "WARNING" not in err and "retrying" not in err  # ... and nothing printed per attempt
    assert err.count("disk full") == 1, err


def test_push_to_a_full_disk_stops_with_one_message_and_resumes_after_freeing_space(
        tmp_path: Path, journal: Path, small_disk: tuple[Path, Callable[[str], None]]) -> None:
    disk, resize = small_disk
    src = _source(tmp_path / "src")
    argv = ("push", str(src), f"file://{disk}", "--journal", str(journal), "--chunk-size", "1M", "--transfers", "2")
    full = cli_process(*argv)
    assert full.returncode == 1, full.stderr
    _check_one_message(full.stderr, disk)
    parts = list(disk.glob("*.asyncdepo-part"))
    assert parts  # kept for the resume
    resize("32m")
    again = cli_process(*argv)
    assert again.returncode == 0, again.stderr
    assert tree_digests(disk) == tree_digests(src) and not list(disk.glob("*.asyncdepo-part"))


def test_pull_into_a_full_disk_stops_with_one_message_and_resumes_after_freeing_space(
        tmp_path: Path, small_disk: tuple[Path, Callable[[str], None]]) -> None:
    disk, resize = small_disk
    src = _source(tmp_path / "src")
    full = cli_process("pull", f"file://{src}", str(disk), "--transfers", "2")
    assert full.returncode == 1, full.stderr
    _check_one_message(full.stderr, disk)
    resize("32m")
    again = cli_process("pull", f"file://{src}", str(disk), "--transfers", "2")
    assert again.returncode == 0, again.stderr
    assert tree_digests(disk) == tree_digests(src) and not list(disk.glob("*.asyncdepo-part"))


def test_s3_pull_into_a_full_disk_stops_with_one_message(
        tmp_path: Path, small_disk: tuple[Path, Callable[[str], None]], moto_server: S3TestServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    disk, resize = small_disk
    src = _source(tmp_path / "src")
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    for p in src.iterdir():
        client.put_object(Bucket=bucket, Key=f"ds/{p.name}", Body=p.read_bytes())
    env = {**os.environ, "AWS_ACCESS_KEY_ID": moto_server.access_key,
           "AWS_SECRET_ACCESS_KEY": moto_server.secret_key}
    argv = [sys.executable, "-m", "asyncdepo.cli", "pull", f"s3://{bucket}/ds", str(disk), "--endpoint-url",
            moto_server.endpoint_url, "--transfers", "2"]
    full = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert full.returncode == 1, full.stderr
    _check_one_message(full.stderr, disk)
    resize("32m")
    again = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert tree_digests(disk) == tree_digests(src)


def test_disk_full_injected(tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC from the local adapter's writes after 3 MiB (as a disk that fills up would answer)."""
    src = _source(tmp_path / "src")
    dest = tmp_path / "dest"
    real = os.pwrite
    room = [3 * MiB]

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, memoryview(data)[:room[0]], offset)
        room[0] -= n
        return n

    monkeypatch.setattr(os, "pwrite", pwrite)
    argv = ["push", str(src), f"file://{dest}", "--journal", str(journal), "--chunk-size", "1M", "--transfers", "2"]
    assert cli_main(argv) == 1
    _check_one_message(capsys.readouterr().err, dest, kept=False)
    monkeypatch.undo()
    assert cli_main(argv) == 0
    assert tree_digests(dest) == tree_digests(src)
