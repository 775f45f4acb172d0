"""EMPIAR over ascp, sharded over the workers of a Dask cluster, through ``asyncdepo push empiar ...
--scheduler``: the coordinator creates the entry, uploads the thumbnail, grants rights and submits; the
workers run the ascp sessions (the stand-in ascp, started by each worker process: its counters name the
worker); the transfer password reaches them outside the task graph, logs and events; files the workers'
ascp cannot send go by the coordinator's Globus route (``-g``), and without one a refused password ends
the job as on one node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncdepo.cli import empiar as cli
from asyncdepo.sim import globus as globus_sim
from tests.cli.test_empiar_cli import TRANSFER_PASS, World, tree_md5, world  # noqa: F401 - world is a fixture
from tests.cli.test_session_jobs import Notices, counts, notices, status  # noqa: F401 - notices too
from tests.e2e.conftest import worker_env, worker_pids

pytest.importorskip("distributed")


def _ascp_env(**more: str) -> dict[str, str]:
    """What the stand-in ascp reads, for the workers (never the transfer password the client sends)."""
    env = {k: os.environ[k] for k in ("ASYNCDEPO_SIM_ASCP_ROOT", "ASYNCDEPO_SIM_ASCP_PASSWORD",
                                      "ASYNCDEPO_SIM_ASCP_COUNTERS")}
    return {**env, **more}


def _on_cluster(w: World, address: str, *extra: str) -> list[str]:
    argv = w.argv("--scheduler", address, "--batch-files", "1", *extra)
    argv[argv.index("-q")] = "--json"
    return argv


def _report(out: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return next(e["report"] for e in lines if e["event"] == "job_finished")  # type: ignore[no-any-return]


def _assert_no_secret_on_cluster(client: Any, secret: str) -> None:
    """``secret`` is in no task (key, state, run spec: what the scheduler and the dashboard show), no event,
    no plugin's name, no log, and in no worker's environment."""

    def scheduler_view(dask_scheduler: Any) -> dict[str, Any]:
        import cloudpickle

        return {"tasks": [(str(key), repr(ts), repr(ts.run_spec), cloudpickle.dumps(ts.run_spec))
                          for key, ts in dask_scheduler.tasks.items()],
                "plugins": list(dask_scheduler.worker_plugins)}

    view = client.run_on_scheduler(scheduler_view)
    assert any(name.startswith("asyncdepo-") for name, *_ in view["tasks"]), view["tasks"]
    for name, ts_repr, spec_repr, spec_bytes in view["tasks"]:
        assert secret not in name + ts_repr + spec_repr and secret.encode() not in spec_bytes
    events = client.get_events()
    assert any(topic.startswith("asyncdepo-") for topic in events)
    assert secret not in repr(events) and all(secret not in p for p in view["plugins"])
    assert secret not in repr(client.get_scheduler_logs()) + repr(client.get_worker_logs())
    # the stand-in ascp's own setting (the password it expects) aside, no worker's environment holds it
    for env in client.run(lambda: dict(os.environ)).values():
        assert secret not in repr({k: v for k, v in env.items() if k != "ASYNCDEPO_SIM_ASCP_PASSWORD"})


def test_empiar_over_ascp_sharded_over_two_workers(world: World, cluster: Any, client: Any,  # noqa: F811
                                                   notices: Notices) -> None:  # noqa: F811
    pids = worker_pids(client)
    stalls = _ascp_env(ASYNCDEPO_SIM_ASCP_FAIL="stall:350000:once",
                       ASYNCDEPO_SIM_ASCP_NOTIFY=str(notices.path))
    argv = _on_cluster(world, cluster.scheduler_address, "--stall-timeout", "600", "-e", str(world.thumb),
                       "-gu", "alice:3")
    with worker_env(client, **stalls):
        proc = subprocess.Popen([sys.executable, "-m", "asyncdepo.cli", "push", "empiar", *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            stalled, _ = notices.wait()  # one worker's ascp holds its session open: the job is mid-flight
            try:
                _assert_no_secret_on_cluster(client, TRANSFER_PASS)
            finally:
                os.kill(stalled, signal.SIGKILL)  # that session fails; its next one resumes the file (-k 3)
        finally:
            out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (err.decode(), _report(out.decode())["failures"])
    assert TRANSFER_PASS.encode() not in out + err
    entry = world.only_entry()
    assert entry.submitted and entry.thumbnail and entry.rights == {"alice": 3}
    assert tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    # every session ran in a worker process, and both workers sent files
    sessions = world.sessions()
    assert {s["ppid"] for s in sessions} == set(pids), (sessions, pids)
    assert any(s["resumed_from"] for s in sessions)  # the killed session's file continued where it stopped
    assert sum(s["files"] for s in sessions) == 6
    report = _report(out.decode())
    assert report["files_done"] == 6 and report["summary"]["phase"] == "submitted"
    assert set(report["summary"]["via"].values()) == {"ascp"}  # as the workers handed it back
    assert len(report["workers"]) == 2 and all(w["files"] > 0 for w in report["workers"].values())
    assert sum(w["files"] for w in report["workers"].values()) == 6
    code, st = status(world.journal, report["job_id"])
    assert code == 0 and counts(st) == {"done": 6} and st["job"]["state"] == "done"
    assert st["job"]["kind"] == "empiar" and "--scheduler" in st["job"]["argv"]


def test_refused_ascp_on_the_workers_goes_by_the_coordinators_globus(
        world: World, cluster: Any, client: Any, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    with worker_env(client, **_ascp_env(ASYNCDEPO_SIM_ASCP_FAIL="auth")):
        rc = cli.push_main(_on_cluster(world, cluster.scheduler_address, *world.globus_argv()))
    report = _report(capsys.readouterr().out)
    assert rc == 0, report["failures"]
    entry = world.only_entry()
    assert entry.submitted
    assert tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    sessions = world.sessions()
    assert sessions and all(s["status"] != 0 for s in sessions)  # the workers' ascp was refused ...
    assert world.globus.server is not None
    tasks = globus_sim.state_of(world.globus.server.app).tasks.values()
    # ... and the coordinator's Globus tasks moved every file, each once
    assert tasks and all(t.status == "SUCCEEDED" for t in tasks)
    assert sorted(i["destination_path"].rsplit("/", 1)[-1] for t in tasks for i in t.items) == sorted(
        p.name for p in world.data.rglob("*") if p.is_file())
    assert report["files_done"] == 6 and report["cluster"]["fallback"] == 6
    assert set(report["summary"]["via"].values()) == {"globus"}


def test_refused_ascp_without_globus_ends_the_job(world: World, cluster: Any, client: Any,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with worker_env(client, **_ascp_env(ASYNCDEPO_SIM_ASCP_FAIL="auth")):
        rc = cli.push_main(_on_cluster(world, cluster.scheduler_address, "-s"))
    err = capsys.readouterr().err
    assert rc == 3, err  # as on one node: an authentication failure, said once
    assert err.count("failed to authenticate") == 1 and TRANSFER_PASS not in err
    assert not world.only_entry().submitted


def test_empiar_argv_takes_the_cluster_flags_and_keeps_the_reference_ones(world: World) -> None:  # noqa: F811
    args = cli.build_parser().parse_args(["-p", "-e", "t.png", "-gu", "alice:3", "-s", "-r", "12", "dir",
                                          "--scheduler", "tcp://h:8786", "--batch-files", "8", "--batch-size", "4G",
                                          "--max-requests", "6", "user", "d.json", "DATA"])
    assert (args.token, args.password, args.stop_submit, args.resume) == ("user", True, True, ["12", "dir"])
    assert (args.scheduler, args.batch_files, args.batch_size, args.max_requests) == ("tcp://h:8786", "8", "4G", "6")
    stored = cli.resume_argv(args, Path("/j.sqlite"))
    assert stored[stored.index("--scheduler") + 1] == "tcp://h:8786" and stored.index("--scheduler") < stored.index("--")
    assert cli.build_parser().parse_args(cli.recorded_argv({"argv": stored})).batch_size == "4G"
    # resume's own cluster flags replace the recorded ones, before the positional arguments
    again = cli.build_parser().parse_args(cli.recorded_argv({"argv": stored}, ["--local-cluster", "2"]))
    assert (again.scheduler, again.local_cluster, again.batch_files, again.token) == (None, "2", None, "user")
