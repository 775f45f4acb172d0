"""One push over the workers of a Dask cluster, through the CLI, against the tus simulator, S3 (moto), a
directory and gypsum: the target equals the source, every worker did work, the journal and ``asyncdepo
status`` are complete; credentials never reach the task graph, logs or events; a worker killed mid-batch
costs at most one chunk per item it had in flight; a packed archive refuses to be split.

The cluster of most tests is shared (tests/e2e/conftest.py: two worker processes, started once); the tus
test starts its own through ``--local-cluster 2``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from asyncdepo.cli import main as cli_main
from asyncdepo.sim import tus
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import ThreadedSim
from tests.conftest import tree_digests, upload_bytes

distributed = pytest.importorskip("distributed")

pytest_plugins = ["tests.adapters.s3_servers"]

CHUNK = 1 << 20


def _lines(out: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]


def _finished(lines: list[dict[str, Any]]) -> dict[str, Any]:
    report: dict[str, Any] = next(d for d in lines if d["event"] == "job_finished")["report"]
    return report


def _status(job: str, journal: Path, capfd: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli_main(["status", job, "--journal", str(journal), "--json"]) == 0
    status: dict[str, Any] = orjson.loads(capfd.readouterr().out)
    return status


def _both_worked(report: dict[str, Any]) -> None:
    workers = report["workers"]
    assert len(workers) == 2, workers
    assert all(w["files"] > 0 and w["batches"] > 0 for w in workers.values()), workers
    assert sum(w["files"] for w in workers.values()) == report["files_done"]


def test_local_cluster_push_to_tus(tmp_path: Path, dataset: Path, journal: Path, threaded_tus: ThreadedSim,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"  # type: ignore[union-attr]
    rc = cli_main(["push", str(dataset), url, "--local-cluster", "2", "--batch-files", "4", "--chunk-size", "1M",
                   "--transfers", "3", "--journal", str(journal), "--json"])
    lines = _lines(capfd.readouterr().out)
    report = _finished(lines)
    assert rc == 0, report["failures"]
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(dataset)  # type: ignore[attr-defined]
    assert report["files_done"] == 44 and report["bytes"] == sum(p.stat().st_size for p in dataset.rglob("*")
                                                                   if p.is_file())
    _both_worked(report)
    # every item recorded once; the display saw the workers' bytes move
    assert Counter(d["rel"] for d in lines if d["event"] == "item_done") == Counter(
        p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert any(d["event"] == "item_started" for d in lines)
    assert report["bytes_sent"] >= report["bytes"]
    status = _status(report["job_id"], journal, capfd)
    assert status["counts"] == {"done": {"files": 44, "bytes": report["bytes"]}}
    assert status["job"]["state"] == "done"
    # the coordinator held a bounded number of items: batches of 4, two per worker thread
    assert report["cluster"]["max_items_held"] <= 4 * 2 * 4


def test_cluster_push_to_s3(cluster: Any, tmp_path: Path, moto_server: Any, journal: Path,
                            monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    files = {f"d{i % 3}/f{i:02d}.bin": os.urandom(20_000 + 997 * i) for i in range(24)}
    files["big/parted.raw"] = os.urandom(11 * CHUNK + 123)  # three parts of 5 MiB (S3's smallest)
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(body)
    bucket = moto_server.new_bucket()
    # the workers were started without AWS credentials: they get the coordinator's in the handoff
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    rc = cli_main(["push", str(src), f"s3://{bucket}/ds", "--endpoint-url", moto_server.endpoint_url,
                   "--scheduler", cluster.scheduler_address, "--batch-files", "3", "--chunk-size", "5M",
                   "--journal", str(journal), "--json"])
    report = _finished(_lines(capfd.readouterr().out))
    assert rc == 0, report["failures"]
    s3 = moto_server.client()
    for rel, body in files.items():
        assert s3.get_object(Bucket=bucket, Key=f"ds/{rel}")["Body"].read() == body
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    _both_worked(report)
    status = _status(report["job_id"], journal, capfd)
    assert status["counts"] == {"done": {"files": len(files), "bytes": sum(map(len, files.values()))}}
    # a rerun finds everything done in the journal: nothing is handed out
    rc = cli_main(["push", str(src), f"s3://{bucket}/ds", "--endpoint-url", moto_server.endpoint_url,
                   "--scheduler", cluster.scheduler_address, "--journal", str(journal), "--json"])
    again = _finished(_lines(capfd.readouterr().out))
    assert rc == 0 and again["files_skipped"] == len(files) and again["cluster"].get("batches", 0) == 0


def test_cluster_push_to_directory_and_resume_flags(cluster: Any, tmp_path: Path, dataset: Path, journal: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "dst"
    rc = cli_main(["push", str(dataset), f"file://{dst}", "--scheduler", cluster.scheduler_address,
                   "--batch-files", "5", "--journal", str(journal), "-q"])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert tree_digests(dst) == tree_digests(dataset)
    assert "worker " in err  # the per-worker lines of the report
    # resume takes the cluster flags (here: a changed file goes again, through the cluster)
    (dataset / "d1" / "small_001.bin").write_bytes(b"changed")
    status = orjson.loads((cli_main(["jobs", "--journal", str(journal), "--json"]), capfd.readouterr().out)[1])
    job = status[0]["id"]
    rc = cli_main(["resume", job, "--journal", str(journal), "--scheduler", cluster.scheduler_address])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert "--scheduler" in err.splitlines()[0]  # "resuming: asyncdepo push ... --scheduler ..."
    assert " 1 sent, 43 skipped" in err and "in 1 batches" in err
    assert (dst / "d1" / "small_001.bin").read_bytes() == b"changed"


def test_cluster_push_to_gypsum(cluster: Any, tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch,
                                capfd: pytest.CaptureFixture[str]) -> None:
    from asyncdepo.adapters.gypsum.api import GypsumClient
    from asyncdepo.cli import gypsum as gcli
    from asyncdepo.sim import gypsum as gsim

    owner, admin = "tok-owner", "tok-admin"
    root = tmp_path / "gsim"
    src = tmp_path / "src"
    files = {f"d{i % 4}/f{i:03d}.bin": os.urandom(3000 + 17 * i) for i in range(30)}
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(body)
    with ThreadedSim(lambda: gsim.create_app(root, identities={owner: "olivia", admin: "root"},
                                             admins=["root"])) as sim:

        async def create() -> None:
            async with GypsumClient(sim.url, admin) as c:
                await c.create_project("proj", ["olivia"], [])

        import anyio

        anyio.run(create)
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_URL", sim.url)
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", owner)
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        rc = gcli.push_main([str(src), "proj/asset/v1", "--scheduler", cluster.scheduler_address, "--batch-files",
                             "4", "--journal", str(journal), "--json"])
        report = _finished(_lines(capfd.readouterr().out))
        assert rc == 0, report["failures"]
        assert report["summary"]["state"] == "completed"  # the coordinator completed the upload
        stored = root / "bucket" / "proj" / "asset" / "v1"
        assert {p.relative_to(stored).as_posix(): p.read_bytes() for p in stored.rglob("*")
                if p.is_file() and not p.name.startswith("..")} == files
        _both_worked(report)
        assert not (root / "bucket" / "proj" / "..LOCK").exists()


def test_max_requests_holds_over_all_workers(cluster: Any, tmp_path: Path, dataset: Path, journal: Path,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    faults = FaultInjector()
    faults.add("PATCH * delay=0.02 first=0")  # requests overlap when nothing holds them back
    store = tmp_path / "tus-store"
    active = Counter[str]()

    @web.middleware
    async def gauge(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method in ("PATCH", "POST"):
            active["now"] += 1
            active["most"] = max(active["most"], active["now"])
            try:
                return await handler(request)
            finally:
                active["now"] -= 1
        return await handler(request)

    def app() -> web.Application:
        a = tus.build_app(store, faults, None)
        a.middlewares.insert(0, gauge)
        return a

    with ThreadedSim(app) as sim:
        url = f"tus+http://127.0.0.1:{sim.server.port}/files/"  # type: ignore[union-attr]
        rc = cli_main(["push", str(dataset), url, "--scheduler", cluster.scheduler_address, "--batch-files", "4",
                       "--chunk-size", "1M", "--transfers", "4", "--max-requests", "2", "--journal", str(journal),
                       "--json"])
    report = _finished(_lines(capfd.readouterr().out))
    assert rc == 0, report["failures"]
    assert tree_digests(store / "complete") == tree_digests(dataset)
    _both_worked(report)
    assert 1 <= active["most"] <= 2, active  # two workers of four transfers each, two requests at most


def _peer_pid(port: int, server_port: int) -> int | None:
    """The process whose TCP socket has local ``port`` and talks to ``server_port``."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == server_port:
            return conn.pid
    return None


