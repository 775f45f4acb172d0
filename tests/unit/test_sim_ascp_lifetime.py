"""How long the stand-in ascp (``asyncdepo-sim-ascp``) lives, and that it never spins: a stand-in held by a fault
(stall, wedge) ends once its client is killed (it runs in a session of its own, so nothing else reaches it),
or at its hold limit while the client lives; the bytes it wrote stay whole or in a part file a resume can
use; a session that can finish without its client finishes, as real ascp does; a source that shrinks under a
transfer fails that file instead of looping at its end for ever.

Every wait is on a process or a FIFO with a bound (``Popen.wait(timeout=)``, a pidfd in ``select``), never on
a clock; the bounds are guards against a hang, not timings.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport import build_app
from asyncdepo.sim.immport_store import write_study
from asyncdepo.sim.server import ThreadedSim
from tests import requires
from tests.cli.test_immport_cli import _env, _sim_args

STANDIN = requires.program("asyncdepo-sim-ascp", path_too=False)
CLI = [sys.executable, "-m", "asyncdepo.cli"]
GUARD = 60.0  # seconds: against a hang only


class Notices:
    """A FIFO the stand-in writes ``stalled PID BYTES`` to when its stall fault fires."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "ascp-notices"
        os.mkfifo(self.path)
        self._read = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def held(self) -> tuple[int, int]:
        """A pidfd of the stalled stand-in (opened while it is held, so the pid is its own) and its bytes."""
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([self._read], [], [], GUARD)
            assert ready, "the stand-in ascp never reached its stall point"
            data += os.read(self._read, 256)
        word, pid, moved = data.decode().split()
        assert word == "stalled"
        return os.pidfd_open(int(pid)), int(moved)

    def close(self) -> None:
        os.close(self._read)


@pytest.fixture
def notices(tmp_path: Path) -> Iterator[Notices]:
    n = Notices(tmp_path)
    yield n
    n.close()


