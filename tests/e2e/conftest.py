"""The Dask cluster the cluster tests share (tests/e2e/test_cluster*.py): two worker processes with two task
threads each, as ``dask worker`` would start them, created once per test session on first use.

Workers are started before any test's environment is patched (a session fixture is set up before the
function fixtures of the test that first asks for it), so they hold no credential of a test: what they use
comes from the coordinator's handoff. A test that needs a variable on the workers (the stand-in ascp's)
sets it with :func:`worker_env`, which takes it back afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as lc:
        yield lc


@pytest.fixture
def client(cluster: Any) -> Iterator[Any]:
    import distributed

    with distributed.Client(cluster) as c:
        c.wait_for_workers(2, timeout=120)  # a worker a test killed is back (its nanny restarts it)
        yield c


def _set_env(values: dict[str, str | None]) -> dict[str, str | None]:
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return before


@contextlib.contextmanager
def worker_env(client: Any, **values: str) -> Iterator[None]:
    """Set environment variables in every worker process for the block (a worker restarted meanwhile, e.g.
    after a kill, starts without them)."""
    before: dict[str, dict[str, str | None]] = client.run(_set_env, dict(values))
    try:
        yield
    finally:
        for worker, old in before.items():
            with contextlib.suppress(Exception):
                client.run(_set_env, old, workers=[worker])


def worker_pids(client: Any) -> dict[int, str]:
    """pid -> name of every worker process."""
    names = {addr: str(w["name"]) for addr, w in client.scheduler_info()["workers"].items()}
    return {pid: names[addr] for addr, pid in client.run(os.getpid).items()}