def worker_killing_tus(store: Path, pids: set[int], nth: int) -> tuple[Callable[[], web.Application],
                                                                        FaultInjector, list[int]]:
    """A tus simulator (its app factory, its fault injector) that SIGKILLs the worker process (one of ``pids``)
    sending the ``nth`` request carrying bytes (a PATCH; a POST only creates the upload), while it sends; the
    pid killed goes into the list returned."""
    faults = FaultInjector()
    killed: list[int] = []
    seen = Counter[str]()

    @web.middleware
    async def killer(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "PATCH":
            seen["patches"] += 1
            if seen["patches"] == nth and not killed:
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

    return app, faults, killed


def test_secrets_stay_out_of_the_task_graph_logs_and_events(cluster: Any, client: Any, tmp_path: Path,
                                                            dataset: Path, journal: Path,
                                                            threaded_tus: ThreadedSim) -> None:
    token = "sekret-token-5d9f1c2e77"
    faults: FaultInjector = threaded_tus.faults  # type: ignore[attr-defined]
    stalled = threading.Event()
    faults.on_stall.append(lambda n: stalled.set())
    threaded_tus.call(lambda: faults.add("PATCH * stall skip=2 first=0"))
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"  # type: ignore[union-attr]
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncdepo.cli", "push", str(dataset), url, "--scheduler", cluster.scheduler_address,
         "--batch-files", "4", "--chunk-size", "1M", "--journal", str(journal), "--json", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "ASYNCDEPO_TUS_TOKEN": token})
    try:
        assert stalled.wait(timeout=120), "the push never reached the stall"

        def scheduler_view(dask_scheduler: Any) -> dict[str, Any]:
            import cloudpickle

            return {
                "tasks": [(str(key), repr(ts), repr(ts.run_spec), cloudpickle.dumps(ts.run_spec))
                          for key, ts in dask_scheduler.tasks.items()],
                "plugins": list(dask_scheduler.worker_plugins),
            }

        view = client.run_on_scheduler(scheduler_view)
        assert any(name.startswith("asyncdepo-") for name, *_ in view["tasks"]), view["tasks"]
        for name, ts_repr, spec_repr, spec_bytes in view["tasks"]:
            assert token not in name and token not in ts_repr and token not in spec_repr
            assert token.encode() not in spec_bytes
        events = client.get_events()  # every topic, ours (the workers' progress) included
        assert any(topic.startswith("asyncdepo-") for topic in events), list(events)
        assert token not in repr(events)
        assert all(token not in p for p in view["plugins"])
        logs = repr(client.get_scheduler_logs()) + repr(client.get_worker_logs())
        assert token not in logs
        # the workers do use it: every request the simulator saw was authorised (tus sim takes any token)
    finally:
        threaded_tus.call(faults.clear)
        threaded_tus.call(faults.release_stalls)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert token.encode() not in out + err
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(dataset)  # type: ignore[attr-defined]
    # the job's end took the credentials back from the scheduler and the workers
    assert not [p for p in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
                if p.startswith("asyncdepo-")]
    assert token not in repr(client.get_worker_logs())


