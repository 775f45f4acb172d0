"""Digests of every file before the start, for targets that take them when the upload is opened
(``Features.item_digests``: gypsum's upload session lists every file with its md5).

The tree is walked and hashed in worker threads, small files several to a thread call; a file that cannot
be read is that file's failure and nothing is started (:func:`not_started`); a file gone since the walk is
left to the pass, which does not find it either.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from asyncdepo.contract import Item
from asyncdepo.digests import hash_path_sync
from asyncdepo.engine.checks import fail_item, utf8
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.source import walk
from asyncdepo.engine.transfer import Run
from asyncdepo.errors import SourceError
from asyncdepo.events import printable

#: bytes of small files hashed in one worker-thread call before the start: a thread hop per 1 MiB file cost
#: ~0.25 core-seconds per GB more than hops per 8 MiB of files (1,000 x 1 MiB, md5; ~1.55 s of it is md5)
PREHASH_GROUP = 8 << 20


def _groups(items: list[Item]) -> list[list[Item]]:
    """``items`` in consecutive groups of at most :data:`PREHASH_GROUP` bytes (a larger file alone)."""
    groups: list[list[Item]] = []
    size = 0
    for item in items:
        if not groups or size + item.size > PREHASH_GROUP:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.size
    return groups


async def prehash(run: Run, root: Path) -> tuple[list[tuple[Item, dict[str, str]]], list[tuple[Item, str]]]:
    """Digests of every file before the start (targets that need them); md5 etc. in parallel threads,
    small files several to a thread call. Returns the files hashed, and the files that could not be read
    with why (each is that file's failure, as rsync's exit 23: the rest goes on without it); a file gone
    since the walk is left out of both (the pass does not find it either)."""
    algos = tuple(dict.fromkeys(run.features.item_digests or ("md5",)))
    out: list[tuple[Item, dict[str, str]]] = []
    unreadable: list[tuple[Item, str]] = []
    run.reporter.message("hashing files before the upload starts")
    cfg = run.config

    def hash_group(group: list[Item]) -> None:
        for item in group:
            try:
                out.append((item, hash_path_sync(item.path, algos).hexdigests()))
            except FileNotFoundError:
                continue
            except OSError as exc:
                unreadable.append((item, f"cannot read: {exc.strerror or type(exc).__name__}"))

    async def one(group: list[Item]) -> None:
        await anyio.to_thread.run_sync(hash_group, group, limiter=run.io)

    async for batch in walk(root, cfg.include, cfg.exclude, cfg.follow_symlinks,
                            lambda r, w: run.reporter.warning(f"skipped {printable(r)}: {w}")):
        # the others fail on their own in the pass
        wanted = [item for item in batch if run.features.any_name or utf8(item.rel)]
        async with anyio.create_task_group() as tg:
            for group in _groups(wanted):
                tg.start_soon(one, group)
    out.sort(key=lambda p: p[0].rel)
    return out, unreadable


async def not_started(run: Run, unreadable: list[tuple[Item, str]], report: RunReport) -> None:
    """Files a target that takes every digest at its start could not be given: each fails, and nothing is
    started. Such a target makes the upload visible whole or not at all (gypsum's version): one made without
    them would not be the source, and one with failures is aborted at the end, so sending the rest would be
    lost work."""
    for item, why in unreadable:
        await fail_item(run, item, SourceError(f"{printable(item.rel)}: {why}"), report)
    why = (f"nothing was sent: {len(unreadable)} file(s) cannot be read; make them readable or leave them out "
           "(--exclude), then run the push again")
    report.failures.append((run.adapter.describe(), why))
