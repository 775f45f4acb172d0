"""Failures on a cluster's workers keep their meaning, through the CLI: a full target disk stops the run
early with one message and part files kept (as on one node), a source deleted while a worker sends it fails
"source vanished" and its upload is removed from the target (as on one node, tested alongside), and a coordinator killed with SIGKILL leaves
credentials and checkpoints on the scheduler only until the next run of the job sweeps them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
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
from tests.conftest import cli_process, tree_digests
from tests.e2e.test_disk_full import _check_one_message, _source, small_disk  # noqa: F401 - small_disk: fixture

pytest.importorskip("distributed")

CHUNK = 1 << 20
CLI = [sys.executable, "-m", "asyncdepo.cli"]


def test_full_disk_on_the_workers_stops_the_run_with_one_message(
        cluster: Any, tmp_path: Path, journal: Path,
        small_disk: tuple[Path, Callable[[str], None]]) -> None:  # noqa: F811
    disk, resize = small_disk
    src = _source(tmp_path / "src")  # 6 MiB and a little more, into 4 MiB
    argv = ("push", str(src), f"file://{disk}", "--scheduler", cluster.scheduler_address, "--batch-files", "1",
            "--journal", str(journal), "--chunk-size", "1M", "--transfers", "2")
    full = cli_process(*argv)
    assert full.returncode == 1, full.stderr
    _check_one_message(full.stderr, disk)  # how much space is missing, parts kept, no retry, said once
    assert list(disk.glob("*.asyncdepo-part"))  # kept for the resume
    resize("32m")
    again = cli_process(*argv)
    assert again.returncode == 0, again.stderr
    assert tree_digests(disk) == tree_digests(src) and not list(disk.glob("*.asyncdepo-part"))


@pytest.mark.parametrize("where", ["one node", "cluster"])
def test_source_vanished_while_it_is_sent_is_removed_from_the_target(
        where: str, request: pytest.FixtureRequest, tmp_path: Path, journal: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    on = ["--scheduler", request.getfixturevalue("cluster").scheduler_address] if where == "cluster" else []
    src = tmp_path / "src"
    src.mkdir()
    for name, size in {"gone.bin": 3 * CHUNK + 5, "keep.bin": 2 * CHUNK, "small.txt": 100}.items():
        (src / name).write_bytes(os.urandom(size))
    store = tmp_path / "tus-store"
    deleted: list[str] = []

    @web.middleware
    async def vanish(request: web.Request, handler: Any) -> web.StreamResponse:
        # the first PATCH of gone.bin after its first chunk: the source file is deleted, and the request
        # fails, so the worker's next attempt finds the file gone
        if request.method == "PATCH" and not deleted:
            up = request.app[tus.STATE_KEY].uploads.get(request.path.rsplit("/", 1)[-1])
            if up is not None and up.metadata.get("relpath") == "gone.bin" and up.offset > 0:
                (src / "gone.bin").unlink()
                deleted.append(request.path)
                return web.Response(status=503, text="injected")
        return await handler(request)

    def app() -> web.Application:
        a = tus.build_app(store, FaultInjector(), None)
        a.middlewares.insert(0, vanish)
        return a

    with ThreadedSim(app) as sim:
        url = f"tus+http://127.0.0.1:{sim.server.port}/files/"  # type: ignore[union-attr]
        rc = cli_main(["push", str(src), url, *on, "--chunk-size", "1M", "--request-attempts", "1", "--journal",
                       str(journal), "--json"])
        out = capfd.readouterr().out
        assert sim.server is not None
        uploads = list(sim.server.app[tus.STATE_KEY].uploads.values())
    assert deleted, "gone.bin was never deleted (no PATCH after its first chunk?)"
    report = next(e["report"] for e in map(orjson.loads, out.splitlines()) if e["event"] == "job_finished")
    assert rc == 1 and [f["rel"] for f in report["failures"]] == ["gone.bin"]
    assert "source vanished" in report["failures"][0]["error"]
    # what the target held of it was removed (on a cluster: the coordinator terminated the worker's upload)
    (gone,) = [u for u in uploads if u.metadata.get("relpath") == "gone.bin"]
    assert gone.terminated and 0 < gone.offset < 3 * CHUNK + 5
    assert tree_digests(store / "complete") == tree_digests(src)
    assert cli_main(["status", report["job_id"], "--journal", str(journal), "--json"]) == 1
    st = orjson.loads(capfd.readouterr().out)
    assert st["failures"] == [{"rel": "gone.bin", "error": "source vanished", "transient": False}]
    assert st["counts"]["done"]["files"] == 2


def _left_on_scheduler(client: Any, prefix: str) -> dict[str, list[str]]:
    """What the scheduler holds under ``prefix``: plugins, variables, semaphores."""

    def view(prefix: str, dask_scheduler: Any = None) -> dict[str, list[str]]:
        ext = dask_scheduler.extensions
        return {"plugins": [n for n in dask_scheduler.worker_plugins if n.startswith(prefix)],
                "variables": [n for n in ext["variables"].variables if n.startswith(prefix)],
                "semaphores": [n for n in ext["semaphores"].max_leases if n.startswith(prefix)]}

    return client.run_on_scheduler(view, prefix)  # type: ignore[no-any-return]


def _runtimes(client: Any) -> list[str]:
    def channels() -> list[str]:
        from asyncdepo.engine import cluster_worker

        return list(cluster_worker._RUNTIMES)

    return [c for cs in client.run(channels).values() for c in cs]


def test_a_killed_coordinators_leftovers_are_swept_by_the_next_run(
        cluster: Any, client: Any, tmp_path: Path, dataset: Path, journal: Path, threaded_tus: ThreadedSim,
        capfd: pytest.CaptureFixture[str]) -> None:
    faults = threaded_tus.faults  # type: ignore[attr-defined]
    stalled = threading.Event()
    faults.on_stall.append(lambda n: stalled.set())
    threaded_tus.call(lambda: faults.add("PATCH * stall skip=2 first=0"))
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"  # type: ignore[union-attr]
    argv = ["push", str(dataset), url, "--scheduler", cluster.scheduler_address, "--batch-files", "4",
            "--chunk-size", "1M", "--max-requests", "4", "--journal", str(journal)]
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert stalled.wait(timeout=120), "the push never reached the stall"
    finally:
        proc.kill()  # SIGKILL: the coordinator cleans nothing up
        proc.wait()
    (job,) = orjson.loads((cli_main(["jobs", "--journal", str(journal), "--json"]), capfd.readouterr().out)[1])
    prefix = f"asyncdepo-{job['id']}-"
    left = _left_on_scheduler(client, prefix)
    assert left["plugins"] and left["variables"] and left["semaphores"], left  # the dead run's
    assert any(c.startswith(prefix) for c in _runtimes(client))
    threaded_tus.call(faults.clear)
    threaded_tus.call(faults.release_stalls)
    rc = cli_main(["resume", job["id"], "--journal", str(journal), "--scheduler", cluster.scheduler_address])
    assert rc == 0, capfd.readouterr().err
    assert tree_digests(threaded_tus.store / "complete") == tree_digests(dataset)  # type: ignore[attr-defined]
    # the resumed run swept the dead run's channel (the workers closed its runtime), checkpoints and
    # semaphore, and left nothing of its own
    assert _left_on_scheduler(client, prefix) == {"plugins": [], "variables": [], "semaphores": []}
    assert not [c for c in _runtimes(client) if c.startswith(prefix)]
