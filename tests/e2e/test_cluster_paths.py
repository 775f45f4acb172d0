"""The cluster job's recovery paths with real faults: a worker process killed while it sends, with the
scheduler giving up on the batch at once (``KilledWorker``): the batch's items fail transiently and the
run's retry rounds send them again, those its worker had finished stay done; Ctrl-C while batches are out (the coordinator takes everything back
from the scheduler; resume completes); the workers' ascp finding no server (each file goes by the
coordinator's Globus); a scheduler address that refuses; a missing source; dask missing; a packed archive
refused by the API; the sweep of a killed run's leftovers against a real scheduler's extensions. Outcomes:
bytes on the target, the JSON events and report, exit codes and messages, what the scheduler holds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from asyncdepo.cli import main as cli_main
from asyncdepo.engine.cluster_setup import sweep
from asyncdepo.sim import tus
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import ThreadedSim
from tests.cli.test_empiar_cli import World, tree_md5, world  # noqa: F401 - world is a fixture
from tests.conftest import tree_digests, upload_bytes
from tests.e2e.conftest import worker_env
from tests.e2e.test_cluster import _finished, _lines, _peer_pid, worker_killing_tus
from tests.e2e.test_cluster_empiar import _ascp_env, _on_cluster, _report
from tests.e2e.test_cluster_failures import CLI, _left_on_scheduler, _runtimes

distributed = pytest.importorskip("distributed")


def _allowed_failures(client: Any, n: int) -> int:
    def swap(n: int, dask_scheduler: Any = None) -> int:
        old: int = dask_scheduler.allowed_failures
        dask_scheduler.allowed_failures = n
        return old

    return client.run_on_scheduler(swap, n)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_batch_the_cluster_gives_up_on_is_sent_again_by_the_retry_rounds(
        cluster: Any, client: Any, tmp_path: Path, journal: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(2 * (1 << 20) + 1000 * i) for i in range(4)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    pids = set(client.run(os.getpid).values())
    store = tmp_path / "tus-store"
    app, faults, killed = worker_killing_tus(store, pids, 3)

    old = _allowed_failures(client, 0)  # the scheduler gives up on a batch the first time its worker dies
    try:
        with ThreadedSim(app) as sim:
            url = f"tus+http://127.0.0.1:{sim.server.port}/files/"  # type: ignore[union-attr]
            rc = cli_main(["push", str(src), url, "--scheduler", cluster.scheduler_address, "--batch-files", "4",
                           "--chunk-size", "1M", "--bwlimit", "500M", "--journal", str(journal), "--json"])
            lines = _lines(capfd.readouterr().out)
    finally:
        _allowed_failures(client, old)
    report = _finished(lines)
    assert killed, "no worker was killed (the 3rd PATCH came from no worker?)"
    assert rc == 0, report["failures"]
    assert tree_digests(store / "complete") == tree_digests(src)
    assert upload_bytes(faults) >= sum(map(len, files.values()))
    # the lost batch's items failed transiently with the reason, and the next round sent them
    lost = [d for d in lines if d["event"] == "item_failed" and "the cluster lost this batch (KilledWorker" in d["error"]]
    assert {d["rel"] for d in lost} == set(files) and all(d["transient"] for d in lost)
    assert Counter(d["rel"] for d in lines if d["event"] == "item_done") == Counter(list(files))
    assert report["files_done"] == len(files) and report["cluster"]["batches"] >= 2


@pytest.mark.slow
def test_a_scheduler_that_refuses_is_a_usage_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 10)
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = cli_main(["push", str(src), f"file://{tmp_path / 'dst'}", "--scheduler", f"tcp://127.0.0.1:{port}",
                   "--journal", str(tmp_path / "j.sqlite")])
    err = capfd.readouterr().err
    assert rc == 2
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in err
    assert "--local-cluster N" in err
    assert not (tmp_path / "dst" / "a.bin").exists()


def test_without_dask_the_cluster_options_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    monkeypatch.setitem(sys.modules, "distributed", None)  # how Python marks a module that cannot be imported
    rc = cli_main(["push", str(src), f"file://{tmp_path / 'dst'}", "--local-cluster", "1",
                   "--journal", str(tmp_path / "j.sqlite")])
    err = capfd.readouterr().err
    assert rc == 2 and "running on a cluster needs dask distributed" in err and "asyncdepo[dask]" in err
    assert not (tmp_path / "dst").exists()


class _OnScheduler:
    """A client whose ``run_on_scheduler`` calls the function on the in-process scheduler object itself:
    dask sends functions by value renamed ``<dynamic-code>``, so their lines are measured only this way.
    Everything else is the real client's."""

    def __init__(self, client: Any, scheduler: Any) -> None:
        self._client, self._scheduler = client, scheduler

    async def run_on_scheduler(self, fn: Any, *args: Any) -> Any:
        out = fn(*args, dask_scheduler=self._scheduler)
        return await out if hasattr(out, "__await__") else out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_sweep_forgets_a_jobs_channels_checkpoints_and_semaphore_only() -> None:
    from distributed.diagnostics.plugin import WorkerPlugin

    async with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                                        asynchronous=True) as lc, \
            distributed.Client(lc, asynchronous=True, set_as_default=False) as client:
        sched = lc.scheduler
        for job in ("asyncdepo-j1-", "asyncdepo-j2-"):
            await client.register_plugin(WorkerPlugin(), name=job + "t-secrets")
            await distributed.Variable(job + "t-b1", client=client).set({"rows": 1})
            sem = distributed.Semaphore(max_leases=2, name=job + "requests", scheduler_rpc=client.scheduler,
                                        loop=client.loop)
            await sem.acquire()

        def held(prefix: str) -> list[str]:
            ext = sched.extensions
            return sorted([n for n in sched.worker_plugins if n.startswith(prefix)]
                          + [n for n in ext["variables"].variables if n.startswith(prefix)]
                          + [n for n in ext["semaphores"].max_leases if n.startswith(prefix)])

        assert held("asyncdepo-j1-") == ["asyncdepo-j1-requests", "asyncdepo-j1-t-b1", "asyncdepo-j1-t-secrets"]
        await sweep(_OnScheduler(client, sched), "asyncdepo-j1-", plugins=True)
        assert held("asyncdepo-j1-") == []
        assert len(held("asyncdepo-j2-")) == 3  # another job's are left alone
        await sweep(_OnScheduler(client, sched), "asyncdepo-j2-", plugins=False)
        assert held("asyncdepo-j2-") == ["asyncdepo-j2-t-secrets"]  # channels only with plugins=True


