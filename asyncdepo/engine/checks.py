"""What a push checks besides sending bytes, so that it never ends "done" while the target differs:

* **vanished sources** (:func:`sweep_vanished`) — the walk only yields files that exist, so a file deleted
  after an earlier run started it would simply never be looked at again. After the walk, the journal's
  unfinished rows of this job that this run did not walk (``items.walked``) are looked up on disk; a file that
  is gone fails with "source vanished" (the exit status says so), and what the target holds of it (a part
  file, a multipart or tus upload) is removed through ``Adapter.discard``. A file that is still there but was
  not walked (an ``--exclude`` added since, an unreadable directory) is left alone. A vanished row is reported
  by the run that finds it; the next run that does not find the file either drops it from the journal.
* **unreadable directories** (:func:`walk_failed`) — a directory the walk cannot list, or an entry it cannot
  stat, is a failure of the run (as rsync's exit 23), journaled so ``asyncdepo status`` shows it too; the row
  is dropped by a later run that could list it.
* **--checksum** (:func:`content_check`, :func:`same_content`) — a file whose size and mtime match a done row
  is hashed (the cheapest digest the journal holds for it) and skipped only when its content is the same (as
  ``rclone -c``); a file rewritten at the same size with its mtime restored is sent again.
* **names** (:func:`check_name`) — a name that is not UTF-8 fails on its own when the target cannot store it
  (``Features.any_name`` false); the rest of the push goes on.
* **a full disk** (:func:`stop_disk_full`) — the first DiskFullError stops the pass: no retries, one message
  saying how much space is missing and what was kept for resume (part files stay: the resume after freeing
  space continues them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from asyncdepo.contract import Item
from asyncdepo.digests import FACTORIES, hash_path_sync
from asyncdepo.engine.journal import VANISHED
from asyncdepo.engine.report import RunReport, describe, disk_full_message
from asyncdepo.errors import DepoError, DiskFullError, SourceVanishedError, UsageError, is_transient
from asyncdepo.events import ItemFailed, ItemSkipped, printable
from asyncdepo.transport.pacer import first_leaf

if TYPE_CHECKING:
    from asyncdepo.engine.transfer import Run

#: digests a --checksum comparison may use, cheapest first (measured per core: xxh3 ~20 GB/s ...
#: md5 ~0.67 GB/s a core)
CHEAPEST = ("xxh3", "blake3", "sha1", "sha256", "blake2b", "md5", "sha512")


def utf8(name: str) -> bool:
    """True when ``name`` is valid UTF-8 (no surrogate escapes from ``os.fsdecode``)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_name(rel: str, target: str) -> None:
    """:raises UsageError: ``rel`` is not UTF-8 and the target (``Features.any_name`` false) cannot name it."""
    if not utf8(rel):
        raise UsageError(f"{printable(rel)}: the name is not valid UTF-8, and {target} can only store UTF-8 "
                         "names", hint="rename the file (e.g. convmv) to send it there")


def _remote_rel(run: Run, rel: str) -> str:
    return rel + ".zst" if run.config.compress is not None else rel


async def discard(run: Run, rel: str, report: RunReport) -> str | None:
    """Remove what the target holds of ``rel`` (journaled writer state). Returns None when it is gone, else
    why not (a warning says it too): the journal then keeps the row's writer state, or a ``left`` flag when it
    had none, so ``asyncdepo status`` and the next runs know something is left there."""
    rows = await run.journal.lookup(run.job, [rel])
    row = rows.get(rel)
    # a row without writer state still says an attempt may have begun (S3 then looks for uploads of the key)
    saved = None if row is None else (row.get("remote") or {})
    try:
        await run.adapter.discard(_remote_rel(run, rel), saved)
    except DepoError as exc:
        run.reporter.warning(f"{printable(rel)}: could not remove what the target holds of it: {describe(exc)}")
        await run.journal.record(run.job, rel, remote=saved or {"left": str(exc)})
        return str(exc)
    await run.journal.record(run.job, rel, remote=None, offset=0)
    run.journal.forget_chunks(run.job, rel)
    return None


async def discard_changed(run: Run, rel: str, saved: dict[str, Any]) -> None:
    """Remove what an unfinished attempt left on the target of ``rel``, whose source changed since (it is
    sent again from zero): a failure is a warning, as the new upload does not depend on it."""
    try:
        await run.adapter.discard(_remote_rel(run, rel), saved)
    except DepoError as exc:
        run.reporter.warning(f"{printable(rel)}: could not remove what an earlier run left of it on the target: "
                             f"{describe(exc)}")


async def walk_failed(run: Run, rel: str, why: str, report: RunReport) -> None:
    """A directory the walk could not list (or an entry it could not stat): a failure of the run."""
    key = (rel.rstrip("/") + "/") if why.startswith("cannot list") else rel
    await run.journal.record(run.job, key, size=0, mtime_ns=0, state="failed", error=why, transient=0,
                             walked=run.journal.runs.get(run.job, 0))
    run.reporter.stats.failed()
    run.reporter.emit(ItemFailed(rel=key, error=why, transient=False))
    report.failures.append((key, why))


