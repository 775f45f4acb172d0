"""The ascp transport's remaining paths: option checks and console/management parsing fed directly (pure), and
the child-process ones with real programs (the stand-in ascp found where Aspera installs it, a file that is
not executable, a binary the kernel cannot run, a session that exits before it reaches the management port,
a progress callback that fails mid-session)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import anyio
import psutil
import pytest

from asyncdepo import errors
from asyncdepo.transport.ascp.console import ConsoleParser, SessionAccount, classify, code_from_text
from asyncdepo.transport.ascp.pairs import Pair, capped_rate, rate_bits, run_pairs
from asyncdepo.transport.ascp.runner import (
    AscpOptions,
    AscpProgress,
    AscpSecrets,
    _Tracker,
    build_argv,
    check_ascp,
    resolve_ascp,
    run_once,
    transfer,
)
from tests.unit.test_ascp_parse import Seen, recorder
from tests.unit.test_ascp_runner import (  # noqa: F401
    PASSWORD,
    STANDIN,
    counters,
    make_set,
    on_disk,
    opts,
    root,
    standin_children,
)

DEST = "u@hx:upload/ABC123/data"


# -- options and argv (pure) ----------------------------------------------------------------------------


def test_argv_carries_min_rate_policy_and_a_file_list() -> None:
    argv = build_argv(AscpOptions(min_rate="10M", policy="fair"), [], DEST, file_list=Path("/tmp/list"))
    assert ["-m", "10M"] == argv[argv.index("-m"):][:2] and "--policy=fair" in argv
    assert argv[-2:] == ["--file-list=/tmp/list", DEST]


@pytest.mark.parametrize(("kw", "words"), [
    ({"pair_list": Path("p"), "file_list": Path("f")}, "either --file-list or --file-pair-list"),
    ({"dest": ""}, "no destination given to ascp"),
    ({"opts": AscpOptions(stall_timeout=0)}, "stall_timeout must be > 0"),
    ({"opts": AscpOptions(grace=-1)}, "grace >= 0"),
])
def test_argv_refuses_what_ascp_could_not_run(kw: dict, words: str) -> None:
    o, dest = kw.pop("opts", AscpOptions()), kw.pop("dest", DEST)
    with pytest.raises(errors.UsageError, match=words):
        build_argv(o, [] if kw else ["a"], dest, **kw)


async def test_transfer_needs_at_least_one_attempt() -> None:
    with pytest.raises(errors.UsageError, match="attempts must be at least 1"):
        await transfer(AscpOptions(), ["a"], DEST, attempts=0)


def test_a_file_redrawn_after_its_last_line_counts_nothing_more() -> None:
    events: list[AscpProgress] = []
    t = _Tracker(events.append)
    assert t.report("a.bin", 10, 10, None, True) == 10
    assert t.report("a.bin", 10, 10, None, True) is None  # the 100 % line drawn again
    assert t.report("a.bin", 10, 10, None, False) is None  # or a frame after STOP
    assert t.report("b.bin", 0, 0, None, True) == 0  # an empty file still gets its one event
    assert [(e.file, e.delta, e.done) for e in events] == [("a.bin", 10, True), ("b.bin", 0, True)]


def test_rates_and_their_caps() -> None:
    assert rate_bits("200M") == 200e6 and rate_bits("500") == 500e3
    with pytest.raises(ValueError, match="not an ascp rate: 'fast'"):
        rate_bits("fast")
    assert capped_rate("200M", None) == "200M" and capped_rate(None, 1000) == "8K"
    assert capped_rate("1K", 1000) == "1K"  # the explicit rate is the lower


async def test_pairs_refuse_nothing_and_a_name_with_a_line_break(tmp_path: Path) -> None:
    with pytest.raises(errors.UsageError, match="no file pairs given to ascp"):
        await run_pairs(AscpOptions(), [], DEST)
    with pytest.raises(errors.UsageError, match="ascp cannot name 'k2': a file list holds one path per line"):
        await run_pairs(AscpOptions(), [Pair("/a", "a", "k1"), Pair("/b", "b\rc", "k2")], DEST)


# -- the console and the management port (pure) -----------------------------------------------------------


def test_summary_in_one_line_and_a_line_after_it_that_is_no_tail() -> None:
    c = ConsoleParser()
    c.stdout_line("Partial Completion: 12K bytes transferred in 3 seconds (32K bits/sec), in 4 files, 1 file failed.")
    assert c.summary is not None and (c.summary.partial, c.summary.files, c.summary.failed) == (True, 4, 1)
    c = ConsoleParser()
    c.stdout_line("Completed: 1K bytes transferred in 1 seconds")
    line = c.stdout_line("a.bin   100%  1KB  8.0Kb/s    --:--", "\n")  # not the "(...), in N files." tail
    assert line is not None and line.done and c.summary is not None and c.summary.files is None
    c.stdout_line("Usage: ascp [-{ATdpqv}] ...")
    c.stderr_line("   ")
    assert c.usage and c.stderr_tail == []


def test_frames_out_of_order_and_names_outside_every_root(tmp_path: Path) -> None:
    seen: Seen = []
    acc = SessionAccount(recorder(seen), send=False, roots=[Path("/a"), tmp_path], management=True)
    frames = (
        "FASPMGR 2\nType: STATS\nTransferBytes: 5\n\n"  # before any file: counted, nobody to tell
        "FASPMGR 2\nType: START\nFile: /x/f.bin\nStartByte: 0\nTransferBytes: 5\n\n"
        "FASPMGR 2\nType: START\nFile: /x/f.bin\nStartByte: 100\nTransferBytes: 5\n\n"  # restarted at 100
        "FASPMGR 2\nType: STATS\nFile: /x/f.bin\nTransferBytes: 25\n\n"  # no Size: bytes as counted
        "FASPMGR 2\nType: STOP\nFile: /x/f.bin\nTransferBytes: 30\n\n"
        "FASPMGR 2\nType: FILEERROR\nFile: /x/g.bin\nCode: 43\nDescription: Cannot stat file\n\n"
        "FASPMGR 2\nType: FILEERROR\nFile: /x/h.bin\nCode: 4\n\n"  # the first one names the failure
    )
    for line in frames.split("\n"):
        acc.mgr_line(line)
    assert seen == [("/x/f.bin", 0, None, False), ("/x/f.bin", 100, None, False), ("/x/f.bin", 120, None, False),
                    ("/x/f.bin", 125, None, True)]
    assert (acc.moved, acc.file_errors, acc.partial) == (30, 2, True)
    err = acc.failure(1, [])
    assert isinstance(err, errors.PermanentError) and "/x/g.bin: Cannot stat file" in str(err)
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"12345")
    assert acc.local_size("f") == 5  # not under /a: found under the next root
    assert acc.local_size("d") is None and acc.local_size("nul\0name") is None


def test_frames_with_relative_names_and_no_byte_count() -> None:
    seen: Seen = []
    acc = SessionAccount(recorder(seen), send=True, roots=[Path("/data")], management=True)
    for line in ["FASPMGR 2", "Type: START", "File: set1/a.bin", "Size: 10", "",  # no TransferBytes
                 "FASPMGR 2", "Type: STOP", "File: set1/a.bin", "Size: 10", ""]:
        acc.mgr_line(line)
    assert seen == [("set1/a.bin", 0, 10, False), ("set1/a.bin", 10, 10, True)] and acc.moved == 0


def test_a_silent_failure_says_how_ascp_ended() -> None:
    assert str(classify(returncode=3, message=None)) == "ascp: exited with status 3"
    killed = classify(returncode=-9, message=None, stderr_tail=["LOG session start"])
    assert isinstance(killed, errors.TransientError)
    assert str(killed) == "ascp: killed by signal 9; it last said: LOG session start"


def test_a_fasp_meaning_in_a_message_gives_its_code() -> None:
    assert code_from_text("Session Stop: File path/name too long for file system") == 55
    assert code_from_text("something else entirely") is None


# -- child processes ------------------------------------------------------------------------------------


def test_ascp_is_found_where_aspera_installs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, empty = tmp_path / "home", tmp_path / "empty-path"
    (home / ".aspera" / "cli" / "bin").mkdir(parents=True)
    empty.mkdir()
    installed = home / ".aspera" / "cli" / "bin" / "ascp"
    installed.symlink_to(STANDIN)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", str(empty))
    assert resolve_ascp("ascp") == str(installed)
    assert check_ascp(AscpOptions(ascp="ascp")) == str(installed)  # and it answers like ascp
    installed.unlink()
    with pytest.raises(errors.UsageError, match="ascp not found: 'ascp'") as info:
        resolve_ascp("ascp")
    assert "install IBM Aspera Connect" in info.value.describe()


def test_a_file_that_is_not_executable_says_so(tmp_path: Path) -> None:
    plain = tmp_path / "ascp"
    plain.write_bytes(STANDIN.read_bytes())
    plain.chmod(0o644)
    with pytest.raises(errors.UsageError, match=f"ascp at {plain} is not an executable file") as info:
        check_ascp(AscpOptions(ascp=str(plain)))
    assert f"chmod +x {plain}" in info.value.describe()


async def test_a_binary_the_kernel_cannot_run_is_a_usage_error(tmp_path: Path, root: Path) -> None:  # noqa: F811
    broken = tmp_path / "ascp"
    broken.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(64))  # an ELF header for no machine: not runnable
    broken.chmod(0o755)
    with pytest.raises(errors.UsageError, match=f"cannot run {broken}: Exec format error"):
        check_ascp(AscpOptions(ascp=str(broken)))
    src = make_set(tmp_path / "local", "set1", [10])
    with pytest.raises(errors.UsageError, match=f"cannot run {broken}: Exec format error"):
        await run_once(opts(ascp=str(broken), management_port=True), [str(src)], DEST,
                       secrets=AscpSecrets(password=PASSWORD))
    assert standin_children() == []


async def test_a_session_that_ends_before_the_management_port_is_a_clear_failure(tmp_path: Path,
                                                                                 root: Path) -> None:  # noqa: F811
    src = make_set(tmp_path / "local", "set1", [10])
    with pytest.raises(errors.PermanentError, match="command line") as info:
        await run_once(opts(management_port=True, extra=("--bogus",)), [str(src)], DEST,
                       secrets=AscpSecrets(password=PASSWORD))
    assert info.value.status == 112  # ascp's usage exit, though it never connected to the port
    assert not any((root / "upload" / "ABC123" / "data").iterdir()) and standin_children() == []


@pytest.mark.parametrize("management", [False, True], ids=["console", "management-port"])
async def test_a_failing_progress_callback_stops_the_session_and_surfaces_as_it_is(tmp_path: Path, root: Path,  # noqa: F811
                                                                                  management: bool) -> None:
    src = make_set(tmp_path / "local", "set1", [300_000, 200_000])
    seen: list[AscpProgress] = []

    def full(event: AscpProgress) -> None:
        seen.append(event)
        raise OSError(28, "No space left on device (the caller's bookkeeping)")

    with pytest.raises(OSError, match="No space left on device") as info:
        await run_once(opts(management_port=management), [str(src)], DEST, secrets=AscpSecrets(password=PASSWORD),
                       on_progress=full)
    assert type(info.value) is OSError and len(seen) == 1  # the first report failed: nothing after it
    assert standin_children() == [] and not any(p.status() == psutil.STATUS_ZOMBIE
                                                for p in psutil.Process().children(recursive=True))


async def test_pairs_without_a_progress_callback_still_move_every_byte(tmp_path: Path, root: Path) -> None:  # noqa: F811
    src = make_set(tmp_path / "local", "set1", [5_000, 0, 70_000])
    files = sorted(p for p in src.rglob("*") if p.is_file())
    pairs = [Pair(str(p), p.relative_to(src.parent).as_posix(), p.name) for p in files]
    result = await run_pairs(opts(), pairs, DEST, secrets=AscpSecrets(password=PASSWORD))
    data = root / "upload" / "ABC123" / "data"
    assert result.files == 3 and on_disk(data, data) == on_disk(src, src.parent)
    assert all((data / p.dest).read_bytes() == Path(p.source).read_bytes() for p in pairs)
    assert os.listdir(data) == ["set1"]


async def test_ascp_killed_from_outside_mid_file_is_transient_and_the_rerun_sends_the_rest(
        tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The stand-in stalls after 5000 bytes and says so on a FIFO; the test SIGKILLs it there (an OOM killer, an
    operator): its last progress redraw was never ended by a line break, and is still read at EOF."""
    src = make_set(tmp_path / "local", "set1", [9_000])
    fifo = tmp_path / "notify"
    os.mkfifo(fifo)
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "stall:5000")
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_NOTIFY", str(fifo))
    events: list[AscpProgress] = []
    stalled: list[int] = []

    def kill_when_stalled() -> None:
        with open(fifo) as f:
            words = f.readline().split()  # "stalled <pid> <bytes>", or "" when the session ended first
        if words:
            stalled.append(int(words[2]))
            os.kill(int(words[1]), signal.SIGKILL)

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, kill_when_stalled)
        try:
            with pytest.raises(errors.TransientError, match="killed by signal 9"):
                await run_once(opts(), [str(src)], DEST, secrets=AscpSecrets(password=PASSWORD),
                               on_progress=events.append)
        finally:
            with contextlib.suppress(OSError):  # a reader still waiting (the session ended early): let it go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert stalled == [5000] and max(e.bytes for e in events) == 5000 and not any(e.done for e in events)
    data = root / "upload" / "ABC123" / "data" / "set1"
    assert (data / "img 000.mrc.aspx").stat().st_size == 5000  # kept for -k
    monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL")
    result = await run_once(opts(), [str(src)], DEST, secrets=AscpSecrets(password=PASSWORD))
    assert (data / "img 000.mrc").read_bytes() == (src / "img 000.mrc").read_bytes()
    assert result.files == 1 and counters(tmp_path)[-1]["bytes"] == 4000  # only the rest was sent
    assert counters(tmp_path)[-1]["resumed_from"] == {"set1/img 000.mrc": 5000}


class Abort(BaseException):
    """A caller's own way to stop everything (not an Exception: it must not be caught as an error)."""


async def test_a_callback_raising_a_base_exception_gets_it_back_in_its_group(tmp_path: Path,
                                                                            root: Path) -> None:  # noqa: F811
    src = make_set(tmp_path / "local", "set1", [300_000])

    def abort(_: AscpProgress) -> None:
        raise Abort("stop")

    with pytest.raises(BaseExceptionGroup) as info:
        await run_once(opts(), [str(src)], DEST, secrets=AscpSecrets(password=PASSWORD), on_progress=abort)
    assert [type(e) for e in info.value.exceptions] == [Abort]
    assert standin_children() == []