@pytest.mark.slow
def test_ctrl_c_on_a_cluster_job_takes_everything_back_and_resume_completes(
        cluster: Any, client: Any, tmp_path: Path, dataset: Path, journal: Path, threaded_tus: ThreadedSim,
        capfd: pytest.CaptureFixture[str]) -> None:
    faults = threaded_tus.faults  # type: ignore[attr-defined]
    stalled = threading.Event()
    faults.on_stall.append(lambda n: stalled.set())
    threaded_tus.call(lambda: faults.add("PATCH * stall skip=2 first=0"))
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"  # type: ignore[union-attr]
    argv = ["push", str(dataset), url, "--scheduler", cluster.scheduler_address, "--batch-files", "4",
            "--chunk-size", "1M", "--journal", str(journal)]
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert stalled.wait(timeout=120), "the push never reached the stall"
        proc.send_signal(signal.SIGINT)  # Ctrl-C while batches are out, items in flight on the workers
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err
    (job,) = orjson.loads((cli_main(["jobs", "--journal", str(journal), "--json"]), capfd.readouterr().out)[1])
    prefix = f"asyncdepo-{job['id']}-"
    # the interrupted coordinator took its credentials back (the workers closed the run's runtime) and its
    # request semaphore; a batch still finishing on a worker may write its checkpoint after the sweep: the
    # job's next run sweeps that
    left = _left_on_scheduler(client, prefix)
    assert left["plugins"] == [] and left["semaphores"] == [], left
    assert not [c for c in _runtimes(client) if c.startswith(prefix)]
    threaded_tus.call(faults.clear)
    threaded_tus.call(faults.release_stalls)
    rc = cli_main(["resume", job["id"], "--journal", str(journal), "--scheduler", cluster.scheduler_address])
    assert rc == 0, capfd.readouterr().err
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(dataset)  # type: ignore[attr-defined]
    assert _left_on_scheduler(client, prefix) == {"plugins": [], "variables": [], "semaphores": []}


def test_a_source_that_is_not_there_ends_the_cluster_job_before_any_batch(
        cluster: Any, client: Any, tmp_path: Path, journal: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["push", str(tmp_path / "missing"), f"file://{tmp_path / 'dst'}", "--scheduler",
                   cluster.scheduler_address, "--journal", str(journal)])
    err = capfd.readouterr().err
    assert rc == 2 and str(tmp_path / "missing") in err, err
    assert not (tmp_path / "dst").exists()
    assert not [p for p in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
                if p.startswith("asyncdepo-")]


async def test_push_on_cluster_refuses_a_packed_archive_before_it_connects(tmp_path: Path) -> None:
    import dataclasses

    from asyncdepo.adapters.local import LocalAdapter
    from asyncdepo.config import EngineConfig
    from asyncdepo.engine.cluster import push_on_cluster
    from asyncdepo.engine.cluster_setup import ClusterOptions
    from asyncdepo.errors import UsageError

    # the option check of the API itself (the CLI refuses PDIS earlier): a target that packs the source
    adapter = LocalAdapter(f"file://{tmp_path / 'dst'}")
    adapter.features = dataclasses.replace(adapter.features, packed=True)
    with pytest.raises(UsageError, match="one packed upload") as exc:
        await push_on_cluster(tmp_path, adapter, EngineConfig(), lambda c: adapter,
                              ClusterOptions(scheduler="tcp://127.0.0.1:9"))
    assert "without --scheduler / --local-cluster" in (exc.value.hint or "")



