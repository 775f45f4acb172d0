"""Reaching a Dask cluster for one job: where it runs and how it is cut (:class:`ClusterOptions`), the client
(:func:`connect`: an existing scheduler, or a LocalCluster started and stopped here), and the sweep of what
runs of a job left on the scheduler (:func:`sweep`). Used by the coordinator (:mod:`asyncdepo.engine.cluster`);
imports dask's ``distributed`` on first use only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from asyncdepo.errors import UsageError


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """Where the job runs and how it is cut.

    :param scheduler: address of an existing Dask scheduler (``tcp://HOST:8786``).
    :param local_workers: start a ``distributed.LocalCluster`` of this many worker processes instead.
    :param threads_per_worker: task threads of each local worker: two, so a worker starts its next batch
        while the last items of one are still moving.
    :param batch_files: most items in one batch; :param batch_bytes: most bytes in one batch.
    :param max_requests: requests in flight to the target over all workers together (None: no job-wide cap
        beyond each worker's ``--transfers``; an archive's ``max_concurrency`` always holds job-wide).
    :param batches_per_thread: batches handed out per worker thread before one comes back.
    """

    scheduler: str | None = None
    local_workers: int = 0
    threads_per_worker: int = 2
    batch_files: int = 256
    batch_bytes: int = 1 << 30
    max_requests: int | None = None
    batches_per_thread: int = 2



async def sweep(client: Any, prefix: str, *, plugins: bool) -> None:
    """Forget what runs of a job left on the scheduler (names starting with ``prefix``): with ``plugins`` the
    secret channels of earlier runs — unregistered first, so the workers forget those credentials and close
    those runs' runtimes (cancelling batches still running there) — then the batches' checkpoints
    (Variables) and the request semaphore. A coordinator killed with SIGKILL leaves all of them; the next run
    of the job, which holds the job's lock (so no earlier run is alive), clears them. Progress events stay
    in the scheduler's event log (bounded by dask; file names and byte counts, no credential).

    The scheduler runs the sweep as functions sent by value (nested functions), so it needs no asyncdepo
    installed; they reach into dask's scheduler extensions, and leave alone what a version of dask does not
    have.
    """

    def channels(prefix: str, dask_scheduler: Any = None) -> list[str]:
        return [n for n in dask_scheduler.worker_plugins if str(n).startswith(prefix)]

    async def forget(prefix: str, dask_scheduler: Any = None) -> None:
        import warnings

        variables = dask_scheduler.extensions.get("variables")
        if variables is not None:
            for name in [n for n in variables.variables if str(n).startswith(prefix)]:
                await variables.delete(name=name)
        semaphores = dask_scheduler.extensions.get("semaphores")
        if semaphores is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "unreleased leases": those of the dead run's workers
                for name in [n for n in semaphores.max_leases if str(n).startswith(prefix)]:
                    semaphores.close(name=name)

    if plugins:
        for name in await client.run_on_scheduler(channels, prefix):
            with contextlib.suppress(Exception):  # a plugin gone meanwhile
                await client.unregister_worker_plugin(name)
    await client.run_on_scheduler(forget, prefix)


@contextlib.asynccontextmanager
async def connect(options: ClusterOptions) -> AsyncIterator[Any]:
    """A Dask client: on the scheduler at ``options.scheduler``, or on a LocalCluster started (and stopped)
    here.

    :raises UsageError: dask is not installed, or the scheduler cannot be reached.
    """
    try:
        import distributed
    except ImportError:
        raise UsageError("running on a cluster needs dask distributed",
                         hint="pip install 'asyncdepo[dask]'") from None
    import logging

    # dask logs at INFO on its own logger; follow the command's level (-v shows them)
    logging.getLogger("distributed").setLevel(max(logging.getLogger().getEffectiveLevel(), logging.INFO))
    async with contextlib.AsyncExitStack() as stack:
        if options.local_workers:
            cluster = await stack.enter_async_context(distributed.LocalCluster(
                n_workers=options.local_workers, threads_per_worker=options.threads_per_worker,
                processes=True, dashboard_address=None, worker_dashboard_address=None, asynchronous=True,
                silence_logs=logging.ERROR))
            address: Any = cluster
        else:
            address = options.scheduler
        try:
            client = await stack.enter_async_context(
                distributed.Client(address, asynchronous=True, timeout="30s", set_as_default=False))
        except OSError as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {options.scheduler}: {exc}",
                             hint="start one with `dask scheduler` and workers with `dask worker ADDRESS`, "
                                  "or use --local-cluster N") from None
        yield client


