"""The engine facade adapters may use: hashing a file off the loop, and a file as a streamed body
(:func:`file_source`, which tests of adapters feed to their writers). Nothing else of the engine is theirs to
import (the transport helpers they need live in :mod:`asyncdepo.transport`, the shared types in
:mod:`asyncdepo.contract`). An adapter that needs more of the engine adds it here, so the import-linter contract
"Adapters use the engine only through its facade" keeps naming the one door."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from asyncdepo.contract import Item
from asyncdepo.digests import hash_file

if TYPE_CHECKING:
    from asyncdepo.engine.pipeline import FileSource

__all__ = ("file_source", "hash_file")


def file_source(path: str | Path, *, offset: int = 0, length: int | None = None,
                digests: tuple[str, ...] = ("md5",), chunk_size: int = 1 << 20,
                expect: Item | None = None) -> FileSource:
    """A streamed ByteSource of a file (see ``pipeline.FileSource``); ``expect`` pins size and mtime so a
    file that changes while it is read raises SourceChangedError."""
    # imported here: the read pipeline costs start-up time an adapter that only hashes should not pay
    from asyncdepo.engine.pipeline import FileSource

    p = Path(path)
    if expect is None:
        st = p.stat()
        expect = Item(str(p), p.name, st.st_size, st.st_mtime_ns)
    return FileSource(expect, offset=offset, length=length, digests=digests, block=chunk_size)
