"""The stand-in ascp's session (:mod:`asyncdepo.sim.ascp`): plan, authenticate, copy with resume and
throttling, inject faults, write counters.

:class:`Session` takes the parsed command line (:class:`Args`) and the environment; ``run()`` moves the
files and raises :class:`SessionError` (``Session Stop`` / ``ascp: ..., exiting.``, with its FASP code),
:class:`Dropped` for the injected lost connection, or :class:`Usage` for path lists that make no sense;
``summary()`` prints the ``Completed:`` block and ``counters(status)`` appends the session's JSON line.

Behaviour: the remote ``path`` maps to ``ROOT/path`` (a leading ``/`` stripped; escaping ROOT fails like
a docroot violation). send copies local files and directories (recursively) there, recv copies them back.
A target that is an existing directory receives ``basename(source)``; with ``-d`` a missing target
directory is created; a single source may name its target file. Data goes to ``<name>.aspx`` and is
renamed into place when complete (real ascp keeps the data under the final name and its resume state
in the ``.aspx`` side file; one file is simpler and keeps incomplete data out of the final name).
Resume: with ``-k 1..3`` an existing ``.aspx`` that is no longer than the source continues from its size
(``-k 1``: size only; ``-k 2/3``: its bytes must equal the source's prefix, else it restarts from 0), and
a complete destination (same size; ``-k 2/3`` same bytes) is skipped; without ``-k`` (or ``-k 0``) every
file is sent from byte 0. ``-l`` really throttles (bits per second, K/M/G suffixes, default unit K).
A source that shrinks while it is sent fails that file (``FILEERROR`` code 35, the part file kept) and the
session goes on with the next one: its end would otherwise never come (see ``copy``).

Lifetime: the client starts the stand-in in a session of its own, so a client killed with SIGKILL takes
nothing with it. A session that is moving data then finishes (or fails) on its own and exits, as real ascp
would. A session *held* by a fault (``stall``, ``wedge``) has nothing left to do once its client is gone:
it waits on :class:`asyncdepo.sim.ascp_client.ClientWatch` (the client's pipes, its management connection and
the parent process, all in one ``poll``; never a busy loop) and ends when the client is gone or after
``ASYNCDEPO_SIM_ASCP_HOLD_LIMIT`` seconds (default 300, above any stall timeout a client uses), failing as a
stalled FASP session (``Transfer stalled, timed out``, code 40, exit 1, counters written, part file kept).

Environment:

* ``ASYNCDEPO_SIM_ASCP_ROOT`` — the storage directory remote paths map into (required for transfers).
* ``ASYNCDEPO_SIM_ASCP_PASSWORD`` — when set, ``ASPERA_SCP_PASS`` must equal it (unless a token is given).
* ``ASYNCDEPO_SIM_ASCP_TOKEN_URL`` — with a token (``-W`` or ``ASPERA_SCP_TOKEN``), POST
  ``{"token": ..., "paths": [remote paths]}`` there; 200 allows the session, anything else fails auth.
* ``ASYNCDEPO_SIM_ASCP_FAIL`` — one fault: ``auth`` | ``drop:N`` (lose the connection after N bytes of
  this session, FASP code 16) | ``stall`` or ``stall:N`` (after N bytes, stop printing and hang until
  signalled, the client is gone or the hold limit passed) | ``wedge`` (hang and ignore SIGTERM: only SIGKILL,
  the client's end or the hold limit end it) | ``noserver`` (no SSH connection, code 12). A ``:once``
  suffix fires it on the first session only (marker under ``ROOT/.ascp-faults/``, created atomically when
  the fault fires: of concurrent sessions, one gets it).
* ``ASYNCDEPO_SIM_ASCP_COUNTERS`` — a file that gets one JSON line per session (also after a failure or
  SIGTERM): ``{"bytes", "files", "resumed_from": {name: offset}, "status", "mode", "met", "rate_bps", "ppid"}``
  (``rate_bps``: the ``-l`` it was given, bits per second, or null; ``ppid``: the process that started it,
  which tells a cluster's workers apart; a session killed with SIGKILL writes no line).
* ``ASYNCDEPO_SIM_ASCP_NOTIFY`` — a path (a FIFO a test reads) that gets ``stalled <pid> <bytes>`` when a stall
  fault fires, so a test can act at that moment (kill the client) without waiting on a clock. It is opened
  without waiting for a reader and held open while the session stalls, so a reader that comes late still
  reads the line.
* ``ASYNCDEPO_SIM_ASCP_HOLD_LIMIT`` — seconds a ``stall`` or ``wedge`` holds at most (default 300).
* ``ASYNCDEPO_SIM_ASCP_MEET`` — ``N``: before moving anything, a session waits (at most 30 s) until N sessions
  have started (markers under ``ROOT/.ascp-meet/``); ``met`` in its counters says whether they did, which
  proves that N sessions ran at once.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from asyncdepo.sim.ascp_client import HOLD_LIMIT, ClientWatch
from asyncdepo.sim.ascp_output import Manager, err, out, progress_line

__all__ = ("Args", "Dropped", "FileFailed", "Job", "Session", "SessionError", "Usage")

STALLED = "Transfer stalled, timed out"  # FASP error 40, as ascp describes it

_REMOTE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[A-Za-z0-9_.\-]{2,}|\[[0-9a-fA-F:]+\]):(?P<path>.*)$")


class Usage(Exception):
    """A bad command line (also raised by the parser in :mod:`asyncdepo.sim.ascp`): print the message
    and the usage, exit 112."""


class SessionError(Exception):
    """The session fails: ``Session Stop  (Error: text)`` on stdout, ``ascp: text, exiting.`` on stderr."""

    def __init__(self, text: str, code: int, *, stop_line: bool = True) -> None:
        super().__init__(text)
        self.code, self.stop_line = code, stop_line


class Dropped(SessionError):
    """The injected drop fault: the connection is lost mid-transfer."""


class FileFailed(Exception):
    """One file fails (``FILEERROR`` frame, ``ascp: name: text`` on stderr); the session goes on with the next."""

    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.code = code


@dataclass
class Args:
    rate_bps: float | None = None
    quiet: bool = False
    create_dir: bool = False
    preserve: bool = False
    resume: int = 0
    log_dir: str | None = None
    token: str | None = None
    mgmt_port: int | None = None
    mode: str | None = None
    host: str | None = None
    user: str | None = None
    file_list: str | None = None
    pair_list: str | None = None
    overwrite: str = "diff"
    paths: list[str] = field(default_factory=list)


@dataclass
class Job:
    src: Path | None  # None: the source is missing
    dst: Path
    name: str  # what the console shows: the path relative to the transfer root


# -- the session -----------------------------------------------------------------------------------------

class Session:
    """One transfer: auth, plan, copy with resume and throttling, faults, counters."""

    def __init__(self, a: Args, env: dict[str, str], watch: ClientWatch | None = None) -> None:
        self.a, self.env = a, env
        self.watch = watch if watch is not None else ClientWatch()
        limit = env.get("ASYNCDEPO_SIM_ASCP_HOLD_LIMIT", "")
        self.hold_limit = float(limit) if re.fullmatch(r"\d+(?:\.\d+)?", limit) else HOLD_LIMIT
        self.root = Path(env["ASYNCDEPO_SIM_ASCP_ROOT"]).resolve() if env.get("ASYNCDEPO_SIM_ASCP_ROOT") else None
        self.fault_spec = env.get("ASYNCDEPO_SIM_ASCP_FAIL", "")
        self.fault, self.fault_n, self.fault_once = _fault(self.fault_spec)
        self.mgr = Manager(a.mgmt_port)
        self.bytes = 0
        self.files = 0
        self.failed = 0
        self.resumed: dict[str, int] = {}
        self.met: bool | None = None
        self.started = time.monotonic()
        self.ppid = os.getppid()  # the client, while it lives (an orphan's getppid() names its reaper)
        self.send_mode = True
        self._last_print = 0.0
        self._pace_start = time.monotonic()

    def fires(self, kind: str) -> bool:
        """True when the configured fault is ``kind`` and may fire now; a ``once`` fault fires only for
        the first session that reaches it (an O_EXCL marker under ROOT/.ascp-faults/)."""
        if self.fault != kind:
            return False
        if self.fault_once:
            marks = (self.root or Path(".")) / ".ascp-faults"
            marks.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.fault_spec)
            try:
                os.close(os.open(marks / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                self.fault = None
                return False
        return True

    # planning --------------------------------------------------------------------------------------------
    def remote(self, path: str) -> Path:
        if self.root is None:
            raise SessionError("Server aborted session: ASYNCDEPO_SIM_ASCP_ROOT is not set", 2)
        full = Path(os.path.normpath(self.root / path.lstrip("/")))
        if full != self.root and self.root not in full.parents:
            raise SessionError("Server aborted session: Path violates docroot containment", 41)
        return full

    def plan(self) -> list[Job]:
        """Authenticate for the remote paths the session touches, then list the files to move."""
        a = self.a
        if not a.paths:
            raise Usage("ascp: no target given")
        target, sources = a.paths[-1], a.paths[:-1]
        if a.file_list:
            sources += [x for x in Path(a.file_list).read_text().splitlines() if x]
        pairs: list[tuple[str, str]] | None = None
        if a.pair_list:
            lines = [x for x in Path(a.pair_list).read_text().splitlines() if x]
            if len(lines) % 2:
                raise Usage("ascp: file pair list has an odd number of lines")
            pairs = list(zip(lines[0::2], lines[1::2]))
            sources = [s for s, _ in pairs]
        if not sources:
            raise Usage("ascp: no source given")
        if a.host:
            self.send_mode = (a.mode or "send") == "send"
            if self.send_mode:
                remote_paths, target_path = [target], self.remote(target)
                src_paths = [Path(s) for s in sources]
            else:
                remote_paths, target_path = list(sources), Path(target)
                src_paths = [self.remote(s) for s in sources]
        else:
            tm = _REMOTE.match(target)
            sms = [_REMOTE.match(s) for s in sources]
            if tm:
                remote_paths, target_path = [tm["path"]], self.remote(tm["path"])
                src_paths = [Path(s) for s in sources]
            elif all(sms):
                self.send_mode = False
                remote_paths = [m["path"] for m in sms if m]
                target_path, src_paths = Path(target), [self.remote(p) for p in remote_paths]
            else:
                raise Usage("ascp: no remote host given (use [user@]host:path or --host)")
        self.authenticate(remote_paths)
        jobs: list[Job] = []
        for i, src in enumerate(src_paths):
            if pairs is not None:
                rel = pairs[i][1].lstrip("/")
                jobs += self._expand(src, target_path / rel, rel)
                continue
            if target_path.is_dir():
                base = target_path / src.name
            elif a.create_dir:
                target_path.mkdir(parents=True, exist_ok=True)
                base = target_path / src.name
            elif len(src_paths) == 1 and target_path.parent.is_dir():
                base = target_path
            else:
                raise SessionError("Server aborted session: No such file or directory"
                                   if len(src_paths) == 1 else "Target is not a directory", 4)
            jobs += self._expand(src, base, src.name)
        return jobs

    def _expand(self, src: Path, dst: Path, name: str) -> Iterator[Job]:
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel = Path(dirpath).relative_to(src)
                (dst / rel).mkdir(parents=True, exist_ok=True)
                for fn in sorted(filenames):
                    if not fn.endswith(".aspx"):
                        yield Job(Path(dirpath) / fn, dst / rel / fn, (Path(name) / rel / fn).as_posix())
        else:
            yield Job(src if src.is_file() else None, dst, name)

    # auth ------------------------------------------------------------------------------------------------
    def authenticate(self, remote_paths: list[str]) -> None:
        token = self.a.token or self.env.get("ASPERA_SCP_TOKEN")
        url = self.env.get("ASYNCDEPO_SIM_ASCP_TOKEN_URL")
        if self.fires("auth"):
            raise SessionError("failed to authenticate", 19)
        if token is not None:
            if url:
                body = json.dumps({"token": token, "paths": remote_paths}).encode()
                req = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=15) as resp:
                        ok = resp.status == 200
                except (urllib.error.URLError, OSError):
                    ok = False
                if not ok:
                    raise SessionError("failed to authenticate", 19)
            return
        expected = self.env.get("ASYNCDEPO_SIM_ASCP_PASSWORD")
        if expected is not None and self.env.get("ASPERA_SCP_PASS") != expected:
            raise SessionError("failed to authenticate", 19)

    # copying ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.mgr.send("INIT", Direction="Send" if self.send_mode else "Receive", Operation="Transfer")
        self.meet()
        if self.fires("noserver"):
            raise SessionError("Failed to open TCP connection for SSH", 12, stop_line=False)
        jobs = self.plan()
        self.log(f"session start mode={'send' if self.send_mode else 'recv'} files={len(jobs)} k={self.a.resume}")
        self.mgr.send("NOTIFICATION", PreTransferFiles=len(jobs),
                      PreTransferBytes=sum(j.src.stat().st_size for j in jobs if j.src is not None))
        missing = 0
        for job in jobs:
            if job.src is None:
                missing += 1
                self.failed += 1
                self.mgr.send("FILEERROR", File=job.name, Code=4, Description="No such file or directory")
                err(f"ascp: {job.name}: No such file or directory")
                continue
            try:
                self.copy(job)
            except FileFailed as exc:
                self.failed += 1
                self.mgr.send("FILEERROR", File=self.mgr_name(job), Code=exc.code, Description=str(exc))
                err(f"ascp: {job.name}: {exc}")
        if missing and missing == len(jobs):
            raise SessionError("Server aborted session: No such file or directory", 4)

    def copy(self, job: Job) -> None:
        assert job.src is not None
        a, size = self.a, job.src.stat().st_size
        part = job.dst.with_name(job.dst.name + ".aspx")
        if job.dst.is_file() and (a.overwrite == "never" or (a.resume and _same(job.src, job.dst, size, a.resume))):
            return  # already there: nothing to send
        offset = 0
        if a.resume and part.is_file():
            have = part.stat().st_size
            if have <= size and (a.resume == 1 or _prefix_equal(job.src, part, have)):
                offset = have
        if offset:
            self.resumed[job.name] = offset
        job.dst.parent.mkdir(parents=True, exist_ok=True)
        chunk = 256 * 1024 if not a.rate_bps else max(1024, min(256 * 1024, int(a.rate_bps / 8 / 20)))
        done = offset
        self.mgr.send("START", File=self.mgr_name(job), Size=size, StartByte=offset, TransferBytes=self.bytes)
        with open(job.src, "rb") as fin, open(part, "r+b" if offset else "wb") as fout:
            fin.seek(offset)
            fout.seek(offset)
            fout.truncate()
            while done < size:
                n = min(chunk, size - done)
                if self.fault in ("drop", "stall") and self.bytes + n >= self.fault_n and self.fires(self.fault):
                    data = fin.read(max(0, self.fault_n - self.bytes))
                    fout.write(data)
                    fout.flush()
                    done += len(data)
                    self.bytes += len(data)
                    self.show(job, done, size, force=True)
                    self.injected()
                data = fin.read(n)
                fout.write(data)
                done += len(data)
                self.bytes += len(data)
                if len(data) < n:
                    # The source ended before the size it had when the file started: it shrank under us. A
                    # read at its end returns nothing, so going on would loop for ever at full speed. The
                    # part file stays (a resume checks it against the source).
                    raise FileFailed("Error reading source file from disk: the file shrank while it was sent", 35)
                self.pace()
                self.show(job, done, size)
        os.replace(part, job.dst)
        if a.preserve:
            st = job.src.stat()
            os.utime(job.dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.files += 1
        if not a.quiet:
            out("\r" + progress_line(job.name, size, size, self.rate(), None) + "\n")
        self.mgr.send("STOP", File=self.mgr_name(job), Size=size, StartByte=offset, TransferBytes=self.bytes)

    def mgr_name(self, job: Job) -> str:
        # management frames name the local file by its full path (the runner makes it relative again)
        local = job.src if self.send_mode else job.dst
        return str(Path(os.path.abspath(local))) if local is not None else job.name

    def meet(self) -> None:
        want = self.env.get("ASYNCDEPO_SIM_ASCP_MEET")
        if not want or not want.isdigit():
            return
        folder = (self.root or Path(".")) / ".ascp-meet"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).touch()
        deadline = time.monotonic() + 30
        while len(os.listdir(folder)) < int(want):
            if time.monotonic() > deadline:
                self.met = False
                return
            time.sleep(0.02)
        self.met = True

    def injected(self) -> None:
        """The drop or stall fault fires here. A stall holds the session until a signal ends it (the
        runner's stall timeout), its client is gone, or ``hold_limit`` seconds passed; then it fails as a
        stalled FASP session does. :raises SessionError: always (:class:`Dropped` for a drop)."""
        if self.fault == "drop":
            raise Dropped("Connection lost", 16)
        self.fault = None
        notify = self.env.get("ASYNCDEPO_SIM_ASCP_NOTIFY")
        # O_RDWR: a FIFO opens at once even before its reader does (O_WRONLY would block until then: for
        # ever if the reader never comes); held open during the stall, the line waits there for a late reader.
        fd = os.open(notify, os.O_RDWR | os.O_APPEND | os.O_NONBLOCK) if notify else -1
        try:
            if fd >= 0:
                os.write(fd, f"stalled {os.getpid()} {self.bytes}\n".encode())
            self.hold()
        finally:
            if fd >= 0:
                os.close(fd)
        raise SessionError(STALLED, 40)

    def hold(self) -> None:
        """Wait, without using the CPU, until the client is gone or ``hold_limit`` seconds passed."""
        self.watch.wait(self.hold_limit, self.mgr.sock)

    def pace(self) -> None:
        if self.a.rate_bps:
            ahead = self._pace_start + self.bytes * 8 / self.a.rate_bps - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return self.bytes * 8 / elapsed

    def show(self, job: Job, done: int, size: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now - self._last_print < 0.1 or done >= size):
            return  # at most ~10 redraws a second; the 100 % line is printed once, after the rename
        self._last_print = now
        rate = self.rate()
        if not self.a.quiet:
            eta = (size - done) * 8 / rate if rate else 0.0
            out("\r" + progress_line(job.name, done, size, rate, eta))
        self.mgr.send("STATS", File=self.mgr_name(job), Size=size, TransferBytes=self.bytes,
                      Rate=int(rate / 1000), Elapsedusec=int((now - self.started) * 1e6))

    def summary(self) -> None:
        secs = time.monotonic() - self.started
        head = "Partial Completion" if self.failed else "Completed"
        files = f"in {self.files} file{'' if self.files == 1 else 's'}"
        if self.failed:
            files += f", {self.failed} file{'' if self.failed == 1 else 's'} failed"
        out(f"{head}: {self.bytes // 1024}K bytes transferred in {int(secs)} seconds\n"
            f" ({int(self.rate() / 1000)}K bits/sec), {files}.\n")

    def log(self, text: str) -> None:
        if self.a.log_dir == "-":
            err(f"LOG {text}")
        elif self.a.log_dir:
            try:
                with open(Path(self.a.log_dir) / "aspera-scp-transfer.log", "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} LOG {text}\n")
            except OSError:
                pass

    def counters(self, status: int) -> None:
        path = self.env.get("ASYNCDEPO_SIM_ASCP_COUNTERS")
        if not path:
            return
        line = json.dumps({"bytes": self.bytes, "files": self.files, "resumed_from": self.resumed,
                           "status": status, "mode": "send" if self.send_mode else "recv", "met": self.met,
                           "rate_bps": self.a.rate_bps, "ppid": self.ppid}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write with O_APPEND: concurrent sessions do not interleave
        finally:
            os.close(fd)


def _same(src: Path, dst: Path, size: int, level: int) -> bool:
    return dst.stat().st_size == size and (level == 1 or _prefix_equal(src, dst, size))


def _prefix_equal(src: Path, part: Path, n: int) -> bool:
    with open(src, "rb") as a, open(part, "rb") as b:
        while n > 0:
            k = min(n, 1 << 20)
            if a.read(k) != b.read(k):
                return False
            n -= k
    return True


def _fault(spec: str) -> tuple[str | None, int, bool]:
    """``kind[:N][:once]`` -> (kind, N, once); (None, 0, False) when unset or unknown."""
    parts = spec.split(":") if spec else [""]
    once = parts[-1] == "once"
    if once:
        parts.pop()
    kind, n = parts[0], int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if kind not in ("auth", "drop", "stall", "wedge", "noserver"):
        return None, 0, False
    return kind, n, once