@pytest.mark.slow
def test_files_the_workers_ascp_cannot_send_go_by_the_coordinators_globus(
        world: World, cluster: Any, client: Any, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from asyncdepo.cli import empiar as empiar_cli
    from asyncdepo.sim import globus as globus_sim

    # every ascp session on the workers finds no server (FASP code 12): not a refused login, so each file
    # fails on its own and goes to the coordinator's Globus
    with worker_env(client, **_ascp_env(ASYNCDEPO_SIM_ASCP_FAIL="noserver")):
        rc = empiar_cli.push_main(_on_cluster(world, cluster.scheduler_address, "--attempts", "1",
                                              *world.globus_argv()))
    report = _report(capsys.readouterr().out)
    assert rc == 0, report["failures"]
    entry = world.only_entry()
    assert entry.submitted and tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    sessions = world.sessions()
    assert len(sessions) == 6 and all(s["status"] != 0 and s["bytes"] == 0 for s in sessions)  # one per file
    assert world.globus.server is not None
    tasks = globus_sim.state_of(world.globus.server.app).tasks.values()
    assert sorted(i["destination_path"].rsplit("/", 1)[-1] for t in tasks for i in t.items) == sorted(
        p.name for p in world.data.rglob("*") if p.is_file())
    assert report["files_done"] == 6 and report["cluster"]["fallback"] == 6


@pytest.mark.slow
def test_a_lost_batch_keeps_the_items_its_worker_had_finished(cluster: Any, client: Any, tmp_path: Path,
                                                              journal: Path) -> None:
    import asyncio
    import queue

    src = tmp_path / "src"
    src.mkdir()
    files = {"small.bin": os.urandom(10_000), "big.bin": os.urandom(4 << 20)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    pids = set(client.run(os.getpid).values())
    store = tmp_path / "tus-store"
    holder: list[int] = []
    hanging = threading.Event()

    @web.middleware
    async def hang(request: web.Request, handler: Any) -> web.StreamResponse:
        # big.bin's second chunk, the first time: note the worker that sends it and never answer (the worker's
        # death closes the connection)
        if request.method == "PATCH" and not holder:
            up = request.app[tus.STATE_KEY].uploads.get(request.path.rsplit("/", 1)[-1])
            if up is not None and up.metadata.get("relpath") == "big.bin" and up.offset > 0:
                peer = request.transport.get_extra_info("peername") if request.transport else None
                pid = _peer_pid(peer[1], request.url.port or 0) if peer else None
                if pid in pids:
                    holder.append(pid)
                    hanging.set()
                    await asyncio.Event().wait()
        return await handler(request)

    def app() -> web.Application:
        a = tus.build_app(store, FaultInjector(), None)
        a.middlewares.insert(0, hang)
        return a

    old = _allowed_failures(client, 0)
    lines: list[dict[str, Any]] = []
    errfile = open(tmp_path / "stderr.txt", "wb")  # noqa: SIM115 - closed below
    try:
        with ThreadedSim(app) as sim:
            url = f"tus+http://127.0.0.1:{sim.server.port}/files/"  # type: ignore[union-attr]
            proc = subprocess.Popen([*CLI, "push", str(src), url, "--scheduler", cluster.scheduler_address,
                                     "--batch-files", "2", "--transfers", "2", "--chunk-size", "1M", "--journal",
                                     str(journal), "--json"], stdout=subprocess.PIPE, stderr=errfile)
            out: queue.Queue[bytes] = queue.Queue()
            reader = threading.Thread(target=lambda: [out.put(line) for line in proc.stdout or ()], daemon=True)
            reader.start()
            try:
                # the coordinator has small.bin done (from the worker's progress) while big.bin hangs
                while not any(d.get("event") == "item_done" and d.get("rel") == "small.bin" for d in lines):
                    line = out.get(timeout=120)
                    if line.startswith(b"{"):
                        lines.append(orjson.loads(line))
                assert hanging.wait(timeout=120), "big.bin's second chunk never came"
                os.kill(holder[0], signal.SIGKILL)
                proc.wait(timeout=300)
                reader.join(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            while not out.empty():
                line = out.get()
                if line.startswith(b"{"):
                    lines.append(orjson.loads(line))
    finally:
        _allowed_failures(client, old)
        errfile.close()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
    assert tree_digests(store / "complete") == tree_digests(src)
    failed = [(d["rel"], d["transient"]) for d in lines if d["event"] == "item_failed"
              and "the cluster lost this batch (KilledWorker" in d["error"]]
    assert failed == [("big.bin", True)]  # small.bin was finished: it is not failed with its batch
    assert Counter(d["rel"] for d in lines if d["event"] == "item_done") == Counter(list(files))
