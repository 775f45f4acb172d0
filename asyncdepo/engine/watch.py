"""Beamline mode: watch a directory and hand each file to the scheduler's pass once it is complete.

A :class:`Watch` is a source of batches for the scheduler's pass that ends only when :meth:`Watch.stop`
is called. Files are found by a scan at the start, by file system events in between (watchfiles: inotify
on Linux, read in a Rust thread), and by a rescan every ``rescan`` seconds: the safety net for missed
events (a full inotify queue, a watch limit) and for network file systems, where inotify does not see
what other clients write. When events cannot be had at all, a warning says so and the rescans carry on.

When a file counts as complete:

* **settle** (default): its size and mtime did not change for ``settle`` seconds of the watch's clock. A
  file is observed (stat), looked at again once ``settle`` seconds have passed, and handed over if nothing
  changed; a change starts the wait again. No file is trusted for its age alone: a writer's clock (an NFS
  server's) may be off by more than ``settle``.
* **marker** (``ready`` GLOB): a file whose name matches the glob is a marker and is never sent. A marker
  named after a file beside it (that file's name, a dot, anything: ``scan_01.h5.done``) releases that
  file; any other marker (``DONE``, ``run.complete``) releases every file of its directory. A file is
  released only while the marker is at least as new as the file, so a file rewritten after its marker
  waits for the marker to be touched again. ``settle`` plays no part.

What is handed over: a complete file is dropped when the journal has it done with the same size and
mtime (a restart after ``kill -9`` sends nothing twice; a file rewritten after it was sent differs and is
sent again), or failed permanently with the same size and mtime (offered again once it changes, or at the
first scan of the next run). A file that failed transiently is offered again by the next rescan, which
is its backoff. A file still in the pass (an earlier version of it) is held back and looked at later.

Bounds, whatever the number of files: ``pending`` (files observed, not yet settled) holds at most
``max_pending`` entries — a scan waits for the oldest to settle before it observes more; ``handed`` holds
the files in the pass (two batches, the pass's stream and its workers); a scan holds one batch of the walk
and, in marker mode, the markers of one directory. Files already sent cost nothing: the journal answers
for them.

Wake-ups (no polling loop of ours): the producer sleeps on the clock until the next file is due, the
next rescan, a batch of events or :meth:`Watch.stop`. Due times are rounded up to a quarter of
``settle`` so that files written together settle in one wake-up and go in one batch. The event thread is
watchfiles' (it sleeps ``STEP_MS`` between looks at its queue, holding no lock).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Features, Item
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.source import check_source, walk
from asyncdepo.engine.watchfs import look, name_of, released, sent, stat_file
from asyncdepo.errors import UsageError
from asyncdepo.events import Event, ItemDone, ItemFailed, ItemSkipped, Reporter
from asyncdepo.transport.pacer import SYSTEM_CLOCK, Clock

Batches = AsyncIterator[list[Item]]

#: watchfiles' thread looks at its event queue this often (ms) and returns a batch once no new event came
#: in one step, or after ``DEBOUNCE_MS``; both far below any useful ``settle``
STEP_MS = 500
DEBOUNCE_MS = 2000


@dataclasses.dataclass(frozen=True)
class WatchOptions:
    """How a watch decides that a file is complete, and how often it rescans.

    :param settle: seconds without a change in size or mtime before a file is sent.
    :param ready: a glob naming marker files; when given, files wait for their marker instead of ``settle``.
    :param rescan: seconds between two scans of the whole tree (the safety net for missed events).
    :param stop_timeout: seconds that files in flight may take to finish after :meth:`Watch.stop`; then
        they are cut short (the journal keeps what they had sent).
    :param batch: most files handed to the pass in one batch.
    :param events: use file system events (False: rescans only).
    :param max_pending: most files observed and waiting to settle at once.
    """

    settle: float = 5.0
    ready: str | None = None
    rescan: float = 300.0
    stop_timeout: float = 60.0
    batch: int = 256
    events: bool = True
    max_pending: int = 50_000

    def __post_init__(self) -> None:
        if not (self.settle >= 0 and math.isfinite(self.settle)):
            raise UsageError(f"--settle must be a number of seconds >= 0, not {self.settle!r}")
        if not (self.rescan > 0 and math.isfinite(self.rescan)):
            raise UsageError(f"--rescan must be a number of seconds > 0, not {self.rescan!r}")
        if not self.stop_timeout >= 0:
            raise UsageError(f"--stop-timeout must be a number of seconds >= 0, not {self.stop_timeout!r}")
        if self.ready is not None and not self.ready.strip("*?"):
            raise UsageError(f"--ready {self.ready!r} would make every file a marker",
                             hint="name the markers, e.g. --ready '*.done' or --ready DONE")


def refuse(features: Features) -> None:
    """Raise when a target cannot take files one by one as they appear.

    :raises UsageError: the target packs the whole source into one archive, or needs every file's digest
        before the first byte (one closing step for the whole set) and cannot take batches as units of
        their own (``Features.watch_units``).
    """
    if features.packed:
        raise UsageError("watch mode does not apply: this target takes the whole source as one archive",
                         hint="push the directory once it is complete, without --watch")
    if features.needs_digests_before_start and not features.watch_units:
        raise UsageError("watch mode does not apply: this target needs every file before the upload starts",
                         hint="push the directory once it is complete, without --watch")


@dataclasses.dataclass(slots=True)
class _Seen:
    path: str
    size: int
    mtime_ns: int
    due: float


class Watch:
    """One watch of a directory; see the module docstring. ``clock`` times settling, rescans and the stop
    timeout (tests step it); :meth:`stop` may be called from the event loop at any time."""

    def __init__(self, options: WatchOptions | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.options = options or WatchOptions()
        self.clock = clock
        self.pending: dict[str, _Seen] = {}
        self.handed: dict[str, int] = {}
        self.failed: set[str] = set()
        self.cut_short = False
        #: how often the producer woke up, how many scans it made, and how many events it read (tests and
        #: the soak count these instead of timing anything)
        self.wakeups = 0
        self.scans = 0
        self.events = 0
        self.events_live = False
        self._heap: list[tuple[float, str]] = []
        self._walk_again: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._stopped = False
        self._stop_event: anyio.Event | None = None
        self._poke: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._idle_hooks: list[Callable[[], None]] = []
        self._idle = False
        self._rounds = False
        self._handed_since = False

    # -- control -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop watching: nothing more is handed over; files in flight finish (up to ``stop_timeout``)."""
        self._stopped = True
        if self._stop_event is not None:
            self._stop_event.set()
        if self._poke is not None:
            self._poke.set()

    @property
    def stopping(self) -> bool:
        return self._stopped

    def on_observe(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(rel)`` whenever a file starts waiting to settle (tests wait on it instead of sleeping)."""
        self._listeners.append(fn)

    def on_idle(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` whenever the producer goes to sleep with nothing due (tests wait on it)."""
        self._idle_hooks.append(fn)

    @property
    def idle(self) -> bool:
        """The producer sleeps: every file due has been looked at and handed over."""
        return self._idle

    # -- the run -------------------------------------------------------------------------------------
    async def run(self, root: Path, *, config: EngineConfig, journal: Journal, job: str, reporter: Reporter,
                  consume: Callable[[Batches, anyio.Event], Awaitable[None]],
                  requeue: Callable[[set[str]], None] = lambda rels: None, rounds: bool = False) -> None:
        """Feed ``consume(batches, stop)`` until :meth:`stop`, then let it finish what is in flight.

        ``requeue(rels)`` is told when files that failed in this run are offered again. ``rounds``: an empty
        batch ends each round (every file due was handed over; the producer sleeps), and the first scan's
        files come due together after it, so what exists at the start is one round (up to ``max_pending``).

        :raises UsageError: ``root`` is not a readable directory.
        """
        root = await anyio.to_thread.run_sync(check_source, root)
        if not root.is_dir():
            raise UsageError(f"--watch needs a directory; {str(root)!r} is a file")
        self._root, self._config, self._journal, self._job = root, config, journal, job
        self._reporter, self._requeue, self._rounds = reporter, requeue, rounds
        self._stop_event = anyio.Event()
        self._poke = anyio.Event()
        if self._stopped:
            self._stop_event.set()
        send, recv = anyio.create_memory_object_stream[list[Item]](1)
        reporter.listeners.append(self._on_event)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._produce, send)
                tg.start_soon(self._stop_timer)
                with anyio.CancelScope() as self._scope:
                    await consume(_drain(recv), self._stop_event)
                tg.cancel_scope.cancel()
        finally:
            reporter.listeners.remove(self._on_event)
            recv.close()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, (ItemDone, ItemSkipped)):
            self.handed.pop(event.rel, None)
            self.failed.discard(event.rel)
        elif isinstance(event, ItemFailed):
            self.handed.pop(event.rel, None)
            self.failed.add(event.rel)

    async def _stop_timer(self) -> None:
        assert self._stop_event is not None and self._poke is not None
        await self._stop_event.wait()
        self._poke.set()
        self._reporter.message(f"stopping: nothing new is taken; what is in flight may take up to "
                               f"{self.options.stop_timeout:g} s to finish")
        await self.clock.sleep(self.options.stop_timeout)
        if self._reporter.stats.in_flight:
            self.cut_short = True
            self._reporter.warning(f"stopping: files still in flight after {self.options.stop_timeout:g} s are "
                                   "cut short; the journal keeps what they sent")
        if self._scope is not None:
            self._scope.cancel()

    # -- the producer --------------------------------------------------------------------------------
    async def _produce(self, send: ObjectSendStream[list[Item]]) -> None:
        async with send, anyio.create_task_group() as tg:
            if self.options.events:
                tg.start_soon(self._listen)
            await self._scan(send, first=True)
            if self._rounds:
                self._align()
            opts = self.options
            how = f"once a marker {opts.ready!r} releases them" if opts.ready else f"once unchanged for {opts.settle:g} s"
            self._reporter.message(f"watching {self._root}: new and changed files are sent {how}; a rescan "
                                   f"every {opts.rescan:g} s")
            next_scan = self.clock.monotonic() + self.options.rescan
            while not self._stopped:
                await self._round_end(send)
                await self._wait(next_scan)
                if self._stopped:
                    break
                self.wakeups += 1
                await self._take_events(send)
                await self._settle(send)
                if self.clock.monotonic() >= next_scan:
                    await self._scan(send, first=False)
                    next_scan = self.clock.monotonic() + self.options.rescan
            tg.cancel_scope.cancel()

    async def _wait(self, next_scan: float) -> None:
        """Sleep until something is due, events arrived, or the watch stops."""
        now = self.clock.monotonic()
        due = min(next_scan, self._heap[0][0] if self._heap else math.inf)
        if self._dirty or due <= now or self._stopped:
            return
        self._poke = anyio.Event()
        poke = self._poke
        async with anyio.create_task_group() as tg:

            async def timer() -> None:
                # measured here, not before the task started: the clock may have moved in between
                await self.clock.sleep(max(0.0, due - self.clock.monotonic()))
                poke.set()

            tg.start_soon(timer)
            self._idle = True
            for fn in self._idle_hooks:
                fn()
            try:
                await poke.wait()
            finally:
                self._idle = False
            tg.cancel_scope.cancel()

    async def _round_end(self, send: ObjectSendStream[list[Item]]) -> None:
        if self._rounds and self._handed_since:  # files were handed over since the last mark
            self._handed_since = False
            await send.send([])

    def _align(self) -> None:
        """(rounds) Every file waiting to settle comes due with the last of them."""
        if not self.pending:
            return
        due = max(s.due for s in self.pending.values())
        for seen in self.pending.values():
            seen.due = due
        self._heap = [e for e in self._heap if e[1].startswith(_DIR)] + [(due, rel) for rel in self.pending]
        heapq.heapify(self._heap)

    def _due(self, delay: float) -> float:
        """Now + ``delay``, rounded up to a quarter of ``settle`` (files written together settle together)."""
        q = max(self.options.settle / 4, 0.05)
        return math.ceil((self.clock.monotonic() + delay) / q) * q

    def _observe(self, rel: str, path: str, size: int, mtime_ns: int, delay: float | None = None) -> None:
        due = self._due(self.options.settle if delay is None else delay)
        self.pending[rel] = _Seen(path, size, mtime_ns, due)
        heapq.heappush(self._heap, (due, rel))
        for fn in self._listeners:
            fn(rel)

    async def _settle(self, send: ObjectSendStream[list[Item]]) -> None:
        """Look again at every file that is due: unchanged ones are handed over, changed ones wait again."""
        now = self.clock.monotonic()
        due: list[tuple[str, _Seen]] = []
        again: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            when, rel = heapq.heappop(self._heap)
            if rel.startswith(_DIR):
                if self._walk_again.get(rel[1:]) == when:
                    del self._walk_again[rel[1:]]
                    again.append(rel[1:])
                continue
            seen = self.pending.get(rel)
            if seen is not None and seen.due == when:  # else a stale entry: the file was observed again
                del self.pending[rel]
                due.append((rel, seen))
        if again:
            await self._found((await self._look(again))[0], send)
        if not due:
            return
        follow = self._config.follow_symlinks
        stats = await anyio.to_thread.run_sync(lambda: [stat_file(s.path, follow) for _, s in due])
        out: list[Item] = []
        for (rel, seen), st in zip(due, stats, strict=True):
            if st is None:
                continue  # gone, or no longer a regular file
            if (st.st_size, st.st_mtime_ns) == (seen.size, seen.mtime_ns):
                out.append(Item(seen.path, rel, st.st_size, st.st_mtime_ns))
            else:
                self._observe(rel, seen.path, st.st_size, st.st_mtime_ns)
        await self._hand(out, send, first=False)

    async def _hand(self, items: list[Item], send: ObjectSendStream[list[Item]], *, first: bool) -> None:
        """Hand ``items`` to the pass in batches, minus what the journal has and what is still in the pass."""
        size = self.options.batch
        for i in range(0, len(items), size):
            part = items[i:i + size]
            rows = await self._journal.lookup(self._job, [it.rel for it in part])
            out: list[Item] = []
            again: set[str] = set()
            for it in part:
                if it.rel in self.handed:
                    # an earlier version is still in the pass: look at this one once that has ended
                    self._observe(it.rel, it.path, it.size, it.mtime_ns, max(self.options.settle, 1.0))
                    continue
                row = rows.get(it.rel)
                if row is not None and (row.get("size"), row.get("mtime_ns")) == (it.size, it.mtime_ns):
                    state = row.get("state")
                    if state == "done" or (state == "failed" and not row.get("transient") and not first):
                        continue
                if it.rel in self.failed:
                    again.add(it.rel)
                out.append(it)
            if again:
                self.failed -= again
                self._requeue(again)
            if out:
                for it in out:
                    self.handed[it.rel] = it.size
                self._handed_since = True
                await send.send(out)

    # -- scans ---------------------------------------------------------------------------------------
    async def _scan(self, send: ObjectSendStream[list[Item]], *, first: bool) -> None:
        """Walk the tree: files not yet sent start to settle (marker mode: released files are handed over)."""
        self.scans += 1
        cfg, ready = self._config, self.options.ready

        def warn(rel: str, why: str) -> None:
            self._reporter.warning(f"skipped {rel}: {why}")

        async for batch in walk(self._root, cfg.include, cfg.exclude, cfg.follow_symlinks, warn if first else None):
            if self._stopped:
                return
            if ready is not None:
                batch = [it for it in batch if not fnmatch.fnmatchcase(name_of(it.rel), ready)]
            fresh = [it for it in batch if it.rel not in self.pending and it.rel not in self.handed]
            if not fresh:
                continue
            rows = await self._journal.lookup(self._job, [it.rel for it in fresh])
            todo = [it for it in fresh if not sent(rows.get(it.rel), it, first)]
            if ready is not None:
                freed = await anyio.to_thread.run_sync(released, todo, ready)
                await self._hand(freed, send, first=first)
            else:
                for it in todo:
                    self._observe(it.rel, it.path, it.size, it.mtime_ns)
            # events and due files are served while a long scan goes on (rounds: not the first scan's); the
            # scan waits while too many files are still settling (``pending`` stays bounded)
            await self._take_events(send)
            if not (first and self._rounds):
                await self._settle(send)
            while len(self.pending) >= self.options.max_pending and not self._stopped:
                await self._round_end(send)
                await self._wait(math.inf)
                await self._settle(send)

    # -- events --------------------------------------------------------------------------------------
    async def _listen(self) -> None:
        """Read batches of file system events in a thread into ``_dirty`` and wake the producer."""
        try:
            import watchfiles
        except ImportError:  # pragma: no cover - a runtime dependency; rescans still work without it
            self._reporter.warning(f"watchfiles is not installed: new files are found by the rescan every "
                                   f"{self.options.rescan:g} s")
            return
        halt = threading.Event()
        gen = watchfiles.watch(self._root, watch_filter=None, debounce=DEBOUNCE_MS, step=STEP_MS,
                               rust_timeout=0, stop_event=halt, raise_interrupt=False, recursive=True,
                               ignore_permission_denied=True)

        async def guard() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                halt.set()  # the event thread returns within one step; then cancellation reaches us

        async with anyio.create_task_group() as tg:
            tg.start_soon(guard)
            try:
                self.events_live = True
                while True:
                    changes = await anyio.to_thread.run_sync(next, gen, None)
                    if changes is None:
                        break
                    self.events += len(changes)
                    self._dirty.update(path for _, path in changes)
                    if self._poke is not None:
                        self._poke.set()
            except (OSError, RuntimeError) as exc:
                self._reporter.warning(f"file system events are not available ({exc}); new files are found by "
                                       f"the rescan every {self.options.rescan:g} s")
            finally:
                self.events_live = False
                halt.set()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(gen.close)
            tg.cancel_scope.cancel()

    async def _take_events(self, send: ObjectSendStream[list[Item]]) -> None:
        """Observe the paths that events named. A new directory is walked, and walked once more ``settle``
        later: files made in it before its own watch was set up raise no event."""
        if not self._dirty:
            return
        room = max(0, self.options.max_pending - len(self.pending))
        paths: list[str] = []
        while self._dirty and len(paths) < room:
            paths.append(self._dirty.pop())
        if not paths:
            return
        found, walked = await self._look(paths)
        for d in walked:
            due = self._due(max(self.options.settle, 1.0))
            self._walk_again[d] = due
            heapq.heappush(self._heap, (due, _DIR + d))
        await self._found(found, send)

    async def _look(self, paths: list[str]) -> tuple[list[Item], list[str]]:
        cfg = self._config
        return await anyio.to_thread.run_sync(
            lambda: look(self._root, paths, cfg.include, cfg.exclude, cfg.follow_symlinks, self.options.ready))

    async def _found(self, found: list[Item], send: ObjectSendStream[list[Item]]) -> None:
        """Files that events (or a walk of a new directory) named: they start to settle (marker mode: those
        released are handed over). A file still in the pass is not dropped: :meth:`_hand` holds it back and
        looks at it again once that version has ended (else its change would wait for the next rescan)."""
        found = [it for it in found if it.rel not in self.pending]
        if self.options.ready is not None:
            await self._hand(found, send, first=False)
            return
        # a directory stands for every file under it: those already sent need not settle
        for i in range(0, len(found), self.options.batch):
            part = found[i:i + self.options.batch]
            rows = await self._journal.lookup(self._job, [it.rel for it in part])
            for it in part:
                if not sent(rows.get(it.rel), it, False):
                    self._observe(it.rel, it.path, it.size, it.mtime_ns)


#: heap keys of directories to walk again start with this (no file's relative path does)
_DIR = "\0"


async def _drain(recv: ObjectReceiveStream[list[Item]]) -> Batches:
    async for batch in recv:
        yield batch