def test_packed_archive_refuses_to_run_on_a_cluster(tmp_path: Path, dataset: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["push", "pdis", str(dataset), "--pdb", "1ABC", "--local-cluster", "2"])
    err = capfd.readouterr().err
    assert rc == 2
    assert "one packed upload" in err and "one node" in err


def test_worker_killed_mid_batch_costs_at_most_a_chunk_per_item_in_flight(
        cluster: Any, client: Any, tmp_path: Path, journal: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(8):
        (src / f"frame_{i}.bin").write_bytes(os.urandom(6 * CHUNK + i))
    total = sum(p.stat().st_size for p in src.iterdir())
    by_pid = {pid: str(client.scheduler_info()["workers"][addr]["name"])
              for addr, pid in client.run(os.getpid).items()}
    pids = set(by_pid)
    store = tmp_path / "tus-store"
    app, faults, killed = worker_killing_tus(store, pids, 24)

    transfers = 2
    with ThreadedSim(app) as sim:
        url = f"tus+http://127.0.0.1:{sim.server.port}/files/"  # type: ignore[union-attr]
        rc = cli_main(["push", str(src), url, "--scheduler", cluster.scheduler_address, "--batch-files", "1",
                       "--chunk-size", "1M", "--transfers", str(transfers), "--journal", str(journal), "--json"])
        lines = _lines(capfd.readouterr().out)
    report = _finished(lines)
    assert killed, "no worker was killed (the 24th PATCH came from no worker?)"
    assert rc == 0, report["failures"]
    assert tree_digests(store / "complete") == tree_digests(src)
    resent = upload_bytes(faults) - total
    # the killed worker had sent bytes, and had at most --transfers items in flight, each with at most one
    # chunk on the wire: what it had confirmed was taken over from its checkpoint, not sent again
    assert report["workers"][by_pid[killed[0]]]["bytes_sent"] > 0, report["workers"]
    assert 0 <= resent <= transfers * CHUNK, resent
    done = Counter(d["rel"] for d in lines if d["event"] == "item_done")
    assert done == Counter(p.name for p in src.iterdir())  # each item recorded exactly once
    assert report["files_done"] == 8
    status = _status(report["job_id"], journal, capfd)
    assert status["counts"] == {"done": {"files": 8, "bytes": total}}
