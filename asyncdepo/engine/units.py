"""Watch mode for targets that take each batch as a unit of its own (``Features.watch_units``): a gypsum
version per batch of files that became complete together.

The watch (:mod:`asyncdepo.engine.watch`, in rounds) hands over the files that came due together and then
an empty batch; :class:`Units` gathers the batches up to it and sends them as one unit, one unit at a time
(files that become complete while a unit is sent go in the next one). Per unit:

1. files the journal has done as they are now are skipped (a unit closed since they were handed over);
2. ``adapter.check_item`` per file, then the digests the target needs, in parallel threads: a file that
   cannot be stored, read, or that changed while it was hashed fails alone;
3. ``adapter.prepare`` opens the unit and says what needs no upload; every other file is sent, whatever
   the journal remembers of an earlier attempt (an earlier unit that was discarded), through the pass;
4. ``adapter.finish(ok)`` closes it: ``ok`` when the journal has every file done. A discarded unit's files
   are set back to queued: the watch's next rescan offers them again (its backoff), in a new unit.

A unit the target refuses to open (a lock held by another upload, a quota, a server down after the
retries) fails its files transiently, with the reason, and the watch goes on; refused credentials or a
usage error end the run. The job state is journaled after each ``prepare`` and ``finish``; a unit cut short
(the stop timeout, a second signal, ``kill -9``) stays open, and the next run sends and closes it first
(``adapter.open_unit``), before anything new, so nothing is sent twice and no unit is made twice.

Memory: one unit's items and digests (the target's start needs them all), never more than one unit.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio

from asyncdepo.contract import Item
from asyncdepo.digests import hash_path_sync
from asyncdepo.engine.report import RunReport, describe
from asyncdepo.engine.transfer import Run
from asyncdepo.engine.watch import Watch
from asyncdepo.errors import (
    AuthError,
    DepoError,
    SourceChangedError,
    SourceError,
    SourceVanishedError,
    TransientError,
    UsageError,
)
from asyncdepo.events import ItemSkipped, printable

Batches = AsyncIterator[list[Item]]
#: sends the items of ``batches`` (``skip``: rels that need no upload; ``digests``: rel -> hex digests)
SendFn = Callable[[Batches, set[str], dict[str, dict[str, str]]], Awaitable[None]]
#: records an item as failed with an error (journal, counters, event, report)
FailFn = Callable[[Item, BaseException], Awaitable[None]]


class Units:
    """Consumes a watch's rounds as units of the target; see the module docstring. ``cut_short`` tells,
    after the run, that a unit was left open (the run was cancelled while it was sent)."""

    def __init__(self, run: Run, root: Path, report: RunReport, send: SendFn, fail: FailFn) -> None:
        self.run, self.root, self.report = run, root, report
        self._send, self._fail = send, fail
        self.cut_short = False
        self.closed = 0

    async def watch(self, watch: Watch, requeue: Callable[[set[str]], None]) -> None:
        """Run ``watch`` in rounds, each round one unit, until it is stopped (``report.interrupted`` when a
        unit or a file was cut short).

        :raises UsageError: ``--compress`` (a unit's files are stored as they are, with their digests).
        :raises AuthError | UsageError: the target refused the credentials or the request.
        """
        run = self.run
        if run.config.compress is not None:
            raise UsageError("--compress does not apply to this target: it stores files as they are")
        try:
            await watch.run(self.root, config=run.config, journal=run.journal, job=run.job, reporter=run.reporter,
                            consume=self.consume, requeue=requeue, rounds=True)
        finally:
            if self.cut_short:
                self.report.interrupted = True
                run.reporter.warning("stopping: a unit was cut short; it stays open on the target and the next "
                                     "run completes it first")
        self.report.interrupted = self.report.interrupted or watch.cut_short

    async def consume(self, batches: Batches, stop: anyio.Event) -> None:
        """The watch's ``consume``: first the unit an earlier run left open, then one unit per round."""
        left = await self.run.adapter.open_unit()
        if left:
            self.run.reporter.message(f"completing the unit an earlier run left open ({len(left)} file(s))")
            await self._unit(await anyio.to_thread.run_sync(self._stat, left), left_open=True)
        gathered: dict[str, Item] = {}
        async for batch in batches:
            if stop.is_set():
                break  # files not yet in a unit are found again by the next run
            if batch:
                gathered.update((it.rel, it) for it in batch)
                continue
            if gathered:
                items, gathered = list(gathered.values()), {}
                await self._unit(items)

    def _stat(self, rels: list[str]) -> list[Item]:
        """Blocking: the items of ``rels`` as they are now (a file gone is left out: the unit is discarded
        without it, and the journal keeps its row for the next scan to settle)."""
        out = []
        for rel in rels:
            path = self.root / rel
            try:
                st = path.stat()
            except OSError:
                continue
            out.append(Item(str(path), rel, st.st_size, st.st_mtime_ns))
        return out

    async def _unit(self, items: list[Item], *, left_open: bool = False) -> None:
        """One unit of ``items`` (``left_open``: the unit an earlier run opened; its files done in the journal
        are part of it, and ``prepare`` says which of them the target holds)."""
        run = self.run
        if not left_open:
            items = await self._not_done(items)
        listed = await self._hashed(items)
        if not listed:
            return
        self.cut_short = True  # until it is closed: a cancellation from here on leaves it open
        try:
            skip = await run.request("(start)", lambda: run.adapter.prepare(listed), attempts=3)
        except (AuthError, UsageError):
            raise
        except DepoError as exc:
            self.cut_short = False
            why = describe(exc).splitlines()[0]
            run.reporter.warning(f"{len(listed)} file(s) wait for the next rescan: the target refused to open "
                                 f"their unit: {why}")
            for item, _ in listed:
                await self._fail(item, TransientError(f"{item.rel}: not sent: the target refused to open its "
                                                      f"unit: {why}"))
            return
        await run.journal.set_job_state(run.job, run.adapter.job_state())
        rels = [item.rel for item, _ in listed]
        await self._forget(rels, skip)

        async def one() -> Batches:
            yield [item for item, _ in listed]

        await self._send(one(), skip, {item.rel: d for item, d in listed})
        await run.journal.flush()
        rows = await run.journal.lookup(run.job, rels)
        ok = all((rows.get(r) or {}).get("state") == "done" for r in rels)
        try:
            self.report.summary = await run.adapter.finish(ok) or {}
        except (AuthError, UsageError):
            raise
        except DepoError as exc:
            ok = False
            run.reporter.warning(f"the unit of {len(rels)} file(s) could not be closed: "
                                 f"{describe(exc).splitlines()[0]}")
        self.cut_short = False
        await run.journal.set_job_state(run.job, run.adapter.job_state())
        if ok:
            self.closed += 1
            return
        sent = [r for r in rels if (rows.get(r) or {}).get("state") == "done"]
        for rel in sent:
            await run.journal.record(run.job, rel, state="queued", offset=0, remote=None)
        run.reporter.warning(f"a unit of {len(rels)} file(s) was discarded because some of them failed; "
                             f"{len(sent)} sent in it will be sent again with the next rescan")

    async def _not_done(self, items: list[Item]) -> list[Item]:
        """``items`` minus those the journal has done as they are now (skipped, as the pass would)."""
        run, stats = self.run, self.run.reporter.stats
        rows = await run.journal.lookup(run.job, [it.rel for it in items])
        out = []
        for it in items:
            row = rows.get(it.rel)
            if row is not None and row.get("state") == "done" and (row.get("size"), row.get("mtime_ns")) == (
                    it.size, it.mtime_ns):
                stats.found(it.size)
                stats.skipped(it.size)
                run.reporter.emit(ItemSkipped(rel=it.rel, size=it.size, reason="unchanged since last run"))
                continue
            out.append(it)
        return out

    async def _hashed(self, items: list[Item]) -> list[tuple[Item, dict[str, str]]]:
        """The items the target can take, with their digests (md5 etc., in parallel threads); the others
        fail alone."""
        run = self.run
        algos = tuple(dict.fromkeys(run.features.item_digests or ("md5",)))
        out: list[tuple[Item, dict[str, str]]] = []

        def digest(item: Item) -> dict[str, str]:
            try:
                m = hash_path_sync(item.path, algos)
                st = os.stat(item.path)
            except (FileNotFoundError, NotADirectoryError):
                raise SourceVanishedError(f"{item.rel}: source vanished (deleted before it was sent)") from None
            except OSError as exc:
                raise SourceError(f"{item.rel}: cannot read: {exc.strerror}") from None
            if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
                raise SourceChangedError(f"{item.rel}: changed while it was hashed; it is looked at again")
            return m.hexdigests()

        async def one(item: Item) -> None:
            try:
                run.adapter.check_item(item)
                out.append((item, await anyio.to_thread.run_sync(digest, item, limiter=run.io)))
            except DepoError as exc:
                await self._fail(item, exc)

        if items:
            run.reporter.message(f"hashing {len(items)} file(s) before their unit opens")
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(one, item)
        out.sort(key=lambda p: p[0].rel)
        return out

    async def _forget(self, rels: list[str], skip: set[str]) -> None:
        """Rows done in the journal whose file the opened unit still needs are set back to queued (they were
        sent in a unit that was discarded, or that a restart could not take up again)."""
        run = self.run
        todo = [r for r in rels if r not in skip]
        rows = await run.journal.lookup(run.job, todo)
        for rel in todo:
            if (rows.get(rel) or {}).get("state") == "done":
                run.reporter.message(f"{printable(rel)}: sent again (its earlier unit was not kept)")
                await run.journal.record(run.job, rel, state="queued", offset=0, remote=None)
                run.journal.forget_chunks(run.job, rel)
