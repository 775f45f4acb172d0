"""EMPIAR uploads (ascp, Globus) and ImmPort pulls (ascp, https) as engine jobs, as a user runs them: the CLI in a
subprocess killed with SIGKILL mid-transfer, ``asyncdepo jobs`` and ``asyncdepo status`` on what it left, then
``asyncdepo resume JOB``: only what is missing moves (counted by the stand-in ascp and the simulators) and the
target ends equal to the source. The kill point comes from the simulators (the stand-in ascp says on a FIFO
when its stall fault fires; the Globus simulator sets an event at the first status poll), never from a clock.
The stalled stand-in runs in a session of its own: it outlives the CLI, then ends by itself once it sees its
client gone (awaited on a pidfd opened while the client still lived, so the pid cannot be another process's).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncdepo.cli import main as cli_main
from asyncdepo.sim import globus as globus_sim
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport import build_app
from asyncdepo.sim.server import ThreadedSim
from tests.cli.test_empiar_cli import World, tree_md5, world  # noqa: F401 - world is a fixture
from tests.cli.test_immport_cli import SIM_ASCP, _env, _identical, _sim_args, store  # noqa: F401 - store too

CLI = [sys.executable, "-m", "asyncdepo.cli"]


class Notices:
    """A FIFO the stand-in ascp writes ``stalled PID BYTES`` to when its stall fault fires."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "ascp-notices"
        os.mkfifo(self.path)
        self._read = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # a writer always there: never EOF

    def wait(self, timeout: float = 120.0) -> tuple[int, int]:
        """The stalled ascp's pid and the bytes its session had moved."""
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([self._read], [], [], timeout)
            assert ready, "the stand-in ascp never reached its stall point"
            data += os.read(self._read, 256)
        word, pid, moved = data.decode().split()
        assert word == "stalled"
        return int(pid), int(moved)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._keep)

    def held(self) -> tuple[int, int]:
        """``wait()``, then a pidfd of the stalled stand-in (opened while its client lives) and its bytes."""
        pid, moved = self.wait()
        return os.pidfd_open(pid), moved


def ended(pidfd: int, timeout: float = 120.0) -> None:
    """The stalled ascp ends once its client is gone: asyncdepo starts it to die with the client
    (PR_SET_PDEATHSIG), so a resumed run never races an old ascp over the same files."""
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    assert ready, "the stalled stand-in ascp outlived its client"


@pytest.fixture
def notices(tmp_path: Path) -> Iterator[Notices]:
    n = Notices(tmp_path)
    yield n
    n.close()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, check=False,
                          stdin=subprocess.DEVNULL, env=env)


