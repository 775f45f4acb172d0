"""One push across the workers of a Dask distributed cluster: the coordinator.

Dask's scheduler keeps no state across a restart, so the process that runs the command owns the job: it
walks the source, holds the journal (and the job lock), runs the adapter's job-level steps (``prepare``,
``finish``) and hands out *batches* of items to the workers; the workers only send bytes. The run is the
ordinary one of :func:`asyncdepo.engine.scheduler.push` (journal, job, skip rules, digests before the start,
run-level retry rounds, report) with its pass replaced by :meth:`_Coordinator.send_pass`:

* the pass's items that still need sending (:func:`~asyncdepo.engine.scheduler.items_to_send`) are cut into
  batches of at most ``batch_files`` items and ``batch_bytes`` bytes (a larger file is a batch of its own)
  and submitted with ``Client.submit`` (:func:`~asyncdepo.engine.cluster_worker.run_batch`); at most
  ``batches_per_thread`` batches per worker thread are out at once, so the coordinator holds a bounded
  number of items whatever the number of files (batches stream from the walk; nothing lists every item);
* results are gathered with ``as_completed``; each item is journaled as its result arrives (or earlier, as
  the worker's progress reports it confirmed) and recorded exactly once: a batch run again after its
  worker died returns the items the dead worker had finished as such, and they are not counted again;
* a batch whose worker died is run again by Dask on another worker, from the checkpoint the dead one left
  (see :mod:`asyncdepo.engine.cluster_worker`); when Dask gives up on it (``KilledWorker``) its items fail
  transiently and the run's retry rounds send them again.

Limits hold for the whole job: ``--bwlimit`` is divided among the live workers (a change reaches a worker
with its next batch); ``--max-requests`` caps requests in flight over every worker together with a Dask
``Semaphore`` (leases of a dead worker expire); ``--transfers`` and the memory formula apply per worker.
Credentials reach the workers through the adapter's ``handoff`` in a worker plugin (never in a task, so
never in task keys, reprs, the scheduler's task state, logs or the dashboard); the plugin is unregistered
when the job ends.

One view of the job: workers report bytes moved, items in flight, retries and item events as Dask events
(``Worker.log_event``) on the job's topic; the coordinator adds them to its one :class:`~asyncdepo.accounting.Stats`
(through its methods), so the progress display, ``--json`` and the report are those of a one-node run, plus
per-worker counts in ``RunReport.workers``.

Failures keep their meaning: a worker returns each item's error with its class
(:class:`~asyncdepo.engine.cluster_wire.WireError`) and the coordinator records it as one node does
(:func:`~asyncdepo.engine.checks.fail_item`): a full disk stops the run (no more batches; the workers stop
the run's batches, :func:`~asyncdepo.engine.cluster_worker.stop_job`; one message at the end of the pass), a
vanished source's leftovers are discarded through the coordinator's adapter.

Session adapters (``Features.sessions``: EMPIAR over ascp) run their sessions on the workers; ``prepare`` and
``finish`` stay here, and what a worker's copy learned for ``finish`` comes back with each batch
(``Adapter.handback``). Items a worker failed for good (not a full disk, a vanished source or a lost batch)
go to the coordinator's own sessions over ``Adapter.fallback`` when the adapter has one (EMPIAR's Globus); a
refused login on a worker sends the rest of the pass there too, or, without a fallback, ends the job.

Each run sweeps what an earlier run of the same job left on the scheduler when its coordinator was killed
(the secret channel, checkpoints, the request semaphore): see :func:`~asyncdepo.engine.cluster_setup.sweep`.

Archives that take the whole dataset as one packed upload (``Features.packed``: PDIS) cannot be split:
:func:`push_on_cluster` refuses them. The source must be readable at the same path on every worker (a
shared file system).

Imports dask's ``distributed`` on first use only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Item
from asyncdepo.engine.checks import disk_full_failure, fail_item
from asyncdepo.engine.cluster_books import Books, Held, Recipe
from asyncdepo.engine.cluster_setup import ClusterOptions, connect, sweep
from asyncdepo.engine.cluster_wire import Batch, BatchResult, ItemResult, JobSpec, checkpoint_name
from asyncdepo.engine.report import RunReport, describe
from asyncdepo.engine.scheduler import Batches, items_to_send, push
from asyncdepo.engine.sessions import send_sessions
from asyncdepo.engine.transfer import Run
from asyncdepo.errors import (
    AuthError,
    DepoError,
    UsageError,
    is_transient,
)
from asyncdepo.events import Reporter


class _Coordinator(Books):
    """One job's side of the cluster; see the module docstring. What the workers report is applied by
    :class:`~asyncdepo.engine.cluster_books.Books`."""

    async def start(self, run: Run) -> None:
        """Sweep what killed earlier runs of the job left on the scheduler, hand the adapter's credentials to
        the workers and listen to their progress (once per run)."""
        from asyncdepo.engine.cluster_worker import SecretChannel

        self.run = run
        await sweep(self.client, f"asyncdepo-{run.job}-", plugins=True)
        cap = min(filter(None, (self.options.max_requests, run.features.max_concurrency)), default=None)
        topic = f"asyncdepo-{run.job}-{uuid.uuid4().hex[:8]}"
        self.channel = topic + "-secrets"
        self.spec = JobSpec(job=run.job, recipe=self.recipe, config=run.config, topic=topic,
                            channel=self.channel, requests=cap)
        handoff = await run.adapter.handoff()
        await self.client.register_plugin(SecretChannel(run.job, self.channel, handoff), name=self.channel)
        self.client.subscribe_topic(topic, self._heard)
        self.fallback = run.adapter.fallback() if run.features.sessions else None

    async def close(self) -> None:
        """Stop listening, take the credentials back from every worker and forget the run's state on the
        scheduler (shielded by the caller)."""
        if self.spec is not None:
            self.client.unsubscribe_topic(self.spec.topic)
        if self.channel is not None:
            with contextlib.suppress(Exception):  # a scheduler already gone holds nothing any more
                await self.client.unregister_worker_plugin(self.channel)
            self.channel = None
        if self.spec is not None:
            with contextlib.suppress(Exception):
                # the job's prefix, not only this run's topic: a batch task of a killed earlier run may still
                # have been running on a worker when this run started, and written its checkpoint since
                await sweep(self.client, f"asyncdepo-{self.spec.job}-", plugins=False)

    # -- a pass ----------------------------------------------------------------------------------------
    async def _rate(self) -> float | None:
        """This moment's share of ``--bwlimit`` for one worker (the live workers asked at most every 2 s)."""
        run = self.run
        assert run is not None
        if not run.config.bwlimit:
            return None
        stamp, live = self._live
        if time.monotonic() - stamp > 2.0:
            live = max(1, len(await self.client.nthreads()))
            self._live = (time.monotonic(), live)
        return run.config.bwlimit / live

    async def _stop(self, feeding: anyio.CancelScope) -> None:
        """The run stopped (a full disk): no more batches; the workers stop the run's batches."""
        from asyncdepo.engine.cluster_worker import stop_job

        self.stopping = True
        feeding.cancel()
        await self.client.run(stop_job, self.channel, on_error="ignore")

    async def send_pass(self, run: Run, batches: Batches, report: RunReport, skip: set[str],
                        digests: dict[str, dict[str, str]], *, count: bool = True) -> None:
        """The scheduler's pass, on the cluster (see the module docstring)."""
        from distributed import Variable, as_completed

        from asyncdepo.engine.cluster_worker import run_batch

        if self.run is None:
            await self.start(run)
        assert self.spec is not None
        spec = self.spec
        # the same objects fill in as the job goes on, so the report the run emits at its end has them
        report.workers = self.workers
        report.cluster = self.figures
        opts = self.options
        threads = sum((await self.client.nthreads()).values()) or 1
        window = anyio.Semaphore(max(2, opts.batches_per_thread * threads))
        futures: dict[str, Any] = {}
        pending = as_completed(loop=self.client.loop)
        walked = anyio.Event()
        more = anyio.Event()
        feeding = anyio.CancelScope()
        lane_in: anyio.abc.ObjectReceiveStream[tuple[Item, dict[str, Any] | None]] | None = None
        if self.fallback is not None:
            self.lane, lane_in = anyio.create_memory_object_stream[tuple[Item, dict[str, Any] | None]](
                self.fallback.features.session_items)

        async def submit(group: list[tuple[Item, Any]]) -> None:
            nonlocal more
            await window.acquire()
            self.figures["batches"] += 1
            key = f"b{self.figures['batches']}"
            held = Held(key, {i.rel: i for i, _ in group})
            chunks: dict[str, list[list[Any]]] = {}
            for i, s in group:
                if s is not None:
                    found = [[o, n, d] async for part in run.journal.chunks(run.job, i.rel) for o, n, d in part]
                    if found:
                        chunks[i.rel] = found
            batch = Batch(key=key, items=tuple((i.path, i.rel, i.size, i.mtime_ns) for i, _ in group),
                          saved={i.rel: s for i, s in group if s is not None}, chunks=chunks,
                          known={i.rel: digests[i.rel] for i, _ in group if i.rel in digests},
                          rate=await self._rate())
            with anyio.CancelScope(shield=True):  # held, checkpoint and future: all three, or none
                self.held[key] = held
                self.owner.update((rel, held) for rel in held.items)
                # the batch's checkpoint exists before it runs: a worker reads it without waiting for it
                await Variable(checkpoint_name(spec, key), client=self.client).set({})
                self.figures["max_items_held"] = max(self.figures["max_items_held"],
                                                     sum(len(h.items) for h in self.held.values()))
                future = self.client.submit(run_batch, spec, batch, key=f"{spec.topic}-{key}", pure=False)
                futures[future.key] = (future, key)
                pending.add(future)
            more.set()

        async def feed() -> None:
            group: list[tuple[Item, Any]] = []
            size = 0
            try:
                with feeding:
                    async for item, saved in items_to_send(run, batches, report, count, skip, digests):
                        if self.refused is not None and self.lane is not None:
                            await self._fall_back(item)  # the workers' login is refused: no batch can succeed
                            continue
                        group.append((item, saved))
                        size += max(0, item.size)
                        if len(group) >= opts.batch_files or size >= opts.batch_bytes:
                            await submit(group)
                            group, size = [], 0
                    if group:
                        await submit(group)
            finally:
                walked.set()
                more.set()

        async def gather() -> None:
            nonlocal more
            while True:
                async for future in pending:
                    _, key = futures.pop(future.key)
                    try:
                        await self._result(future, self.held[key], report)
                    finally:
                        self._forget(key)
                        window.release()
                    if report.stopped and not self.stopping:
                        await self._stop(feeding)
                if walked.is_set() and not futures:
                    if self.lane is not None:
                        await self.lane.aclose()
                    return
                await more.wait()
                more = anyio.Event()

        async def lane(stream: anyio.abc.ObjectReceiveStream[tuple[Item, dict[str, Any] | None]]) -> None:
            assert self.fallback is not None

            async def entries() -> AsyncIterator[tuple[Item, dict[str, Any] | None]]:
                async with stream:
                    async for entry in stream:
                        yield entry

            await send_sessions(dataclasses.replace(run, adapter=self.fallback), entries(),
                                lambda item, exc: fail_item(run, item, exc, report))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(feed)
                tg.start_soon(gather)
                if lane_in is not None:
                    tg.start_soon(lane, lane_in)
        finally:
            self.lane = None
            if futures:
                with anyio.CancelScope(shield=True):
                    await self.client.cancel([f for f, _ in futures.values()])
                    for _, key in futures.values():
                        self._forget(key)
        if report.stop_error is not None:
            await disk_full_failure(run, report)
            report.stop_error = None

    async def _result(self, future: Any, held: Held, report: RunReport) -> None:
        """Record what a batch's result says of each item not recorded yet."""
        from distributed import Variable

        run = self.run
        assert run is not None and self.spec is not None
        await self.drain()  # the worker's last progress first: bytes, rows, events in their order
        try:
            if future.status == "cancelled":  # by someone else (a restarted scheduler): not our cancellation
                raise RuntimeError("the scheduler cancelled the batch")
            result: BatchResult = await future
        except Exception as exc:  # noqa: BLE001 - the batch is lost; its items are retried by the run
            if isinstance(exc, DepoError):
                why, transient = describe(exc), is_transient(exc)
            else:  # KilledWorker: the workers that ran it died (Dask gives up after a few)
                why, transient = f"the cluster lost this batch ({type(exc).__name__}: {exc})", True
            for rel in list(held.items):
                if rel not in held.finished:
                    await self._lost(held, rel, why, transient, report, None)
        else:
            await self._outcomes(held, result, report)
        with contextlib.suppress(Exception):
            await Variable(checkpoint_name(self.spec, held.key), client=self.client).delete()

    async def _outcomes(self, held: Held, result: BatchResult, report: RunReport) -> None:
        """Record each item of a batch's result (see the module docstring)."""
        run = self.run
        assert run is not None
        counts = self._worker(result.worker)
        counts["batches"] += 1
        run.adapter.take_handback(result.handback)
        if result.stopped is not None and not report.stopped:
            # the worker stopped on a full disk before this coordinator heard of it (that batch's result may
            # come later, or never): the run stops here too, as one node stops at its first full disk
            report.stopped, report.stop_error = "disk full", result.stopped.rebuild()
        fatal = result.fatal.rebuild() if result.fatal is not None else None
        if fatal is not None and self.lane is None:
            raise fatal  # a refused login ends the job, as on one node
        if isinstance(fatal, AuthError) and self.refused is None:
            self.refused = fatal
            run.reporter.warning(f"on {result.worker}: {fatal}; the coordinator sends the remaining files "
                                 "over its own route")
        r: ItemResult
        for r in result.items:
            if r.rel in held.finished or r.rel not in held.items:
                continue
            if r.error is None and not r.left:
                await self._done(held, r.rel, r.row, result.worker, None if r.earlier else r.sent)
                continue
            held.finished.add(r.rel)  # before any wait: the worker's progress must not record it meanwhile
            if r.row:
                await self._journal(r.rel, r.row)
            if r.error is not None:
                await self._failed(held, r.rel, r.error.rebuild(), report, result.worker)
            elif fatal is not None:  # its sessions were cut short by the refused login
                run.reporter.stats.item_out(r.rel)
                await self._fall_back(held.items[r.rel])
            else:  # the run stopped: it stays as the worker left it
                run.reporter.stats.item_out(r.rel)
        for rel in list(held.items):
            if rel not in held.finished:
                await self._lost(held, rel, "no result came back for this item", True, report, result.worker)


