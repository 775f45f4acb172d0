"""The CLI in a child process, as ``python -m tests.chaos.launch ARGS`` (the same ``asyncdepo.cli.main`` a user
runs), with one trigger the local target needs because no server sits in front of it:

``ASYNCDEPO_CHAOS_KILL_AFTER=N`` — once ``N`` bytes were written with ``os.pwrite`` (the local target's part
files), the process SIGKILLs itself in the middle of the write that crosses ``N``: the first ``N`` bytes are on
disk, nothing after. Every other target is killed from outside, at a byte count its server reports.

``ASYNCDEPO_CHAOS_PAUSE_AFTER=N`` with ``ASYNCDEPO_CHAOS_NOTIFY=HOST:PORT`` — once ``N`` bytes were written, every
further ``os.pwrite`` blocks; the first to block connects to ``HOST:PORT``, sends ``{"bytes": N, "pid": PID}``
and the writes go on when the test closes that connection (a run held mid-transfer, for two runs of one job).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from typing import Any


def _kill_after(limit: int) -> None:
    real = os.pwrite
    left = [limit]

    def pwrite(fd: int, data: Any, offset: int, /) -> int:
        if len(data) >= left[0]:
            if left[0]:
                real(fd, memoryview(data)[: left[0]], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        n = real(fd, data, offset)
        left[0] -= n
        return n

    os.pwrite = pwrite


def _pause_after(limit: int, notify: str) -> None:
    real = os.pwrite
    left = [limit]
    lock = threading.Lock()
    gone = threading.Event()

    def hold() -> None:
        with lock:  # the first writer to arrive tells the test, the others wait for it
            if not gone.is_set():
                host, _, port = notify.rpartition(":")
                with socket.create_connection((host, int(port))) as conn:
                    conn.sendall(json.dumps({"bytes": limit, "pid": os.getpid()}).encode() + b"\n")
                    while conn.recv(4096):
                        pass  # until the test closes the connection
                gone.set()

    def pwrite(fd: int, data: Any, offset: int, /) -> int:
        if left[0] <= 0:
            hold()
        elif len(data) > left[0]:
            n = real(fd, memoryview(data)[: left[0]], offset)
            left[0] -= n
            return n  # a short write: the caller writes the rest, which then waits
        n = real(fd, data, offset)
        left[0] -= n
        return n

    os.pwrite = pwrite


def main() -> int:
    if os.environ.get("ASYNCDEPO_CHAOS_KILL_AFTER"):
        _kill_after(int(os.environ["ASYNCDEPO_CHAOS_KILL_AFTER"]))
    if os.environ.get("ASYNCDEPO_CHAOS_PAUSE_AFTER"):
        _pause_after(int(os.environ["ASYNCDEPO_CHAOS_PAUSE_AFTER"]), os.environ["ASYNCDEPO_CHAOS_NOTIFY"])
    from asyncdepo.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
