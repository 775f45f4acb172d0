"""Value types shared by the engine and the adapters (the only engine module adapters may import,
with ``engine.api`` and ``engine.ascp``).

Contracts:

* ``Item`` is one regular file found by the walk; ``rel`` is its POSIX path relative to the source root.
* ``Chunk`` is one body of a chunked or multipart upload, already read into a reserved buffer and hashed:
  ``data`` is valid only until the writer's ``write``/``write_part`` call returns (the buffer is reused),
  so an adapter that needs the bytes later must copy them.
* ``ByteSource`` is one streamed body (a whole file, or a packed archive): iterate it once with
  ``async for``; each yielded view is valid until the next one is requested. ``digests`` is filled when
  iteration ends. ``size`` is None when the length is not known in advance (compression, tar streams).
* ``PlainGet`` is what an adapter returns from ``Adapter.plain_get`` to have a pull fetch an item by plain
  GET (the engine adds Range, keep-alive, hashing and the rename).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """A regular file to send. ``path`` is absolute; ``rel`` uses '/' whatever the platform."""

    path: str
    rel: str
    size: int
    mtime_ns: int


@dataclasses.dataclass(slots=True)
class Chunk:
    """One request body: ``data`` covers ``[offset, offset + len(data))`` of the (possibly compressed) stream.

    ``digests`` holds hex digests of ``data`` for the algorithms the adapter asked for in
    ``Features.chunk_digests``; ``part_number`` is 1-based for multipart targets and 0 otherwise.
    ``last`` is true for the final chunk of the item; ``total`` is the stream's length once known.
    """

    offset: int
    data: memoryview
    digests: dict[str, str]
    last: bool
    part_number: int = 0
    total: int | None = None


@runtime_checkable
class ByteSource(Protocol):
    """A streamed body read with bounded read-ahead, hashed in the same pass."""

    size: int | None
    digests: dict[str, str]

    def __aiter__(self) -> AsyncIterator[memoryview]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class PartInfo:
    """What the server confirmed for one part of a multipart upload (journaled)."""

    number: int
    size: int
    etag: str
    md5: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteItem:
    """One file on a remote archive, as listed for a pull. ``digests`` maps an algorithm to a hex digest
    the archive published (e.g. ``{"md5": ...}``); ``ref`` is adapter-private (a key, a UUID, a URL)."""

    rel: str
    size: int | None
    digests: dict[str, str]
    ref: str = ""


@dataclasses.dataclass(frozen=True)
class PlainGet:
    """A GET that needs nothing but its URL and headers. ``what`` names it in messages (never the URL: a
    signed URL's query is a credential). ``timeout`` bounds every socket wait (connect and each read)."""

    url: str
    what: str
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    timeout: float = 120.0