def killed(argv: list[str], env: dict[str, str] | None, until: Any) -> Any:
    """Start the CLI with ``argv``, call ``until()`` (which waits on a simulator), SIGKILL the CLI."""
    proc = subprocess.Popen([*CLI, *argv], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        return until()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def only_job(journal: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    res = cli("jobs", "--journal", str(journal), "--json", env=env)
    assert res.returncode == 0, res.stderr
    (job,) = json.loads(res.stdout)
    return job  # type: ignore[no-any-return]


def status(journal: Path, job: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    res = cli("status", job, "--journal", str(journal), "--json", env=env)
    return res.returncode, json.loads(res.stdout)


def counts(st: dict[str, Any]) -> dict[str, int]:
    return {state: c["files"] for state, c in st["counts"].items()}


def _post(url: str, body: Any) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30):
        pass


# -- EMPIAR -------------------------------------------------------------------------------------------------

def test_killed_ascp_deposition_resumes_by_job_id(world: World, notices: Notices,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    total = sum(p.stat().st_size for p in world.data.rglob("*") if p.is_file())
    readme = (world.data / "README.txt").stat().st_size
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "stall:350000:once")  # inside the first image set's session
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_NOTIFY", str(notices.path))
    argv = world.argv("--stall-timeout", "600", "-e", str(world.thumb))
    argv[argv.index("--transfers") + 1] = "1"  # one session at a time: nothing else runs on after the kill
    pidfd, moved = killed(["push", "empiar", *argv], None, notices.held)
    ended(pidfd)
    # README's session; the stalled one died with the CLI, killed before it wrote its counters or failing once
    # it saw the CLI gone (its part file stays for -k 3)
    assert moved == 350_000
    assert [(s["bytes"], s["status"]) for s in world.sessions()] in ([(readme, 0)], [(readme, 0), (moved, 1)])

    job = only_job(world.journal)
    assert job["kind"] == "empiar" and job["state"] == "running" and job["source"] == str(world.data)
    code, st = status(world.journal, job["id"])
    assert code == 0 and st["job"]["argv"][-3:] == ["-", str(world.json), str(world.data)]
    entry = world.only_entry()
    assert not entry.submitted

    monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL")
    monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_NOTIFY")
    before = len(world.sessions())
    res = cli("resume", job["id"], "--journal", str(world.journal))
    assert res.returncode == 0, res.stderr
    again = world.sessions()[before:]
    assert sum(s["bytes"] for s in again) == total - readme - moved  # only what was missing moved
    assert any(s["resumed_from"] for s in again)  # the file cut by the kill continued (-k 3)
    entry = world.only_entry()
    assert entry.submitted and entry.redeposits == 1 and len(world.state.entries) == 1
    assert tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    code, st = status(world.journal, job["id"])
    assert code == 0 and counts(st) == {"done": 6} and st["job"]["state"] == "done"


def test_killed_globus_deposition_waits_for_its_task(world: World, tmp_path: Path,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert world.globus.server is not None
    sim = globus_sim.state_of(world.globus.server.app)
    _post(world.globus.url + "/_sim/globus", {"hold": True})  # tasks stay ACTIVE until released
    argv = world.argv(*world.globus_argv())
    argv[argv.index("-a") + 1] = str(tmp_path / "no-ascp")  # ascp unavailable: every file goes by Globus
    argv[argv.index("--transfers") + 1] = "1"
    assert killed(["push", "empiar", *argv], None, lambda: sim.polled.wait(120))
    (first,) = sim.tasks.values()  # the first session's task, held; its id was journaled before the wait
    job = only_job(world.journal)
    code, st = status(world.journal, job["id"])
    # the session's files are partial, with the task's id; the others at most queued (walked, not started)
    assert code == 0 and counts(st)["partial"] == len(first.items) and set(counts(st)) <= {"partial", "queued"}

    _post(world.globus.url + "/_sim/globus", {"hold": False})  # the task goes on without its client
    res = cli("resume", job["id"], "--journal", str(world.journal))
    assert res.returncode == 0, res.stderr
    assert "waiting for Globus task" in res.stderr or first.status == "SUCCEEDED"
    tasks = list(sim.tasks.values())
    assert all(t.status == "SUCCEEDED" for t in tasks)
    total = sum(p.stat().st_size for p in world.data.rglob("*") if p.is_file())
    assert sum(t.bytes_transferred for t in tasks) == total  # every file copied once: the task was not redone
    first_files = {i["destination_path"] for i in first.items}
    assert all(not first_files & {i["destination_path"] for i in t.items} for t in tasks[1:])
    entry = world.only_entry()
    assert entry.submitted and tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    code, st = status(world.journal, job["id"])
    assert code == 0 and counts(st) == {"done": 6}
    assert st["job"]["state"] == "done"


def test_ascp_failing_on_its_last_attempt_falls_back_to_globus(world: World,  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from asyncdepo.cli import empiar

    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "drop:100000")  # every session loses its connection
    assert empiar.push_main(world.argv(*world.globus_argv(), "--json")) == 0
    sessions = world.sessions()
    # README (a small file) went by ascp; each image set's two ascp sessions failed, then Globus took the rest
    assert sorted(s["status"] != 0 for s in sessions) == [False, True, True, True, True]
    assert world.globus.server is not None
    tasks = globus_sim.state_of(world.globus.server.app).tasks.values()
    assert len(tasks) == 2 and all(t.status == "SUCCEEDED" for t in tasks)
    entry = world.only_entry()
    assert entry.submitted
    landed = tree_md5(world.uploaded(entry))
    # ascp's partial files of the sessions that fell back stay behind (ascp cannot delete; documented)
    assert {k: v for k, v in landed.items() if not k.endswith(".aspx")} == tree_md5(world.data)
    assert all(k.removesuffix(".aspx") in landed for k in landed)
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    via = next(e for e in events if e["event"] == "job_finished")["report"]["summary"]["via"]
    assert sorted(via.values()) == ["ascp", "globus", "globus"]


def test_bwlimit_is_shared_by_the_sessions_as_ascps_rate(world: World) -> None:  # noqa: F811
    from asyncdepo.cli import empiar

    assert empiar.push_main(world.argv("--bwlimit", "4M")) == 0
    # 4 MiB/s for two sessions at once: 2 MiB/s each, as ascp's -l (below --rate 2G)
    sessions = world.sessions()
    assert sessions and all(s["rate_bps"] == 16_777_000 for s in sessions)
    assert tree_md5(world.uploaded(world.only_entry())) == tree_md5(world.data)


def test_failed_files_are_in_status_and_the_exit_code(world: World, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from asyncdepo.cli import empiar

    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "drop:100000")
    argv = world.argv()
    argv[argv.index("--attempts") + 1] = "1"
    assert empiar.push_main(argv) == 1
    err = capsys.readouterr().err
    assert "failed: particles/img 0.mrc: ascp: Connection lost" in err and "asyncdepo resume" in err
    assert cli_main(["jobs", "--journal", str(world.journal)]) == 0
    listed = capsys.readouterr().out
    assert "failed" in listed and "empiar" in listed
    job = listed.split()[0]
    assert cli_main(["status", job, "--journal", str(world.journal)]) == 1
    shown = capsys.readouterr().out
    assert "failed: particles/img 0.mrc: ascp: Connection lost" in shown and "(transient)" in shown


# -- ImmPort ------------------------------------------------------------------------------------------------

def test_killed_ascp_pull_resumes_by_job_id(tmp_path: Path, store: Path, notices: Notices) -> None:  # noqa: F811
    total = sum(p.stat().st_size for p in store.rglob("*.bin"))
    out, journal = tmp_path / "out", tmp_path / "journal.sqlite"
    cut = total // 2 + 12_345
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        env = _env(tmp_path, sim.url)
        argv = ["pull", "immport", "--study", "SDY1", str(out), "--server", sim.url, "--user", "alice", "--via",
                "ascp", "--ascp", SIM_ASCP, "--aspera-host", "127.0.0.1", "--stall-timeout", "600", "--journal",
                str(journal), "-q"]
        faulty = {**env, "ASYNCDEPO_SIM_ASCP_FAIL": f"stall:{cut}:once", "ASYNCDEPO_SIM_ASCP_NOTIFY": str(notices.path)}
        pidfd, moved = killed(argv, faulty, notices.held)
        ended(pidfd)
        assert moved == cut
        job = only_job(journal, env)
        assert job["kind"] == "pull" and job["state"] == "running" and job["target"] == str(out)
        res = cli("resume", job["id"], "--journal", str(journal), env=env)
        assert res.returncode == 0, res.stderr
        code, st = status(journal, job["id"], env)
    sessions = [json.loads(x) for x in (tmp_path / "ascp.jsonl").read_text().splitlines()]
    # the stalled session died with its client (killed with no counters, or failed once it saw the client
    # gone); the resume moved the rest once
    assert [(s["bytes"], s["status"]) for s in sessions] in ([(total - cut, 0)], [(cut, 1), (total - cut, 0)])
    assert len(sessions[-1]["resumed_from"]) == 1
    _identical(store, out)
    assert code == 0 and counts(st) == {"done": 16} and st["job"]["state"] == "done"


def test_failed_https_pull_resumes_by_job_id(tmp_path: Path, store: Path) -> None:  # noqa: F811
    bad = store / "SDY1/ResultFiles/d01/file00009.bin"
    marker = bad.with_name(bad.name + ".sim-md5")
    marker.write_text("f" * 32)  # the manifest's md5 is wrong: the file fails, the rest arrives
    out, journal = tmp_path / "out", tmp_path / "journal.sqlite"
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        env = _env(tmp_path, sim.url)
        first = cli("pull", "immport", "/SDY1/ResultFiles/d01", str(out), "--server", sim.url, "--user", "alice",
                    "--journal", str(journal), "--request-attempts", "1", "-q", env=env)
        assert first.returncode == 1 and "md5 mismatch" in first.stderr
        job = only_job(journal, env)
        assert job["kind"] == "pull" and job["state"] == "failed" and f"asyncdepo resume {job['id']}" in first.stderr
        code, st = status(journal, job["id"], env)
        assert code == 1 and counts(st) == {"done": 7, "failed": 1}
        assert [f["rel"] for f in st["failures"]] == ["SDY1/ResultFiles/d01/file00009.bin"]
        marker.unlink()
        res = cli("resume", job["id"], "--journal", str(journal), env=env)
        assert res.returncode == 0, res.stderr
        assert "1 sent, 7 skipped, 0 failed" in res.stderr
        code, st = status(journal, job["id"], env)
    assert code == 0 and counts(st) == {"done": 8}
    assert (out / "SDY1/ResultFiles/d01/file00009.bin").read_bytes() == bad.read_bytes()


def test_every_pull_is_a_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    for i in range(5):
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 2}" / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
    journal = tmp_path / "journal.sqlite"
    assert cli_main(["pull", f"file://{src}", str(tmp_path / "out"), "--journal", str(journal), "-q"]) == 0
    assert cli_main(["jobs", "--journal", str(journal), "--json"]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert job["kind"] == "pull" and job["state"] == "done" and job["done"] == job["items"] == 5
    assert cli_main(["resume", job["id"], "--journal", str(journal)]) == 0
    assert "0 sent, 5 skipped, 0 failed" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("f*")} == \
        {p.name: p.read_bytes() for p in src.rglob("f*")}
