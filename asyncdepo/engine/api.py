"""The engine facade adapters may use: reading files and trees as streamed bodies, the walk, and hashing a
file off the loop. Nothing else of the engine is theirs to import (the transport helpers they need live in
:mod:`asyncdepo.transport`, the shared types in :mod:`asyncdepo.contract`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncdepo.contract import Item
from asyncdepo.digests import hash_file

if TYPE_CHECKING:
    from asyncdepo.engine.compress import TarSource, tar_source
    from asyncdepo.engine.pipeline import FileSource
    from asyncdepo.engine.source import iter_items

# loaded on first use (PEP 562): zstandard and the read pipeline cost start-up time that an adapter which
# never touches them should not pay
_LAZY = {
    "TarSource": "asyncdepo.engine.compress", "tar_source": "asyncdepo.engine.compress",
    "FileSource": "asyncdepo.engine.pipeline", "iter_items": "asyncdepo.engine.source",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'asyncdepo.engine.api' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ("FileSource", "TarSource", "file_source", "hash_file", "iter_items", "tar_source", "walk")


def file_source(path: str | Path, *, offset: int = 0, length: int | None = None,
                digests: tuple[str, ...] = ("md5",), chunk_size: int = 1 << 20,
                expect: Item | None = None) -> FileSource:
    """A streamed ByteSource of a file (see ``pipeline.FileSource``); ``expect`` pins size and mtime so a
    file that changes while it is read raises SourceChangedError."""
    from asyncdepo.engine.pipeline import FileSource

    p = Path(path)
    if expect is None:
        st = p.stat()
        expect = Item(str(p), p.name, st.st_size, st.st_mtime_ns)
    return FileSource(expect, offset=offset, length=length, digests=digests, block=chunk_size)


async def walk(root: str | Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               follow_symlinks: bool = False) -> AsyncIterator[Item]:
    """Items under ``root``, one at a time (batched walk in a thread underneath)."""
    from asyncdepo.engine.source import walk as _walk_batches

    async for batch in _walk_batches(root, include, exclude, follow_symlinks):
        for item in batch:
            yield item
