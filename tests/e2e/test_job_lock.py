"""One job, one runner, through the CLI as a user runs it: a second run of the same push refuses while the first
holds the job (held mid-transfer by the simulator, not by a sleep), names the holder and exits 6; another job
on the same journal runs meanwhile; a kill -9 leaves nothing locked and the rerun completes the job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from asyncdepo.cli.common import EXIT_LOCKED
from tests.conftest import tree_digests

CHUNK = 1 << 20


def _push(src: Path, url: str, journal: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asyncdepo.cli", "push", str(src), url, "--journal", str(journal),
            "--chunk-size", "1M", "--transfers", "2", "-q", *extra]


def _tree(root: Path, files: dict[str, int]) -> Path:
    root.mkdir()
    for name, size in files.items():
        (root / name).write_bytes(os.urandom(size))
    return root


def test_second_run_of_a_job_refuses_while_the_first_holds_it_and_kill_9_frees_it(
        tmp_path: Path, journal: Path, threaded_tus) -> None:
    src = _tree(tmp_path / "big", {"a.bin": 5 * CHUNK + 17, "b.bin": 4 * CHUNK + 3})
    other = _tree(tmp_path / "small", {f"s{i}.bin": 1000 + i for i in range(5)})
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    faults = threaded_tus.faults
    held = threading.Event()
    faults.on_stall.append(lambda n: held.set())
    # two chunks land, then the next two (one per item of the first run) are held; later PATCHes pass
    threaded_tus.call(lambda: faults.add("PATCH * stall skip=2 first=2"))
    first = subprocess.Popen(_push(src, url, journal), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert held.wait(timeout=120), "the first run never reached the simulator's hold"
        second = subprocess.run(_push(src, url, journal), capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_LOCKED, second.stderr
        assert f"pid {first.pid} on {socket.gethostname()} since " in second.stderr
        assert "already running" in second.stderr, second.stderr
        # a different job sharing the journal is not held up by the first one's lock
        side = subprocess.run(_push(other, url, journal), capture_output=True, text=True, timeout=120)
        assert side.returncode == 0, side.stderr
        assert tree_digests(threaded_tus.store / "complete") == tree_digests(other)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    threaded_tus.call(faults.clear)
    rerun = subprocess.run(_push(src, url, journal), capture_output=True, text=True, timeout=300)
    threaded_tus.call(faults.release_stalls)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_digests(threaded_tus.store / "complete") == {**tree_digests(src), **tree_digests(other)}
    assert not list(journal.parent.glob(journal.name + ".*.lock"))  # released and removed at the end
