"""Soak (``make soak``, slow suite): a watcher process takes 100,000 files arriving in waves. Its resident
memory stays flat from wave to wave, its CPU time per wave does not grow with the files already sent, and
while nothing arrives it does not poll: its wake-ups (the watch's own counter) and CPU seconds over an
idle stretch are counted — no figure depends on how long anything took.

``ASYNCDEPO_SOAK_FILES`` changes the number of files (default 100,000)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

FILES = int(os.environ.get("ASYNCDEPO_SOAK_FILES", "100000"))
WAVES = 20
DIRS = 100
GUARD = 1800.0  # seconds: a guard against a hang, never a wait for work


class Events:
    """Counts the watcher's item_done and snapshot lines as they come (a condition to wait on)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.done = 0
        self.snapshots = 0
        self.finished: dict[str, object] | None = None
        self.cond = threading.Condition()
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self.cond:
                if b'"event":"item_done"' in line:
                    self.done += 1
                elif b'"event":"snapshot"' in line:
                    self.snapshots += 1
                elif b'"event":"job_finished"' in line:
                    self.finished = orjson.loads(line)["report"]
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred: object, what: str) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: pred() or self._proc.poll() is not None, timeout=GUARD)  # type: ignore[operator]
            assert ok and pred(), f"{what}: done {self.done}, exit {self._proc.poll()}"  # type: ignore[operator]


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def test_soak_100k_files_memory_flat_cpu_per_file_flat_no_polling(tmp_path: Path) -> None:
    import socket

    src, dst = tmp_path / "beam", tmp_path / "archive"
    for d in range(DIRS):
        (src / f"run{d:03d}").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "asyncdepo.cli", "push", str(src), f"file://{dst}", "--watch", "--json",
           "--settle", "0.5", "--rescan", "3600", "--metrics-port", str(port), "--journal",
           str(tmp_path / "journal.sqlite")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        events = Events(proc)
        ps = psutil.Process(proc.pid)
        per_wave = FILES // WAVES
        rss: list[int] = []
        cpu: list[float] = []
        payload = os.urandom(256)
        for w in range(WAVES):
            before = _cpu(ps)
            for i in range(per_wave):
                n = w * per_wave + i
                (src / f"run{n % DIRS:03d}" / f"frame_{n:07d}.raw").write_bytes(payload + n.to_bytes(8, "big"))
            events.wait(lambda w=w: events.done >= (w + 1) * per_wave, f"wave {w}")
            cpu.append(_cpu(ps) - before)
            rss.append(ps.memory_info().rss)
        # idle: nothing arrives for four progress ticks of the watcher (its own clock, not ours), counted
        # from the second tick after the last file (the last events of the writes are in by then)
        ticks = events.snapshots
        events.wait(lambda: events.snapshots >= ticks + 2, "two ticks")
        m0, c0, ticks = _metrics(port), _cpu(ps), events.snapshots
        events.wait(lambda: events.snapshots >= ticks + 4, "four idle ticks")
        m1, c1 = _metrics(port), _cpu(ps)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GUARD) == 0, proc.stderr.read().decode() if proc.stderr else ""
        events.wait(lambda: events.finished is not None, "the report")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    q = WAVES // 4
    mb = [r / 1e6 for r in rss]
    idle_wakeups = m1["asyncdepo_watch_wakeups_total"] - m0["asyncdepo_watch_wakeups_total"]
    print(f"\nsoak: {FILES} files in {WAVES} waves; RSS MB per wave {[round(x) for x in mb]}; CPU s per wave "
          f"{[round(x, 2) for x in cpu]}; idle: {idle_wakeups:g} wake-ups, {c1 - c0:.3f} CPU s over 4 ticks; "
          f"scans {m1['asyncdepo_watch_scans_total']:g}")
    report = events.finished
    assert report is not None and report["files_done"] == FILES and report["ok"]
    assert sum(1 for _ in dst.rglob("*.raw")) == FILES
    # memory: after warming up, the last waves hold no more than the early ones (+ allocator slack)
    assert max(mb[-q:]) <= max(mb[q:2 * q]) + 20, mb
    # CPU per file does not grow with the files already sent (the journal answers, nothing is re-walked)
    assert sum(cpu[-q:]) <= 2.5 * sum(cpu[q:2 * q]), cpu
    # idle: no wake-up of the watch (no rescan due, nothing pending), and almost no CPU
    assert idle_wakeups <= 1
    assert c1 - c0 < 0.5
