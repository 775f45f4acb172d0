"""Parsers for what ``ascp`` says on its console, and the account of one session built from all it says.

Nothing here runs a process: :mod:`asyncdepo.transport.ascp.runner` feeds :class:`SessionAccount` from the child's
pipes and management socket, and it turns what ascp said into per-file progress and an outcome. All of
it is pure and synchronous, so the unit tests feed it recorded text. The management-port frames, the FASP
error table and the classification of failures live in :mod:`asyncdepo.transport.ascp.faspmgr`; every
public name there is re-exported here, so ``ascp_parse`` stays the one import for ascp's output.

Console (stdout). Progress lines are redrawn in place with ``\\r``; a file's last line ends with ``\\n``::

    02054141.001.52628.fcs                        100%  236KB             --:--
    SneABir008_lib1-Ex1-9H-lcwgs-1-1.2.fq.gz       42%   21MB 97.2Mb/s    00:02 ETA
    Completed: 236K bytes transferred in 0 seconds
     (3548K bits/sec), in 1 file.

The size column is what has arrived of that file, in scp style: whole units, switching to the next
unit at 10000 (``9999B`` -> ``10KB``), so it is exact only below 10000 bytes. ``Partial Completion:``
replaces ``Completed:`` when some files failed; ``Session Stop  (Error: <text>)`` reports a failed
session, and stderr carries ``ascp: <text>, exiting.``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath

from asyncdepo import errors
from asyncdepo.transport.ascp.faspmgr import (
    AUTH_CODES,
    FASP_ERRORS,
    MGR_HEADER,
    RETRYABLE_CODES,
    USAGE_EXIT,
    FaspMgrParser,
    classify,
    code_from_text,
    escape_value,
    frame_int,
    scrub,
    unescape_value,
)

# this module's names, and every public name of ascp_faspmgr (re-exported)
__all__ = (
    "AUTH_CODES", "FASP_ERRORS", "MGR_HEADER", "RETRYABLE_CODES", "USAGE_EXIT", "ConsoleParser",
    "FaspMgrParser", "LineSplitter", "ProgressLine", "Report", "SessionAccount", "Summary", "classify",
    "code_from_text", "escape_value", "frame_int", "parse_progress_line", "parse_rate", "parse_size", "scrub",
    "unescape_value",
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
                st = os.stat(root / name)  # one call: no window for the file to go between a check and a stat
            except (OSError, ValueError):  # not there (or a name no path can hold): try the next root
                continue
            if stat.S_ISREG(st.st_mode):
                return st.st_size
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
