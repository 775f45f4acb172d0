"""What a packed job (``Features.packed``: the whole tree as one tar stream) remembers of the tree it uploaded,
so that a rerun skips the upload only when the tree is still the same.

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

import anyio

from asyncdepo.contract import Item
from asyncdepo.digests import FACTORIES, MultiHash
from asyncdepo.engine.compress import TarSource
from asyncdepo.errors import IntegrityError
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
