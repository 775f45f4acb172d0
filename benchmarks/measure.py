"""Run a command and measure it: the one process-measuring helper of every benchmark.

:func:`run_measured` starts ``argv`` (a list: never a shell string), reaps it with ``os.wait4`` and returns
a :class:`Measurement`:

* ``wall``: seconds from start to reaping;
* ``cpu``: user + system seconds of the process and every descendant it waited for (its own rusage, so
  other children of the benchmark do not count);
* ``tree_rss``: the largest *summed* RSS of the process and all its descendants, sampled with psutil every
  ``interval`` seconds by a thread (the fair figure for a pool of workers or a pipeline);
* ``max_rss``: the largest RSS one single process reached. By default the kernel's ``ru_maxrss`` from
  ``wait4``; it can include the image of this (Python) process the child was forked from, so with
  ``gnu_time=True`` (and GNU time installed) the command runs under ``time -f %M``, which reports the
  high-water mark of its own child only; the sampler then skips the ``time`` process itself.

stdin comes from a string (or nothing); stdout and stderr go to temporary files, never pipes, so a chatty
child cannot block on a full pipe and nothing is polled while it runs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one run of a command cost; see the module docstring for each figure."""

    wall: float  # seconds
    cpu: float  # seconds, user + system, waited-for descendants included
    tree_rss: int  # bytes, peak of the summed RSS of the process tree (sampled)
    max_rss: int  # bytes, the largest single process (kernel high-water mark)
    rc: int  # exit status (negative: killed by that signal)
    stdout: str
    stderr: str  # empty when merged into stdout

    def failure(self, argv: Sequence[str]) -> str:
        """A one-line description of a failed run with the tail of its error output."""
        tail = (self.stderr or self.stdout)[-2000:]
        return f"{' '.join(str(a) for a in argv[:6])} ... failed ({self.rc}): {tail}"


class TreeSampler:
    """Peak of the summed RSS of a process and its descendants, sampled every ``interval`` seconds.

    ``skip_root`` leaves the process itself out (a wrapper such as GNU time).
    """

    def __init__(self, pid: int, interval: float = 0.05, *, skip_root: bool = False) -> None:
        self.pid, self.interval, self.skip_root, self.peak = pid, interval, skip_root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                procs = root.children(recursive=True)
            except psutil.Error:
                return  # the process is gone
            for p in procs if self.skip_root else [root, *procs]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass  # exited between the listing and the reading
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def gnu_time_binary() -> str | None:
    """GNU time (``/usr/bin/time``), not the shell keyword; None when it is not installed."""
    return shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)


def run_measured(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 stdin: str | None = None, merge_output: bool = False, interval: float = 0.05,
                 gnu_time: bool = False) -> Measurement:
    """Run ``argv`` to completion and measure it (see the module docstring); never raises for a non-zero
    exit status: the caller decides (``Measurement.rc``, ``Measurement.failure``).

    :param merge_output: stderr goes into ``stdout`` (interleaved as written), ``stderr`` is empty.
    :param interval: seconds between two RSS samples of the process tree.
    :param gnu_time: take ``max_rss`` from GNU time when installed (see the module docstring).
    :raises OSError: the command could not be started.
    """
    cmd = [str(a) for a in argv]
    time_bin = gnu_time_binary() if gnu_time else None
    rss_file: str | None = None
    if time_bin is not None:
        fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        cmd = [time_bin, "-f", "%M", "-o", rss_file, *cmd]
    try:
        with (
            tempfile.TemporaryFile("w+b") as in_f,
            tempfile.TemporaryFile("w+b") as out_f,
            tempfile.TemporaryFile("w+b") as err_f,
        ):
            if stdin is not None:
                in_f.write(stdin.encode())
                in_f.seek(0)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out_f,
                                    stdin=in_f if stdin is not None else subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT if merge_output else err_f)
            reaped = False
            try:
                with TreeSampler(proc.pid, interval, skip_root=time_bin is not None) as tree:
                    _, status, usage = os.wait4(proc.pid, 0)
                    reaped = True
            except BaseException:  # Ctrl-C: leave no child running (nor a zombie) behind
                if not reaped:
                    proc.kill()
                    proc.wait()
                raise
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            out_f.seek(0)
            err_f.seek(0)
            out = out_f.read().decode(errors="replace")
            err = err_f.read().decode(errors="replace")
        max_kib = float(usage.ru_maxrss)  # Linux: KiB
        if rss_file is not None:
            lines = Path(rss_file).read_text().strip().splitlines()
            max_kib = float(lines[-1]) if lines and lines[-1].isdigit() else max_kib
    finally:
        if rss_file is not None:
            os.unlink(rss_file)
    return Measurement(wall=wall, cpu=usage.ru_utime + usage.ru_stime, tree_rss=tree.peak,
                       max_rss=int(max_kib * 1024), rc=proc.returncode, stdout=out, stderr=err)


# -- what every archive benchmark needs besides measuring ---------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child, with ``extra`` set and this working tree's package first on the path."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def asyncdepo_cmd() -> list[str]:
    """How a user runs asyncdepo: the environment's console script, else ``python -m asyncdepo.cli``."""
    exe = Path(sys.executable).parent / "asyncdepo"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "asyncdepo.cli"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def warm(root: Path) -> int:
    """Read every file under ``root`` once (so each contender starts from the page cache); returns bytes."""
    total = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    total += len(chunk)
    return total


def start_sim(name: str, root: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``asyncdepo sim NAME --port 0 --root ROOT ARGS`` in a process of its own; returns it and its URL."""
    proc = subprocess.Popen([*asyncdepo_cmd(), "sim", name, "--port", "0", "--root", str(root), *args],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the simulator prints where it listens once it does
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"simulator {name} did not start: {line!r}")
    return proc, line.split("listening on", 1)[1].split()[0]


def stop_sim(proc: subprocess.Popen[str]) -> None:
    """Stop a simulator like Ctrl-C would; kill it if it does not go."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