async def push_on_cluster(source: Path | str, adapter: Adapter, config: EngineConfig, recipe: Recipe,
                          options: ClusterOptions, *, reporter: Reporter | None = None,
                          journal_path: Path | None = None, argv: list[str] | None = None,
                          tick: float = 0.5, kind: str = "push") -> RunReport:
    """Push ``source`` through ``adapter`` with the workers of a Dask cluster doing the sending; see the
    module docstring. ``recipe`` builds the workers' copies of the adapter; ``kind`` names the job as
    :func:`~asyncdepo.engine.scheduler.push` does.

    :raises UsageError: the archive needs one packed upload; dask is missing; no scheduler.
    :raises AuthError: a worker's session login was refused and the adapter has no fallback route.
    Item failures do not raise: they are in the report and the journal, as with
    :func:`~asyncdepo.engine.scheduler.push`.
    """
    if adapter.features.packed:
        raise UsageError(f"{adapter.describe()} takes the whole dataset as one packed upload, which runs on "
                         "one node: it cannot be split over a cluster",
                         hint="run the push without --scheduler / --local-cluster")
    reporter = reporter or Reporter()
    async with connect(options) as client:
        from asyncdepo.engine.cluster_worker import warm

        await client.run(warm, recipe, config)
        coordinator = _Coordinator(client, recipe, options)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(coordinator.listen)
                report = await push(source, adapter, config, reporter=reporter, journal_path=journal_path,
                                    argv=argv, tick=tick, passes=coordinator.send_pass, kind=kind)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await coordinator.close()
    return report
