"""ascp's console and management-port output parsed from recorded-style text (no process involved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncdepo import errors
from asyncdepo.transport.ascp.console import (
    ConsoleParser,
    FaspMgrParser,
    LineSplitter,
    Report,
    SessionAccount,
    classify,
    code_from_text,
    escape_value,
    parse_progress_line,
    parse_rate,
    parse_size,
    scrub,
    unescape_value,
)

# What ascp printed for ImmPort's download example (seed), with the \r redraws a terminal hides.
RECORDED = (
    b"\r02054141.001.52628.fcs                          0%    0KB             00:00 ETA"
    b"\r02054141.001.52628.fcs                         54%  128KB 3.1Mb/s    00:00 ETA"
    b"\r02054141.001.52628.fcs                        100%  236KB             --:--    \n"
    b"Completed: 236K bytes transferred in 0 seconds\n"
    b" (3548K bits/sec), in 1 file.\n"
)


def split_all(data: bytes, step: int) -> list[tuple[str, str]]:
    s = LineSplitter()
    out: list[tuple[str, str]] = []
    for i in range(0, len(data), step):
        out += s.feed(data[i:i + step])
    return out + s.flush()


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_splitter_cuts_redraws_and_lines_whatever_the_read_size(step: int) -> None:
    lines = split_all(b"a\rb\r\nc\nd\r\re", step)
    assert lines == [("a", "\r"), ("b", "\n"), ("c", "\n"), ("d", "\r"), ("", "\r"), ("e", "")]


def test_splitter_bounds_a_line_that_never_ends() -> None:
    s = LineSplitter(limit=10)
    out = s.feed(b"x" * 25)
    assert out == [("x" * 25, "")]  # handed over in one piece once past the limit, not kept growing
    assert s.flush() == []


def test_splitter_keeps_utf8_split_across_reads() -> None:
    data = "données \u00e9t\u00e9 100%\n".encode()
    assert split_all(data, 1) == [("données \u00e9t\u00e9 100%", "\n")]


def test_recorded_session_gives_progress_then_summary() -> None:
    parser = ConsoleParser()
    lines = [parser.stdout_line(t, term) for t, term in split_all(RECORDED, 13)]
    progress = [p for p in lines if p is not None]
    assert [p.percent for p in progress] == [0, 54, 100]
    assert [p.size for p in progress] == [0, 128 * 1024, 236 * 1024]
    assert progress[1].rate_bps == pytest.approx(3.1e6)
    assert [p.done for p in progress] == [False, False, True]
    assert {p.name for p in progress} == {"02054141.001.52628.fcs"}
    assert parser.summary is not None
    assert (parser.summary.partial, parser.summary.bytes, parser.summary.files) == (False, 236 * 1024, 1)
    assert parser.stop_error is None


@pytest.mark.parametrize(
    ("line", "name", "pct", "size", "rate", "eta"),
    [
        ("SneABir008_lib1-Ex1-9H-lcwgs-1-1.2.fq.gz       42%   21MB 97.2Mb/s    00:02 ETA",
         "SneABir008_lib1-Ex1-9H-lcwgs-1-1.2.fq.gz", 42, 21 << 20, 97.2e6, "00:02"),
        ("02054142.001.52644.fcs                          100% 1487KB             --:--    ",
         "02054142.001.52644.fcs", 100, 1487 << 10, None, "--:--"),
        ("set 2/c d 50% off.bin   7% 9999B 1.0Gb/s    01:02:03 ETA", "set 2/c d 50% off.bin", 7, 9999, 1e9,
         "01:02:03"),
        ("tiny.txt 100%    6 B 0.1Kb/s    --:--", "tiny.txt", 100, 6, 100.0, "--:--"),
    ],
)
def test_progress_line_fields(line: str, name: str, pct: int, size: int, rate: float | None, eta: str) -> None:
    p = parse_progress_line(line)
    assert p is not None
    assert (p.name, p.percent, p.size, p.eta) == (name, pct, size, eta)
    assert p.rate_bps == (pytest.approx(rate) if rate is not None else None)


def test_a_redrawn_100_percent_line_with_an_eta_is_not_yet_done() -> None:
    p = parse_progress_line("a.bin   100%  292KB 1434.1Mb/s    00:00 ETA", "\r")
    assert p is not None and not p.done
    last = parse_progress_line("a.bin   100%  292KB 1434.1Mb/s    --:--", "\n")
    assert last is not None and last.done


@pytest.mark.parametrize("line", ["", "Completed", "ascp: failed to authenticate, exiting.", "LOG FASP Session Start",
                                  "Session Stop  (Error: failed to authenticate)"])
def test_non_progress_lines(line: str) -> None:
    assert parse_progress_line(line) is None


def test_partial_completion_and_session_stop() -> None:
    parser = ConsoleParser()
    for text in ["\n", "Session Stop  (Error: Connection lost)",
                 "Partial Completion: 97K bytes transferred in 3 seconds",
                 " (565025K bits/sec), in 2 files, 1 file failed."]:
        assert parser.stdout_line(text) is None
    assert parser.stop_error == "Connection lost"
    s = parser.summary
    assert s is not None and (s.partial, s.bytes, s.seconds, s.files, s.failed) == (True, 97 << 10, 3.0, 2, 1)


def test_stop_message_keeps_inner_parentheses_and_stderr_is_tailed() -> None:
    parser = ConsoleParser(tail=3)
    parser.stdout_line("Session Stop  (Error: Server aborted session: No such file or directory (x))")
    assert parser.stop_error == "Server aborted session: No such file or directory (x)"
    for i in range(5):
        parser.stderr_line(f"LOG line {i}")
    parser.stderr_line("ascp: Failed to open TCP connection for SSH, exiting.")
    assert parser.stderr_error == "Failed to open TCP connection for SSH"
    assert parser.stderr_tail == ["LOG line 3", "LOG line 4", "ascp: Failed to open TCP connection for SSH, exiting."]
    parser.stderr_line("Usage: ascp [-{ATdpqv}] ...")
    assert parser.usage


def test_sizes_and_rates() -> None:
    assert parse_size("236KB") == 236 * 1024
    assert parse_size("236K") == 236 * 1024
    assert parse_size("9999") == 9999
    assert parse_size("1.5 GB") == int(1.5 * (1 << 30))
    assert parse_rate("3548K bits/sec") == pytest.approx(3.548e6)
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        parse_rate("fast")


# -- management port -------------------------------------------------------------------------------------

FRAMES = (
    "FASPMGR 2\nType: INIT\nDirection: Send\nOperation: Transfer\n"
    "SessionId: f8fdea60-e416-4a17-a488-9abe093290a9\n\n"
    "FASPMGR 2\nType: STATS\nFile: /data/set1/a.bin\nSize: 300000\nStartByte: 100000\nTransferBytes: 4096\n"
    "Rate: 9000\n\n"
    "FASPMGR 2\nType: ERROR\nCode: 5\nDescription: Server aborted session: Read access denied for user\n"
    "Loss: 0\n\n"
    "FASPMGR 2\nType: DONE\nCode: 5\nDescription: \n\n"
)


def test_management_frames() -> None:
    parser = FaspMgrParser()
    frames = parser.feed_text(FRAMES)
    assert [f["Type"] for f in frames] == ["INIT", "STATS", "ERROR", "DONE"]
    assert frames[1]["File"] == "/data/set1/a.bin" and frames[1]["StartByte"] == "100000"
    assert frames[2]["Description"] == "Server aborted session: Read access denied for user"
    assert frames[3]["Description"] == ""
    assert parser.garbage == 0


def test_management_values_are_unescaped_and_only_one_space_is_syntax() -> None:
    name = "/dir\nwith\rspecial\x1b/file"
    assert unescape_value(escape_value(name)) == name
    parser = FaspMgrParser()
    text = f"FASPMGR 2\nType: STOP\nFile: {escape_value(name)}\nDescription: error: details\nUser:  two\n\n"
    (frame,) = parser.feed_text(text)
    assert frame == {"Type": "STOP", "File": name, "Description": "error: details", "User": " two"}
    assert unescape_value("a\x1bxb") == "a\x1bxb"  # unknown escapes are kept


def test_management_garbage_is_skipped_not_raised() -> None:
    parser = FaspMgrParser()
    frames = parser.feed_text("Type: DONE\nFASPMGR 2\nType: STATS\nnonsense\nFASPMGR 2\nType: DONE\n\n")
    assert frames == [{"Type": "DONE"}]  # the unfinished STATS frame was dropped at the new header
    assert parser.garbage == 3


# -- failures --------------------------------------------------------------------------------------------

def test_authentication_failure_is_permanent_with_ascps_words() -> None:
    exc = classify(returncode=1, message="failed to authenticate")
    assert isinstance(exc, errors.AuthError)
    assert "failed to authenticate" in str(exc) and exc.status == 1 and exc.hint


@pytest.mark.parametrize("code", [12, 13, 14, 15, 16, 17, 18, 23, 32, 33, 35, 36, 37, 39, 40, 44, 45, 61])
def test_retryable_codes_are_transient(code: int) -> None:
    assert isinstance(classify(returncode=1, message="x", code=code), errors.TransientError)


@pytest.mark.parametrize("code", [4, 5, 6, 19, 20, 25, 27, 41, 66])
def test_other_codes_are_permanent(code: int) -> None:
    exc = classify(returncode=1, message="x", code=code)
    assert isinstance(exc, errors.PermanentError) and f"FASP error {code}" in str(exc)


def test_console_texts_map_to_codes() -> None:
    assert code_from_text("Failed to open TCP connection for SSH") == 12
    assert code_from_text("Connection lost") == 16
    assert code_from_text("Data transfer stalled, timed out") == 40
    assert code_from_text("Server aborted session: No such file or directory") == 4
    assert code_from_text("something new") is None
    exc = classify(returncode=1, message="Failed to open TCP connection for SSH")
    assert isinstance(exc, errors.TransientError) and "33001" in (exc.hint or "")
    missing = classify(returncode=1, message="Server aborted session: No such file or directory")
    assert isinstance(missing, errors.PermanentError) and "No such file" in str(missing)


def test_usage_signals_and_unknown_failures() -> None:
    usage = classify(returncode=112, message=None, stderr_tail=["Usage: ascp ..."])
    assert isinstance(usage, errors.PermanentError) and "command line" in str(usage)
    killed = classify(returncode=-9, message=None)
    assert isinstance(killed, errors.TransientError) and "signal 9" in str(killed)
    odd = classify(returncode=3, message="a brand new failure")
    assert isinstance(odd, errors.TransientError) and "a brand new failure" in str(odd)


def test_scrub_hides_secrets() -> None:
    assert scrub("bad token s3cr3t for s3cr3t", ["s3cr3t", None, ""]) == "bad token *** for ***"


# -- a session's account -----------------------------------------------------------------------------------

Seen = list[tuple[str, int, int | None, bool]]


def recorder(seen: Seen) -> Report:
    def report(name: str, nbytes: int, total: int | None, rate: float | None, done: bool) -> int:
        seen.append((name, nbytes, total, done))
        return 0
    return report


def test_frames_give_exact_bytes_with_resume_offsets_and_relative_names() -> None:
    seen: Seen = []
    acc = SessionAccount(recorder(seen), send=True, roots=[Path("/data")], management=True)
    frames = (
        "FASPMGR 2\nType: INIT\n\n"
        "FASPMGR 2\nType: START\nFile: /data/set1/a.bin\nSize: 1000\nStartByte: 400\nTransferBytes: 0\n\n"
        "FASPMGR 2\nType: STATS\nFile: /data/set1/a.bin\nSize: 1000\nTransferBytes: 300\n\n"
        "FASPMGR 2\nType: STOP\nFile: /data/set1/a.bin\nSize: 1000\nTransferBytes: 600\n\n"
        "FASPMGR 2\nType: STATS\nFile: /elsewhere/b.bin\nSize: 50\nTransferBytes: 620\n\n"  # no START
        "FASPMGR 2\nType: STOP\nFile: /elsewhere/b.bin\nSize: 50\nTransferBytes: 650\n\n"
        "FASPMGR 2\nType: FILEERROR\nFile: /data/c.bin\nCode: 4\nDescription: No such file or directory\n\n"
        "FASPMGR 2\nType: ERROR\nCode: 16\nDescription: Connection lost\n\n"
    )
    for line in frames.split("\n"):
        acc.mgr_line(line)
    acc.stdout_line("set1/a.bin   10%  100KB 1.0Mb/s    00:01 ETA", "\r")  # ignored: frames rule
    assert seen == [("set1/a.bin", 400, 1000, False), ("set1/a.bin", 700, 1000, False),
                    ("set1/a.bin", 1000, 1000, True), ("/elsewhere/b.bin", 20, 50, False),
                    ("/elsewhere/b.bin", 50, 50, True)]
    assert (acc.moved, acc.completed, acc.partial) == (650, 2, True)
    err = acc.failure(1, [])
    assert isinstance(err, errors.TransientError) and "Connection lost (FASP error 16" in str(err)
    assert acc.failure(0, []) is None


def test_console_sizes_become_exact_when_the_local_copy_is_found(tmp_path: Path) -> None:
    (tmp_path / "SDY1").mkdir()
    (tmp_path / "SDY1" / "x.fcs").write_bytes(b"x" * 242_048)
    seen: Seen = []
    acc = SessionAccount(recorder(seen), send=False, roots=[tmp_path], management=False)
    acc.stdout_pending("SDY1/x.fcs   54%  128KB 3.1Mb/s    00:00 ETA")  # a redraw not yet ended
    acc.stdout_line("SDY1/x.fcs  100%  236KB             --:--", "\n")
    acc.stdout_line("Completed: 236K bytes transferred in 0 seconds", "\n")
    acc.stdout_line(" (3548K bits/sec), in 1 file.", "\n")
    assert seen == [("SDY1/x.fcs", 128 * 1024, None, False), ("SDY1/x.fcs", 242_048, 242_048, True)]
    assert (acc.moved, acc.completed, acc.partial) == (236 * 1024, 1, False)
    acc.stderr_line("ascp: failed to authenticate, exiting.")
    err = acc.failure(1, ["hunter2"])
    assert isinstance(err, errors.AuthError)