def exits(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` (not our child) ends within the guard; if not, it is killed (a
    failing test leaves nothing behind)."""
    try:
        ready, _, _ = select.select([pidfd], [], [], GUARD)
        if not ready:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    return bool(ready)


def ended(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Its output once it ended within the guard; if not, it is killed and the test fails."""
    try:
        return proc.communicate(timeout=GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the stand-in ascp did not end") from None


def sessions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_stalled_standin_ends_once_its_client_is_killed(tmp_path: Path, notices: Notices) -> None:
    """The real client (``asyncdepo pull immport --via ascp``) SIGKILLed while its stand-in is stalled: the
    stand-in sees its client gone and ends; the files it finished are whole, the one it was in is a part file
    holding exactly the source's first bytes (for ``-k``), and its counters name the client as its parent
    (not the process that reaped the orphan)."""
    store, out = tmp_path / "store", tmp_path / "out"
    write_study(store, "SDY1", 4, 1 << 20, per_dir=8)
    sources = {p.relative_to(store).as_posix(): p.read_bytes() for p in store.rglob("*.bin")}
    cut = 2 * (1 << 20) + 12_345  # inside the third file
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        env = {**_env(tmp_path, sim.url), "ASYNCDEPO_SIM_ASCP_FAIL": f"stall:{cut}:once",
               "ASYNCDEPO_SIM_ASCP_NOTIFY": str(notices.path)}
        argv = ["pull", "immport", "--study", "SDY1", str(out), "--server", sim.url, "--user", "alice", "--via",
                "ascp", "--ascp", STANDIN, "--aspera-host", "127.0.0.1", "--transfers", "1",
                "--stall-timeout", "600", "--journal", str(tmp_path / "journal.sqlite"), "-q"]
        client = subprocess.Popen([*CLI, *argv], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            pidfd, moved = notices.held()
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait(GUARD)
        assert exits(pidfd), "the stalled stand-in ascp outlived its client"
    assert moved == cut
    # asyncdepo starts ascp to die with it (PR_SET_PDEATHSIG): the stand-in is SIGKILLed with its client and
    # writes no counters, unless it saw its client gone first (its pipes close as the client exits)
    counters = tmp_path / "ascp.jsonl"
    lines = sessions(counters) if counters.exists() else []
    assert len(lines) <= 1
    for line in lines:
        assert (line["bytes"], line["files"], line["status"], line["ppid"]) == (cut, 2, 1, client.pid)
    # the client names each destination ``<rel>.asyncdepo-part`` (renamed once it checked the digest); the
    # stand-in writes ``<destination>.aspx`` until a file is complete
    whole: dict[str, bytes] = {}
    parts: dict[str, bytes] = {}
    for path in (p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        into = parts if name.endswith(".aspx") else whole
        into[name.removesuffix(".aspx").removesuffix(".asyncdepo-part")] = path.read_bytes()
    assert len(whole) == 2 and all(sources[rel] == data for rel, data in whole.items())
    ((rel, part),) = parts.items()
    assert rel not in whole and sources[rel].startswith(part) and len(part) == cut - 2 * (1 << 20)


def _standin(tmp_path: Path, *argv: str, **env: str) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_"))}
    base.update(ASYNCDEPO_SIM_ASCP_ROOT=str(tmp_path / "server"),
                ASYNCDEPO_SIM_ASCP_COUNTERS=str(tmp_path / "counters.jsonl"), **env)
    (tmp_path / "server" / "up").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([STANDIN, "-k", "3", "-L-", *argv], env=base, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _source(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(i * 31 % 253 for i in range(size)))
    return path


def test_a_stall_ends_at_the_hold_limit_while_the_client_lives(tmp_path: Path) -> None:
    """This test is the client and stays: the stall ends at ``ASYNCDEPO_SIM_ASCP_HOLD_LIMIT`` as a stalled
    FASP session (code 40's text, exit 1) with its part file kept, where it used to hang for ever."""
    src = _source(tmp_path, "a.bin", 600_000)
    proc = _standin(tmp_path, str(src), "u@hx:up/", ASYNCDEPO_SIM_ASCP_FAIL="stall:250000",
                    ASYNCDEPO_SIM_ASCP_HOLD_LIMIT="0.2")
    out, err = ended(proc)
    assert proc.returncode == 1
    assert "Session Stop  (Error: Transfer stalled, timed out)" in out and "Transfer stalled, timed out" in err
    assert (tmp_path / "server/up/a.bin.aspx").read_bytes() == src.read_bytes()[:250_000]
    assert not (tmp_path / "server/up/a.bin").exists()
    assert [(s["bytes"], s["status"]) for s in sessions(tmp_path / "counters.jsonl")] == [(250_000, 1)]


# a client as the engine starts ascp (a session of its own, output piped to it): prints the stand-in's pid,
# then waits for ever without reading, until it is killed
_CLIENT = """
import subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
print(child.pid, flush=True)
child.wait()
"""


def test_a_wedged_standin_ends_once_its_client_is_killed(tmp_path: Path) -> None:
    """``wedge`` ignores SIGTERM (only SIGKILL stopped it): killed with its client, it used to live on for ever."""
    src = _source(tmp_path, "a.bin", 1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_"))}
    env.update(ASYNCDEPO_SIM_ASCP_ROOT=str(tmp_path), ASYNCDEPO_SIM_ASCP_FAIL="wedge")
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, STANDIN, str(src), "u@hx:/"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        pid = int(client.stdout.readline())
        pidfd = os.pidfd_open(pid)  # the stand-in is the client's child, not yet reaped: the pid is its own
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(GUARD)
        if client.stdout is not None:
            client.stdout.close()
    assert exits(pidfd), "the wedged stand-in ascp outlived its client"
    assert not (tmp_path / "a.bin").exists()


def test_a_session_that_can_finish_without_its_client_finishes(tmp_path: Path) -> None:
    """Real ascp goes on when its client dies, and so does the stand-in unless a fault holds it: here it waits
    to meet a second session (``ASYNCDEPO_SIM_ASCP_MEET``), which this test starts only after the kill, so the
    whole transfer happens without the client; its output pipes are gone and it still ends well."""
    src = _source(tmp_path, "a.bin", 700_000)
    meet = tmp_path / "server" / ".ascp-meet"
    meet.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_"))}
    env.update(ASYNCDEPO_SIM_ASCP_ROOT=str(tmp_path / "server"), ASYNCDEPO_SIM_ASCP_MEET="2",
               ASYNCDEPO_SIM_ASCP_COUNTERS=str(tmp_path / "counters.jsonl"))
    client = subprocess.Popen([sys.executable, "-c", _CLIENT, STANDIN, "-k", "3", str(src), "u@hx:/"], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        pidfd = os.pidfd_open(int(client.stdout.readline()))
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(GUARD)
        if client.stdout is not None:
            client.stdout.close()
    (meet / "second-session").touch()  # the meeting is complete only now, with the client gone
    assert exits(pidfd), "the orphaned stand-in did not finish"
    assert (tmp_path / "server" / "a.bin").read_bytes() == src.read_bytes()
    (line,) = sessions(tmp_path / "counters.jsonl")
    assert (line["bytes"], line["files"], line["status"], line["met"]) == (700_000, 1, 0, True)


# the stand-in's session, with the source cut to 100 000 bytes once the first 256 KiB chunk was copied
_SHRINKING = """
import os, sys
from asyncdepo.sim import ascp, ascp_transfer

class Shrinking(ascp_transfer.Session):
    def pace(self) -> None:
        if self.bytes == 256 * 1024:
            os.truncate(sys.argv[1], 100_000)
        super().pace()

ascp.Session = Shrinking
sys.exit(ascp.main(["-k", "3", sys.argv[1], sys.argv[2], "u@hx:up/"]))
"""


def test_a_source_that_shrinks_while_it_is_sent_fails_that_file(tmp_path: Path) -> None:
    """A read at the end of a shrunk source returns nothing: the copy loop used to go on for ever, spinning a
    core. The file now fails (code 35, the part file stays), the next one is sent, the session exits 1."""
    big, small = _source(tmp_path, "big.bin", 1_000_000), _source(tmp_path, "small.bin", 5000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_"))}
    env.update(ASYNCDEPO_SIM_ASCP_ROOT=str(tmp_path / "server"),
               ASYNCDEPO_SIM_ASCP_COUNTERS=str(tmp_path / "counters.jsonl"))
    (tmp_path / "server" / "up").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", _SHRINKING, str(big), str(small)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = ended(proc)
    assert proc.returncode == 1, err
    assert "ascp: big.bin: Error reading source file from disk: the file shrank while it was sent" in err
    assert "Partial Completion" in out and "1 file failed" in out
    server = tmp_path / "server" / "up"
    assert (server / "small.bin").read_bytes() == small.read_bytes() and not (server / "big.bin").exists()
    assert (server / "big.bin.aspx").stat().st_size == 256 * 1024
    (line,) = sessions(tmp_path / "counters.jsonl")
    assert (line["files"], line["status"]) == (1, 1)
