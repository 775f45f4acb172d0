"""A packed job (``Features.packed``: the whole tree as one tar stream through one writer, :func:`send_packed`),
and what it remembers of the tree it uploaded, so that a rerun skips the upload only when the tree is still
the same.

The pack's journal row keeps, beside the tar's digests, a fingerprint of the tree (:data:`TREE`): xxh3 over
the name, size and mtime (ns) of every file, in the walk's order (the tar's order). A rerun walks the tree
(a stat per file, as the walk of an unpacked job) and compares fingerprints: a file added, removed, grown,
shrunk or touched makes the upload go again. With ``--checksum`` it also builds the tar again, locally and
uncompressed (the tar is deterministic, see :mod:`~asyncdepo.engine.compress`), and compares its digests with
the journaled ones: a full read of the tree, which is what ``--checksum`` asks for, and it finds a file
rewritten with its size and mtime put back.

A pack journaled without a fingerprint (by an older release) is sent again: nothing says it is current.

An archive the target stored with other digests than the tar sent is sent again whole, at the item level
(:func:`resend_verdict` keeps the request level from asking the same question again).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio

from asyncdepo.contract import Item
from asyncdepo.digests import FACTORIES, MultiHash
from asyncdepo.engine.checks import fail_item
from asyncdepo.engine.compress import TarSource
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.source import walk
from asyncdepo.engine.transfer import Run
from asyncdepo.errors import IntegrityError, SourceError
from asyncdepo.events import ItemDone, ItemSkipped, printable
from asyncdepo.transport.pacer import Verdict, first_leaf, should_retry

#: the key of the tree's fingerprint among the pack's journaled digests
TREE = "tree-xxh3"


class TreePrint:
    """The fingerprint of a tree: fed every item in the walk's order."""

    def __init__(self) -> None:
        self._hash = MultiHash(("xxh3",))

    def add(self, item: Item) -> None:
        # NUL cannot occur in a file name: the fields cannot run into each other
        self._hash.update(item.rel.encode("utf-8", "surrogateescape")
                          + f"\0{item.size}\0{item.mtime_ns}\n".encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigests()["xxh3"]


def resend_verdict(exc: BaseException) -> Verdict:
    """The request level's decision for a pack's ``complete``: as :func:`should_retry`, except that a stored
    archive whose digest differs from the tar sent (IntegrityError) is the item level's: asking again gets the
    same answer, only sending the tar again can mend it."""
    if isinstance(first_leaf(exc), IntegrityError):
        return Verdict(False, reason="integrity")
    return should_retry(exc)


async def _fed(items: AsyncIterable[Item], tree: TreePrint) -> AsyncIterator[Item]:
    async for item in items:
        tree.add(item)
        yield item


async def same_tree(items: AsyncIterable[Item], recorded: Mapping[str, str], *, checksum: bool, prefix: str,
                    limiter: anyio.CapacityLimiter) -> bool:
    """Whether the tree ``items`` walks is the one whose pack was uploaded with the journaled ``recorded``
    digests (see the module docstring); with ``checksum`` its content is compared too.

    :raises SourceError: a file or directory cannot be read (the walk's or the reader's error).
    """
    want = recorded.get(TREE)
    if not want:
        return False
    tree = TreePrint()
    if not checksum:
        async for _ in _fed(items, tree):
            pass
        return tree.hexdigest() == want
    algos = tuple(a for a in recorded if a in FACTORIES)
    if not algos:
        return False  # nothing to compare the content with
    src = TarSource(_fed(items, tree), prefix=prefix, digests=algos, limiter=limiter)
    try:
        async for _ in src:
            pass
    finally:
        await src.aclose()
    return tree.hexdigest() == want and all(src.inner_digests.get(a) == recorded[a] for a in algos)


async def send_packed(run: Run, root: Path, report: RunReport) -> None:
    """The whole tree as one tar(.zst) stream through one writer."""
    cfg, stats = run.config, run.reporter.stats
    name = root.name + (".tar.zst" if cfg.compress else ".tar")
    pack = Item(str(root), name, -1, 0)
    uploaded = (await run.journal.lookup(run.job, [name])).get(name) or {}
    algos = tuple(dict.fromkeys(run.hashes))

    def unreadable(rel: str, why: str) -> None:
        # a directory missing from the archive would make it differ from the source: the item fails
        raise SourceError(f"{printable(rel)}: {why}; the archive would miss it")

    async def items(tree: TreePrint | None) -> AsyncIterator[Item]:
        """The walk; ``tree`` (the upload's walk) counts the files and takes their fingerprint."""
        async for b in walk(root, cfg.include, cfg.exclude, cfg.follow_symlinks,
                            lambda r, w: run.reporter.warning(f"skipped {printable(r)}: {w}"),
                            on_error=unreadable):
            for it in b:
                if tree is not None:
                    stats.found(it.size)
                    tree.add(it)
                yield it

    stats.item_in(name, -1)
    try:
        # skipped only when the tree is the one uploaded (packed.py): its listing, with --checksum its content
        if uploaded.get("state") == "done" and await same_tree(
                items(None), uploaded.get("digests") or {}, checksum=cfg.checksum, prefix=root.name,
                limiter=run.io):
            run.reporter.emit(ItemSkipped(rel=name, size=0, reason="uploaded in an earlier run, unchanged since"))
            stats.skipped(0)
            return
        sources: list[TarSource] = []
        trees: list[TreePrint] = []

        async def attempt() -> Any:
            """One item attempt, with a fresh writer and tar stream: an archive stored with other digests than
            the tar sent (IntegrityError from complete) is sent again (run.items), not asked about again."""
            writer = await run.request(name, lambda: run.adapter.open_item(pack, None))

            async def once() -> None:
                stats.restart_walk()
                tree = TreePrint()
                trees.append(tree)
                level = cfg.compress[1] if cfg.compress else 3
                src = TarSource(items(tree), prefix=root.name, compress=cfg.compress[0] if cfg.compress else None,
                                level=level, threads=cfg.compress_threads, digests=algos, limiter=run.io)
                sources.append(src)
                await writer.write_stream(_Counted(src, run, name))

            await run.request(name, once)
            src = sources[-1]
            return await run.request(name, lambda: writer.complete(src.inner_digests, src.inner_size),
                                     classify=resend_verdict)

        result = await run.items.call(attempt, on_retry=run.retrying(name))
        src = sources[-1]
        await run.journal.record(run.job, name, size=src.inner_size, mtime_ns=0, state="done",
                                 digests={**src.inner_digests, TREE: trees[-1].hexdigest()}, remote=result,
                                 error=None)
        # the adapter's state (e.g. an upload token) must survive a crash before ``finish`` runs
        await run.journal.flush()
        await run.journal.set_job_state(run.job, run.adapter.job_state())
        stats.packed_progress(src.inner_size, finished=True)
        run.reporter.emit(ItemDone(rel=name, size=src.inner_size, sent=src.sent, digests=src.inner_digests))
    except Exception as exc:  # noqa: BLE001 - the packed item's failure is recorded in the report
        await fail_item(run, pack, exc, report)
    finally:
        stats.item_out(name)


class _Counted:
    """A ByteSource wrapper that throttles and counts what a packed stream yields."""

    def __init__(self, src: TarSource, run: Run, rel: str) -> None:
        self._src, self._run, self._rel = src, run, rel
        self.size = src.size

    @property
    def digests(self) -> dict[str, str]:
        return self._src.digests

    @digests.setter
    def digests(self, value: dict[str, str]) -> None:
        # ByteSource declares ``digests`` a plain (settable) attribute; the wrapped source owns it
        self._src.digests = value

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> memoryview:
        data = await self._src.__anext__()
        await self._run.throttle(len(data))
        self._run.reporter.stats.moved(self._rel, len(data))
        self._run.reporter.stats.packed_progress(self._src.inner_size)
        # ByteSource yields memoryviews; a view of the immutable bytes is free and stays valid
        return memoryview(data)

    async def aclose(self) -> None:
        await self._src.aclose()
