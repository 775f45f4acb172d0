"""Parsers for what ``ascp`` says: its console output, its management-port frames, its failures.

Nothing here runs a process: :mod:`asyncdepo.engine.ascp` feeds :class:`SessionAccount` from the child's
pipes and management socket, and it turns what ascp said into per-file progress and an outcome. All of
it is pure and synchronous, so the unit tests feed it recorded text.

Console (stdout). Progress lines are redrawn in place with ``\\r``; a file's last line ends with ``\\n``::

    02054141.001.52628.fcs                        100%  236KB             --:--
    SneABir008_lib1-Ex1-9H-lcwgs-1-1.2.fq.gz       42%   21MB 97.2Mb/s    00:02 ETA
    Completed: 236K bytes transferred in 0 seconds
     (3548K bits/sec), in 1 file.

The size column is what has arrived of that file, in scp style: whole units, switching to the next
unit at 10000 (``9999B`` -> ``10KB``), so it is exact only below 10000 bytes. ``Partial Completion:``
replaces ``Completed:`` when some files failed; ``Session Stop  (Error: <text>)`` reports a failed
session, and stderr carries ``ascp: <text>, exiting.``.

Management port (``-M port``): ascp connects to our listener and writes frames: a ``FASPMGR 2`` line,
``Key: Value`` lines (one space after the colon is part of the syntax, the rest of the value is kept;
newline, carriage return and ESC inside values are escaped as ESC n, ESC r, ESC ESC), then a blank line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath

from asyncdepo import errors

# FASP error codes (the number in a management ERROR/FILEERROR frame's ``Code``) and their meaning.
# Which ones are worth retrying is the client's call, not the protocol's; this set follows the
# retryable list of Aspera's own transfer SDK (network, timeouts, resources, busy server).
FASP_ERRORS: dict[int, str] = {
    1: "Generic fasp protocol error", 2: "Generic SCP error", 3: "Target incorrectly specified",
    4: "No such file or directory", 5: "Insufficient permission to read or write",
    6: "Target is not a directory", 7: "File is a directory - expected regular file",
    8: "Incorrect usage of scp command", 9: "Duplicate license", 10: "Rate exceeds the cap imposed by license",
    11: "Internal error (unexpected error)", 12: "Error establishing control connection",
    13: "Timeout establishing control connection", 14: "Error establishing data connection",
    15: "Timeout establishing data connection", 16: "Connection lost", 17: "Receiver fails to send feedback",
    18: "Receiver fails to receive data packets", 19: "Authentication failure", 20: "Nothing to transfer",
    21: "Not a regular file (special file)", 22: "File table overflow", 23: "Too many files open",
    24: "File too big for file system", 25: "No space left on disk", 26: "Read only file system",
    27: "Some individual files failed", 28: "Cancelled by user", 29: "License not found or unable to access",
    30: "License expired", 31: "Unable to setup socket", 32: "Out of memory, unable to allocate",
    33: "Can't spawn thread", 34: "Unauthorized by external auth server",
    35: "Error reading source file from disk", 36: "Error writing to disk", 37: "Authorization failure",
    38: "Operation not permitted by license", 39: "Remote peer terminated session",
    40: "Transfer stalled, timed out", 41: "Path violates docroot containment",
    42: "File or directory already exists", 43: "Cannot stat file", 44: "UDP session initiation fatal error",
    45: "Bandwidth measurement fatal error", 46: "Virtual link error", 47: "Error establishing HTTP connection",
    48: "File encryption error", 49: "File decryption error, bad passphrase",
    50: "aspera.conf contains invalid data", 51: "Remote-host key check failure",
    52: "File start validation failed", 53: "File stop validation failed",
    54: "File threshold validation failed", 55: "File path/name too long for file system",
    56: "Path contains illegal characters", 57: "Chunk size/start must be aligned with storage",
    58: "Session aborted due to validation error", 59: "Remote storage errored",
    60: "Session aborted due to Lua script abort", 61: "Retryable encryption-at-rest error",
    62: "Fatal encryption-at-rest error", 63: "Path refers to a symbolic link loop",
    64: "Can't rename a partial file", 65: "Cipher not usable in FIPS mode", 66: "Peer requires FIPS",
}
RETRYABLE_CODES = frozenset({12, 13, 14, 15, 16, 17, 18, 23, 32, 33, 35, 36, 37, 39, 40, 44, 45, 61})
AUTH_CODES = frozenset({19, 34})
USAGE_EXIT = 112  # ascp run without (valid) arguments prints its usage and exits with this status

# Text ascp prints -> FASP code, for console-only sessions (no management port to give the code).
# Checked in order, on the lower-cased message; the first match wins.
_TEXT_CODES: tuple[tuple[str, int], ...] = (
    ("failed to authenticate", 19), ("authentication fail", 19), ("permission denied (publickey", 19),
    ("unauthorized", 34), ("failed to open tcp connection", 12), ("ssh connection", 12),
    ("control connection", 12), ("connection refused", 12), ("connection lost", 16),
    ("connection reset", 16), ("timed out", 40), ("stalled", 40), ("peer aborted", 39),
    ("no such file or directory", 4), ("docroot", 41), ("permission", 5), ("no space left", 25),
    ("read only file system", 26), ("not a directory", 6), ("is a directory", 7),
)


# -- console -------------------------------------------------------------------------------------------

class LineSplitter:
    """Cuts a byte stream into lines at ``\\r``, ``\\n`` or ``\\r\\n``, remembering which ended each line.

    ``feed`` returns ``(text, terminator)`` pairs (terminator ``"\\r"`` for a redraw, ``"\\n"`` for a
    finished line); ``flush`` returns the unterminated rest at EOF with terminator ``""``. A line longer
    than ``limit`` bytes is cut there, so a child that never ends a line cannot grow our memory.
    """

    def __init__(self, limit: int = 64 * 1024) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._held: str | None = None  # a line whose "\r" ended a read: "\r\n" or a redraw? next read says

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        i, n = 0, len(data)
        if self._held is not None and n:
            out.append((self._held, "\n" if data[:1] == b"\n" else "\r"))
            self._held = None
            i = 1 if data[:1] == b"\n" else 0
        while i < n:
            j = _next_break(data, i)
            if j < 0:
                self._buf += data[i:]
                break
            self._buf += data[i:j]
            if data[j:j + 1] == b"\n":
                out.append((self._take(), "\n"))
            elif j + 1 == n:
                self._held = self._take()
            elif data[j + 1:j + 2] == b"\n":
                out.append((self._take(), "\n"))
                j += 1
            else:
                out.append((self._take(), "\r"))
            i = j + 1
        if len(self._buf) > self._limit:
            out.append((self._take(), ""))
        return out

    @property
    def pending(self) -> str:
        """The unterminated text so far: ascp writes ``\\r`` *before* each redraw, so the latest progress
        line stays unterminated until the next one (or forever, when the transfer stalls)."""
        return self._buf.decode("utf-8", "replace")

    def flush(self) -> list[tuple[str, str]]:
        out = [(self._held, "\r")] if self._held is not None else []
        self._held = None
        return out + ([(self._take(), "")] if self._buf else [])

    def _take(self) -> str:
        text = self._buf.decode("utf-8", "replace")
        self._buf.clear()
        return text


def _next_break(data: bytes, i: int) -> int:
    r, n = data.find(b"\r", i), data.find(b"\n", i)
    if r < 0:
        return n
    return r if n < 0 else min(r, n)


@dataclasses.dataclass(frozen=True)
class ProgressLine:
    """One console progress line: ``size`` bytes of ``name`` have arrived (exact below 10000 bytes)."""

    name: str
    percent: int
    size: int
    rate_bps: float | None  # bits per second as ascp prints it, None when the column is blank
    final: bool  # the line ended with "\n" (ascp's last line for that file) rather than a "\r" redraw
    eta: str | None = None  # "00:02" while running, "--:--" once the file is complete

    @property
    def done(self) -> bool:
        """The file is complete: 100 % on its last line, or with the ``--:--`` ETA ascp shows then."""
        return self.percent >= 100 and (self.final or self.eta == "--:--")


@dataclasses.dataclass
class Summary:
    """The ``Completed:`` / ``Partial Completion:`` block (sizes have the precision ascp prints)."""

    partial: bool
    bytes: int
    seconds: float
    files: int | None = None
    failed: int = 0


_SIZE = r"\d+(?:\.\d+)?\s?[KMGTP]?B?"
_PROGRESS = re.compile(
    rf"^(?P<name>.*?\S)\s+(?P<pct>\d{{1,3}})%\s+(?P<size>{_SIZE})"
    r"(?:\s+(?P<rate>\d+(?:\.\d+)?\s?[KMGT]?b(?:it)?s?/s(?:ec)?))?"
    r"(?:\s+(?P<eta>--:--|\d+:\d\d(?::\d\d)?)(?:\s+ETA)?)?\s*$")
_SUMMARY = re.compile(
    r"^(?P<kind>Completed|Partial Completion):\s*(?P<size>\d+(?:\.\d+)?\s?[KMGTP]?)\s*bytes?\s+transferred"
    r"(?:\s+in\s+(?P<secs>\d+(?:\.\d+)?)\s+seconds?)?")
_SUMMARY_TAIL = re.compile(r"in\s+(?P<files>\d+)\s+files?(?:,\s*(?P<failed>\d+)\s+files?\s+failed)?")
_STOP = re.compile(r"Session Stop\s*\(Error:\s*(?P<msg>.*)\)\s*$")
_ASCP_ERR = re.compile(r"^ascp:\s*(?P<msg>.*?)(?:,\s*exiting\.?)?\s*$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RATE_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> int:
    """``"236KB"`` -> 241664, ``"21MB"``, ``"512B"``, ``"236K"``, ``"9999"`` (binary units, as ascp prints).

    :raises ValueError: when ``text`` is not a size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s?([KMGTP]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_rate(text: str) -> float:
    """``"97.2Mb/s"`` -> 97.2e6 bits per second (decimal units, as ascp prints rates).

    :raises ValueError: when ``text`` is not a rate.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s?([KMGT]?)\s?b.*", text)
    if not m:
        raise ValueError(f"not a rate: {text!r}")
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def parse_progress_line(text: str, terminator: str = "\r") -> ProgressLine | None:
    """The progress line in ``text`` (one console line without its terminator), else None."""
    m = _PROGRESS.match(text.strip())
    if m is None:
        return None
    rate = m.group("rate")
    return ProgressLine(name=m.group("name").strip(), percent=min(100, int(m.group("pct"))),
                        size=parse_size(m.group("size")), rate_bps=parse_rate(rate) if rate else None,
                        final=terminator == "\n", eta=m.group("eta"))


class ConsoleParser:
    """Turns ascp's stdout/stderr lines into progress lines and session facts.

    ``stdout_line`` returns the :class:`ProgressLine` a line carried (or None) and records the summary
    (``summary``) and ``Session Stop`` text (``stop_error``); ``stderr_line`` records ``ascp: ...``
    messages (``stderr_error``) and keeps the last ``tail`` stderr lines (``stderr_tail``) for messages.
    """

    def __init__(self, tail: int = 20) -> None:
        self.summary: Summary | None = None
        self.stop_error: str | None = None
        self.stderr_error: str | None = None
        self.usage = False
        self.stderr_tail: list[str] = []
        self._tail = tail
        self._in_summary = False

    def stdout_line(self, text: str, terminator: str = "\n") -> ProgressLine | None:
        line = text.strip()
        if not line:
            return None
        if self._in_summary:
            self._in_summary = False
            m = _SUMMARY_TAIL.search(line)
            if m and self.summary is not None:
                self.summary.files = int(m.group("files"))
                self.summary.failed = int(m.group("failed") or 0)
                return None
        if (m := _SUMMARY.match(line)) is not None:
            self.summary = Summary(partial=m.group("kind") != "Completed", bytes=parse_size(m.group("size")),
                                   seconds=float(m.group("secs") or 0.0))
            tail = _SUMMARY_TAIL.search(line)  # some versions print it all on one line
            if tail:
                self.summary.files = int(tail.group("files"))
                self.summary.failed = int(tail.group("failed") or 0)
            else:
                self._in_summary = True
            return None
        if (m := _STOP.search(line)) is not None:
            self.stop_error = m.group("msg").strip()
            return None
        if line.startswith("Usage:"):
            self.usage = True
            return None
        return parse_progress_line(line, terminator)

    def stderr_line(self, text: str) -> None:
        line = text.strip()
        if not line:
            return
        self.stderr_tail.append(line)
        del self.stderr_tail[:-self._tail]
        if line.startswith("Usage:"):
            self.usage = True
        elif (m := _ASCP_ERR.match(line)) is not None and m.group("msg"):
            self.stderr_error = m.group("msg")


# -- management port -----------------------------------------------------------------------------------

MGR_HEADER = "FASPMGR 2"


def unescape_value(value: str) -> str:
    """Undo ascp's escaping of ESC n / ESC r / ESC ESC in management values (unknown pairs are kept)."""
    if "\x1b" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\x1b" and i + 1 < len(value) and value[i + 1] in "nr\x1b":
            out.append({"n": "\n", "r": "\r", "\x1b": "\x1b"}[value[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def escape_value(value: str) -> str:
    """The inverse of :func:`unescape_value` (the stand-in ascp writes frames with it)."""
    return value.replace("\x1b", "\x1b\x1b").replace("\n", "\x1bn").replace("\r", "\x1br")


class FaspMgrParser:
    """Line-by-line parser of management frames: ``feed_line`` returns a frame's dict when it ends.

    Malformed input is skipped rather than raised (a progress channel must not kill a transfer): a
    field before any header or a line without ``": "`` is counted in ``garbage``; a new header discards
    an unfinished frame.
    """

    def __init__(self) -> None:
        self._frame: dict[str, str] | None = None
        self.garbage = 0

    def feed_line(self, line: str) -> dict[str, str] | None:
        line = line.rstrip("\r\n")
        if line == MGR_HEADER:
            if self._frame:
                self.garbage += 1
            self._frame = {}
            return None
        if line == "":
            frame, self._frame = self._frame, None
            return frame
        key, sep, value = line.partition(":")
        if self._frame is None or not sep or not key:
            self.garbage += 1
            return None
        self._frame[key] = unescape_value(value.removeprefix(" "))
        return None

    def feed_text(self, text: str) -> list[dict[str, str]]:
        """All frames completed by the lines of ``text`` (for tests and recorded streams)."""
        return [f for f in (self.feed_line(x) for x in text.split("\n")) if f is not None]


def frame_int(frame: dict[str, str], key: str) -> int | None:
    """``frame[key]`` as an int, None when missing or not a number."""
    try:
        return int(frame[key])
    except (KeyError, ValueError):
        return None


# -- failures ------------------------------------------------------------------------------------------

def code_from_text(text: str | None) -> int | None:
    """The FASP code an ascp message stands for (``"failed to authenticate"`` -> 19), None if unknown."""
    if not text:
        return None
    low = text.lower()
    for needle, code in _TEXT_CODES:
        if needle in low:
            return code
    for code, meaning in FASP_ERRORS.items():
        if meaning.lower() in low:
            return code
    return None


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every non-empty secret value replaced by ``***`` (belt and braces for messages)."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def classify(
    *,
    returncode: int | None,
    message: str | None,
    code: int | None = None,
    usage: bool = False,
    stderr_tail: Sequence[str] = (),
) -> errors.TransferError:
    """Map one failed ascp session to the error tree, keeping ascp's own words.

    ``message`` is the best text ascp gave (management ``Description``, ``Session Stop`` text or the
    ``ascp: ...`` stderr line); ``code`` the FASP code when a management frame carried one.
    Authentication codes/texts -> AuthError; retryable codes -> TransientError; other known codes and
    usage errors (exit 112, ``Usage:``) -> PermanentError; death by a signal -> TransientError. A failure
    with no recognisable cause is TransientError: ``-k`` makes a rerun cheap, and attempts are bounded.
    """
    if code is None:
        code = code_from_text(message)
    text = message or (stderr_tail[-1] if stderr_tail else None)
    if not text:
        text = (f"killed by signal {-returncode}" if returncode is not None and returncode < 0
                else f"exited with status {returncode}")
    what = f"ascp: {text}" + (f" (FASP error {code}: {FASP_ERRORS.get(code, 'unknown')})" if code else "")
    status = returncode
    if code in AUTH_CODES:
        return errors.AuthError(what, status=status, hint=(
            "check the transfer password (ASPERA_SCP_PASS) or token, the user name and the key file"))
    if code in RETRYABLE_CODES:
        hint = None
        if code in (12, 13):
            hint = "check that the server's TCP port (ascp -P, 33001 by default) is not blocked by a firewall"
        elif code in (14, 15, 44):
            hint = "check that the UDP port (ascp -O, 33001 by default) is open in both directions"
        return errors.TransientError(what, status=status, hint=hint)
    if code is not None:
        return errors.PermanentError(what, status=status)
    if usage or returncode == USAGE_EXIT:
        return errors.PermanentError(f"ascp rejected its command line: {text}", status=status,
                                     hint="check the ascp version and the extra options passed to it")
    return errors.TransientError(what, status=status)


# -- one session's account -----------------------------------------------------------------------------

Report = Callable[[str, int, int | None, float | None, bool], int | None]


class SessionAccount:
    """What one ascp session said, as per-file observations and an outcome.

    Each observation goes to ``report(name, nbytes, total, rate_bps, done)``, which returns the delta it
    counted (None: nothing new); ``name`` is relative to ``roots`` when ascp gave an absolute path under
    one. With ``management`` set, frames drive progress (exact) and console progress lines are ignored.
    From the console, sizes have ascp's display precision; at ``done`` the local copy is stat'ed under
    ``roots`` (``send``: the source, known from the start; recv: the written file, known at the end).
    """

    def __init__(self, report: Report, *, send: bool, roots: Sequence[Path], management: bool) -> None:
        self._report, self.send, self.roots, self.management = report, send, list(roots), management
        self.console = ConsoleParser()
        self._mgr = FaspMgrParser()
        self.delta_sum = 0   # what the reports counted
        self.files = 0       # files completed
        self._name: str | None = None
        self._total: int | None = None
        # management state: the current file, the session's TransferBytes when it started, its resume
        # offset (StartByte), the session's TransferBytes so far, the failure frames
        self.frames = 0
        self._mfile: str | None = None
        self._mbase = 0
        self._mstart = 0
        self.mgr_bytes = 0
        self.error: tuple[int | None, str] | None = None
        self.file_error: tuple[int | None, str] | None = None
        self.file_errors = 0

    def _observe(self, name: str, nbytes: int, total: int | None, rate: float | None, done: bool) -> None:
        delta = self._report(name, nbytes, total, rate, done)
        if delta is not None:
            self.delta_sum += delta
            self.files += done

    def display(self, name: str) -> str:
        if os.path.isabs(name):
            for root in self.roots:
                try:
                    return PurePath(name).relative_to(root).as_posix()
                except ValueError:
                    continue
        return name

    def local_size(self, name: str) -> int | None:
        """Size of the local copy of ``name`` (send: the source; recv: the written file), if found."""
        for root in self.roots:
            try:
                if os.path.isfile(path := root / name):
                    return os.stat(path).st_size
            except (OSError, ValueError):
                continue
        return None

    # console -------------------------------------------------------------------------------------------
    def stdout_line(self, text: str, terminator: str) -> None:
        line = self.console.stdout_line(text, terminator)
        if line is not None and not self.management:
            self._line(line)

    def stdout_pending(self, text: str) -> None:
        """The unterminated redraw (see :attr:`LineSplitter.pending`): progress as soon as it is printed."""
        if not self.management and text and (line := parse_progress_line(text, "")) is not None:
            self._line(line)

    def stderr_line(self, text: str) -> None:
        self.console.stderr_line(text)

    def _line(self, line: ProgressLine) -> None:
        if line.name != self._name:
            self._name = line.name
            self._total = self.local_size(line.name) if self.send else None
        total = self._total if self._total is not None or not line.done else self.local_size(line.name)
        nbytes = line.size if total is None else (total if line.done else min(line.size, total))
        self._observe(line.name, nbytes, total, line.rate_bps, line.done)

    # management port -------------------------------------------------------------------------------------
    def mgr_line(self, text: str) -> None:
        if (frame := self._mgr.feed_line(text)) is not None:
            self.frame(frame)

    def frame(self, f: dict[str, str]) -> None:
        self.frames += 1
        kind = f.get("Type", "")
        if kind in ("START", "STATS", "STOP"):
            sent, name = frame_int(f, "TransferBytes"), f.get("File")
            if name is not None and name != self._mfile:
                # a new file: its bytes are its resume offset plus what the session moves from here on
                self._mfile = name
                self._mbase = sent if kind == "START" and sent is not None else self.mgr_bytes
                self._mstart = frame_int(f, "StartByte") or 0
            elif kind == "START" and (start := frame_int(f, "StartByte")) is not None:
                self._mstart = start
            if sent is not None:
                self.mgr_bytes = max(self.mgr_bytes, sent)
            if self._mfile is None:
                return
            size = frame_int(f, "Size")
            nbytes = self._mstart + max(0, self.mgr_bytes - self._mbase)
            if size is not None:
                nbytes = size if kind == "STOP" else min(nbytes, size)
            rate = frame_int(f, "Rate")  # kbit/s
            self._observe(self.display(self._mfile), nbytes, size, rate * 1e3 if rate else None, kind == "STOP")
            if kind == "STOP":
                self._mfile = None
        elif kind == "FILEERROR":
            self.file_errors += 1
            if self.file_error is None:
                where, text = f.get("File", ""), f.get("Description") or "file failed"
                self.file_error = (frame_int(f, "Code"), f"{self.display(where)}: {text}" if where else text)
        elif kind == "ERROR":
            self.error = (frame_int(f, "Code"), f.get("Description") or "session failed")

    # outcome ---------------------------------------------------------------------------------------------
    @property
    def moved(self) -> int:
        """Bytes ascp moved: management TransferBytes (exact), else ``Completed:`` (KB), else the reports."""
        if self.management and self.frames:
            return self.mgr_bytes
        return self.console.summary.bytes if self.console.summary is not None else self.delta_sum

    @property
    def completed(self) -> int:
        summary = self.console.summary
        return max(self.files, summary.files or 0) if summary is not None else self.files

    @property
    def partial(self) -> bool:
        return bool(self.console.summary is not None and self.console.summary.partial) or self.file_errors > 0

    def failure(self, returncode: int | None, secrets: Iterable[str | None]) -> errors.TransferError | None:
        """None when ascp exited 0, else the classified error (scrubbed of ``secrets``)."""
        if returncode == 0:
            return None
        code, message = self.error or self.file_error or (None, None)
        message = message or self.console.stop_error or self.console.stderr_error
        hide = list(secrets)
        return classify(returncode=returncode, message=scrub(message, hide) if message else None, code=code,
                        usage=self.console.usage, stderr_tail=[scrub(x, hide) for x in self.console.stderr_tail])