def _gone(path: Path) -> bool:
    """Blocking: True when ``path`` does not exist (a permission error is not "gone")."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


async def sweep_vanished(run: Run, root: Path, report: RunReport) -> None:
    """Fail (and clean on the target) the unfinished items of this job whose source is gone; see the module
    docstring. Reads the journal a page at a time: memory does not grow with the number of files."""
    journal, job = run.journal, run.job
    number = journal.runs.get(job, 0)
    await journal.drop_vanished(job, number)
    after: str | bytes = ""
    stats = run.reporter.stats
    while rows := await journal.unseen(job, number, after):
        after = rows[-1][0]
        for _, row in rows:
            rel = row["rel"]
            if rel.endswith("/"):  # a directory an earlier run could not list; this run walked it
                await journal.delete(job, rel)
                continue
            path = root / rel if root.is_dir() else root
            if not await anyio.to_thread.run_sync(_gone, path, limiter=run.io):
                continue
            left = await discard(run, rel, report)
            await journal.record(job, rel, state="failed", error=VANISHED, transient=0)
            stats.failed()
            message = f"{VANISHED} (deleted after an earlier run started it); " + (
                "what the target held of it was removed" if left is None else
                f"what the target holds of it could not be removed ({left}): the journal keeps it")
            run.reporter.emit(ItemFailed(rel=rel, error=message, transient=False))
            report.failures.append((rel, VANISHED))


def content_check(digests: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, digest) --checksum compares a file against: the cheapest the journal holds for it; ("", "")
    when it holds none (then the file is sent again: its content cannot be compared)."""
    for algo in CHEAPEST:
        value = digests.get(algo)
        if isinstance(value, str) and value and algo in FACTORIES:
            return algo, value
    return "", ""


async def same_content(run: Run, item: Item, check: tuple[str, str]) -> bool:
    """Hash ``item`` and compare with ``check`` (--checksum): True (and the item counted as skipped) when the
    content is what was sent; False after resetting its journal row, so it is sent again from zero."""
    algo, want = check
    stats = run.reporter.stats
    if algo:
        try:
            got = await anyio.to_thread.run_sync(lambda: hash_path_sync(item.path, (algo,)).hexdigests()[algo],
                                                 limiter=run.io)
        except FileNotFoundError:
            got = None  # deleted since the walk: the send that follows reports it as a vanished source
        if got == want:
            stats.skipped(item.size)
            run.reporter.emit(ItemSkipped(rel=item.rel, size=item.size, reason="unchanged (content checked)"))
            return True
    await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns, state="queued", offset=0,
                             remote=None, error=None, walked=run.journal.runs.get(run.job, 0))
    run.journal.forget_chunks(run.job, item.rel)
    return False


async def stop_disk_full(run: Run, item: Item, err: DiskFullError, report: RunReport) -> None:
    """Record ``item`` as stopped by a full disk (its partial state stays for resume); the first time, stop
    the run (``report.stopped``). :func:`disk_full_failure` then writes the run's one message."""
    await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns, state="failed",
                             error="disk full", transient=0, walked=run.journal.runs.get(run.job, 0))
    if not report.stopped:
        report.stopped = "disk full"
        report.stop_error = err


async def disk_full_failure(run: Run, report: RunReport) -> None:
    """After the pass stopped by a full disk: one failure saying how much space is missing and what was kept
    for resume (not one per file that was in flight)."""
    err = report.stop_error
    assert isinstance(err, DiskFullError)
    stats = run.reporter.stats
    kept = await run.journal.kept_for_resume(run.job)
    need = max(0, stats.bytes_total - stats.bytes_done - kept[1])
    message = disk_full_message(err, need, stats.walk_done, kept)
    where = printable(err.path) or "(target)"
    stats.failed()
    report.failures.append((where, message))  # in the report only: it is the run's failure, not a file's


async def fail_item(run: Run, item: Item, exc: BaseException, report: RunReport) -> None:
    """Record ``item``'s failure with ``exc`` as a run does: a full disk stops the run (one message at the end
    of the pass, part files kept), a vanished source's leftovers on the target are discarded, anything else is
    an item failure (transient or not)."""
    err = first_leaf(exc)
    if isinstance(err, DiskFullError):
        await stop_disk_full(run, item, err, report)
        return
    msg = describe(err)
    transient = is_transient(err)
    error = msg.splitlines()[0]
    if isinstance(err, SourceVanishedError):
        # what the target holds of it is removed; the journal and the report say the same thing
        await discard(run, item.rel, report)
        error = VANISHED
    await failed(run, item, msg, transient, report, error=error)


async def failed(run: Run, item: Item, msg: str, transient: bool, report: RunReport, *,
                 error: str | None = None) -> None:
    """Record ``item`` as failed with ``msg`` (``error``: the journal's shorter text): journal, counters, an
    ItemFailed event and the report."""
    await run.journal.record(run.job, item.rel, size=item.size, mtime_ns=item.mtime_ns, state="failed",
                             error=error or msg.splitlines()[0], transient=int(transient),
                             walked=run.journal.runs.get(run.job, 0))
    run.reporter.stats.failed()
    run.reporter.emit(ItemFailed(rel=item.rel, error=msg, transient=transient, size=item.size))
    report.failures.append((item.rel, msg.splitlines()[0]))
