"""An ascp that never notices its client is gone still ends with it: asyncdepo starts ascp to be SIGKILLed when
the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so a client killed with SIGKILL never leaves an
ascp running that a resumed run would race over the same files.

The "ascp" here is a shell script that answers the pre-flight like ascp, then says its pid on a FIFO and sleeps:
it neither reads its pipes nor watches its parent (the stand-in ascp of the fault suite does both, so it would
end by itself and prove nothing here).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport import build_app
from asyncdepo.sim.server import ThreadedSim
from tests.cli.test_immport_cli import _env, _sim_args, store  # noqa: F401 - store is a fixture

GUARD = 120.0  # seconds: a bound for what must happen, never a wait for it


def _sleepy_ascp(folder: Path, fifo: Path) -> Path:
    script = folder / "ascp"
    script.write_text("#!/bin/sh\n"
                      'if [ "$#" -eq 0 ]; then echo "Usage: ascp [options] source... target"; exit 112; fi\n'
                      f'echo "$$" > "{fifo}"\n'
                      "exec sleep 900\n")
    script.chmod(0o755)
    return script


def test_an_ascp_that_ignores_its_client_dies_with_it(tmp_path: Path, store: Path) -> None:  # noqa: F811
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    ascp = _sleepy_ascp(tmp_path, fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    pidfd = -1
    try:
        with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
            argv = [sys.executable, "-m", "asyncdepo.cli", "pull", "immport", "--study", "SDY1",
                    str(tmp_path / "out"), "--server", sim.url, "--user", "alice", "--via", "ascp", "--ascp",
                    str(ascp), "--aspera-host", "127.0.0.1", "--stall-timeout", "600", "--journal",
                    str(tmp_path / "journal.sqlite"), "-q"]
            client = subprocess.Popen(argv, env=_env(tmp_path, sim.url), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                ready, _, _ = select.select([reader], [], [], GUARD)
                assert ready, "the client never started its ascp"
                pid = int(os.read(reader, 64).split()[0])
                pidfd = os.pidfd_open(pid)  # opened while the client lives: the pid cannot be reused under us
            finally:
                client.send_signal(signal.SIGKILL)
                client.wait(GUARD)
            ended, _, _ = select.select([pidfd], [], [], GUARD)
            assert ended, "ascp outlived the client that started it"
    finally:
        os.close(reader)
        if pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):  # when the test failed: leave nothing behind
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
