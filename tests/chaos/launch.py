"""The CLI in a child process, as ``python -m tests.chaos.launch ARGS`` (the same ``asyncdepo.cli.main`` a user
runs), with one trigger the local target needs because no server sits in front of it:

``ASYNCDEPO_CHAOS_KILL_AFTER=N`` — once ``N`` bytes were written with ``os.pwrite`` (the local target's part
files), the process SIGKILLs itself in the middle of the write that crosses ``N``: the first ``N`` bytes are on
disk, nothing after. Every other target is killed from outside, at a byte count its server reports.
"""

from __future__ import annotations

import os
import signal
import sys


def _kill_after(limit: int) -> None:
    real = os.pwrite
    left = [limit]

    def pwrite(fd: int, data: bytes, offset: int, /) -> int:
        if len(data) >= left[0]:
            if left[0]:
                real(fd, memoryview(data)[: left[0]], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        n = real(fd, data, offset)
        left[0] -= n
        return n

    os.pwrite = pwrite  # type: ignore[assignment]


def main() -> int:
    if os.environ.get("ASYNCDEPO_CHAOS_KILL_AFTER"):
        _kill_after(int(os.environ["ASYNCDEPO_CHAOS_KILL_AFTER"]))
    from asyncdepo.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
