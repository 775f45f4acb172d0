"""Pull: list the archive's items, download each concurrently with HTTP-Range-style resume, verify, rename.

Each remote item is written to ``OUTDIR/<rel>.asyncdepo-part`` and renamed into place only after its
size and the digests the archive published match, so a file under its real name is always complete.
A re-run skips files already present with the right size (and digest when one is published) and
continues a partial file from its size, re-hashing the prefix it already has.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio

from asyncdepo.adapters.base import Adapter
from asyncdepo.config import EngineConfig
from asyncdepo.engine.hashing import FACTORIES, MultiHash, hash_path_sync
from asyncdepo.engine.retry import RetryPolicy
from asyncdepo.engine.scheduler import RunReport, _fill, _ticker
from asyncdepo.engine.transfer import describe, first_error
from asyncdepo.engine.types import RemoteItem
from asyncdepo.errors import IntegrityError, TransientError, UsageError, is_transient
from asyncdepo.events import ItemDone, ItemFailed, ItemRetrying, ItemSkipped, ItemStarted, JobFinished, Reporter

PART = ".asyncdepo-part"


def _target(outdir: Path, rel: str) -> Path:
    path = (outdir / rel).resolve()
    if not str(path).startswith(str(outdir.resolve()) + os.sep):
        raise UsageError(f"remote path {rel!r} would land outside {outdir}")
    return path


def _known(item: RemoteItem) -> tuple[str, ...]:
    return tuple(a for a in item.digests if a in FACTORIES)


async def _fetch(adapter: Adapter, item: RemoteItem, dest: Path, reporter: Reporter, io: anyio.CapacityLimiter,
                 policy: RetryPolicy, attempts: int) -> str:
    """Download one item; returns "done" or "skipped"."""
    algos = _known(item)
    if dest.exists() and (item.size is None or dest.stat().st_size == item.size):
        have = (await anyio.to_thread.run_sync(lambda: hash_path_sync(dest, algos), limiter=io)).hexdigests()
        if all(have[a] == item.digests[a] for a in algos):
            reporter.emit(ItemSkipped(rel=item.rel, size=dest.stat().st_size, reason="already present"))
            return "skipped"
    part = dest.with_name(dest.name + PART)
    await anyio.to_thread.run_sync(lambda: part.parent.mkdir(parents=True, exist_ok=True))
    stats = reporter.stats
    n = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if item.size is not None and offset > item.size:
            part.unlink()
            offset = 0
        hasher = MultiHash(algos)
        if offset:
            await anyio.to_thread.run_sync(lambda: hash_path_sync(part, (), into=hasher), limiter=io)
        reporter.emit(ItemStarted(rel=item.rel, size=item.size or -1, offset=offset))
        try:
            fh = await anyio.to_thread.run_sync(lambda: open(part, "ab"))
            try:
                async for data in adapter.read(item, offset):
                    block = bytes(data)  # the adapter may reuse its buffer once we ask for more

                    def store(b: bytes = block) -> None:  # hash and write in one thread hop
                        hasher.update(b)
                        fh.write(b)

                    await anyio.to_thread.run_sync(store, limiter=io)
                    stats.add_sent(item.rel, len(block))
            finally:
                await anyio.to_thread.run_sync(fh.close)
            size = part.stat().st_size
            if item.size is not None and size != item.size:
                raise TransientError(f"got {size} of {item.size} bytes")
            got = hasher.hexdigests()
            for a in algos:
                if got[a] != item.digests[a]:
                    part.unlink()
                    raise IntegrityError(f"{a} mismatch (archive says {item.digests[a]}, "
                                         f"received data has {got[a]})")
            os.replace(part, dest)
            stats.bytes_done += size
            reporter.emit(ItemDone(rel=item.rel, size=size, sent=size - offset, digests=got))
            return "done"
        except Exception as exc:
            err = first_error(exc)
            n += 1
            # a digest mismatch is fetched again once (damage on the way); more would not change the archive
            limit = 2 if isinstance(err, IntegrityError) else attempts
            if not is_transient(err) or n >= limit:
                raise err from None
            delay = policy.delay(n - 1, err)
            stats.retries += 1
            reporter.emit(ItemRetrying(rel=item.rel, attempt=n, error=str(err), delay=round(delay, 3)))
            await policy.sleep(delay)


async def pull(adapter: Adapter, outdir: Path | str, config: EngineConfig | None = None, *,
               reporter: Reporter | None = None, tick: float = 0.5) -> RunReport:
    """Fetch every item ``adapter.list_remote()`` yields into ``outdir``; failures are in the report."""
    config = config or EngineConfig()
    reporter = reporter or Reporter()
    out = Path(outdir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport(ok=False, job_id="pull")
    started = time.monotonic()
    io = anyio.CapacityLimiter(max(4, 2 * (os.cpu_count() or 2)))
    policy = RetryPolicy(attempts=config.request_attempts)
    stats = reporter.stats
    attempts = config.request_attempts * max(1, config.item_attempts)
    try:
        async with adapter:
            send, recv = anyio.create_memory_object_stream[RemoteItem](2 * config.transfers)

            async def lister() -> None:
                async with send:
                    async for item in adapter.list_remote():
                        stats.files_total += 1
                        stats.bytes_total += item.size or 0
                        await send.send(item)
                stats.walk_done = True

            async def worker(stream: object) -> None:
                async with stream:  # type: ignore[attr-defined]
                    async for item in stream:  # type: ignore[attr-defined]
                        stats.item_in(item.rel, item.size or -1)
                        try:
                            dest = _target(out, item.rel)
                            state = await _fetch(adapter, item, dest, reporter, io, policy, attempts)
                            if state == "done":
                                stats.files_done += 1
                            else:
                                stats.files_skipped += 1
                        except Exception as exc:
                            msg = describe(exc)
                            stats.files_failed += 1
                            report.failures.append((item.rel, msg.splitlines()[0]))
                            reporter.emit(ItemFailed(rel=item.rel, error=msg, transient=is_transient(exc)))
                        finally:
                            stats.item_out(item.rel)

            async with anyio.create_task_group() as tg:
                tg.start_soon(_ticker, reporter, tick)
                async with anyio.create_task_group() as inner:
                    inner.start_soon(lister)
                    async with recv:
                        for _ in range(config.transfers):
                            inner.start_soon(worker, recv.clone())
                tg.cancel_scope.cancel()
            report.summary = await adapter.finish(not report.failures) or {}
    finally:
        _fill(report, reporter, started)
        report.ok = not report.failures
        reporter.emit(JobFinished(job=report.job_id, report=report.to_json()))
    return report
