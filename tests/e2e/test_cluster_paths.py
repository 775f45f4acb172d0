"""The cluster job's recovery paths with real faults: a worker process killed while it sends, with the
scheduler giving up on the batch at once (``KilledWorker``): the batch's items fail transiently and the
run's retry rounds send them again; a scheduler address that refuses; dask missing; the sweep of a killed
run's leftovers against a real scheduler's extensions. Outcomes: bytes on the target, the JSON events and
report, exit codes and messages, what the scheduler holds."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from asyncdepo.cli import main as cli_main
from asyncdepo.engine.cluster_setup import sweep
from asyncdepo.sim import tus
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import ThreadedSim
from tests.conftest import tree_digests, upload_bytes
from tests.e2e.test_cluster import _finished, _lines, _peer_pid

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
    faults = FaultInjector()
    store = tmp_path / "tus-store"
    killed: list[int] = []
    seen = Counter[str]()

    @web.middleware
    async def killer(request: web.Request, handler: Any) -> web.StreamResponse:
        # the 3rd request carrying bytes: SIGKILL the worker process that sends it, while it sends
        if request.method == "PATCH":
            seen["patches"] += 1
            if seen["patches"] == 3 and not killed:
                peer = request.transport.get_extra_info("peername") if request.transport else None
                pid = _peer_pid(peer[1], request.url.port or 0) if peer else None
                if pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return await handler(request)

    def app() -> web.Application:
        a = tus.build_app(store, faults, None)
        a.middlewares.append(killer)
        return a

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
