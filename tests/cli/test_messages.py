"""What a person reads: help that answers, sizes as they are typed, the rate next to the limit it obeys."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncdepo.cli import common
from asyncdepo.cli import main as cli_main
from asyncdepo.config import format_size, parse_size
from asyncdepo.engine.report import RunReport
from tests.conftest import cli_process


def test_sim_help_answers_with_exit_0() -> None:
    for argv in (("sim", "--help"), ("sim", "-h")):
        run = cli_process(*argv)
        assert run.returncode == 0, run.stderr
        assert "usage: asyncdepo sim NAME" in run.stdout and "tus" in run.stdout
    assert cli_process("sim").returncode == 2  # no simulator named: usage, and an error status
    own = cli_process("sim", "tus", "--help")
    assert own.returncode == 0 and "--root" in own.stdout


def test_help_shows_sizes_as_they_are_typed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["push", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 16M)" in text and "16777216" not in text
    assert [format_size(n) for n in (16 << 20, 1 << 30, 5 << 20, 1000, 1536)] == ["16M", "1G", "5M", "1000",
                                                                                   "1536"]
    assert all(parse_size(format_size(n)) == n for n in (16 << 20, 3 << 40, 12345, 64 << 10))


def test_summary_shows_the_limit_beside_the_rate(capsys: pytest.CaptureFixture[str]) -> None:
    report = RunReport(ok=True, job_id="abc", bytes=100_000_000, bytes_sent=100_000_000, seconds=5.0,
                       bwlimit=20 * 2**20)
    assert common.print_report(report) == 0
    err = capsys.readouterr().err
    # MB are 10^6 bytes in the report; the limit is binary (20M), so it is shown converted beside the rate
    assert "(20.0 MB/s on the wire; --bwlimit 21.0 MB/s)" in err


def test_quiet_run_prints_no_warnings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    (src / "link").symlink_to(src / "a.bin")  # skipped with a warning (symbolic links are not followed)
    argv = ("push", str(src), f"file://{tmp_path / 'dest'}", "--journal", str(tmp_path / "j.sqlite"))
    loud = cli_process(*argv)
    assert loud.returncode == 0 and "WARNING skipped link: symbolic link" in loud.stderr
    quiet = cli_process(*argv, "-q")
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr and "job " in quiet.stderr
