"""The contract between the engine and the adapters: what each side may rely on.

Both sides import this module and nothing of each other (the model is rclone's ``fs/``). It holds:

* the value types that cross the line — :class:`Item` (a file found by the walk), :class:`Chunk` (one request
  body read into a reserved buffer), :class:`ByteSource` (one streamed body), :class:`PartInfo`,
  :class:`RemoteItem` (a file listed for a pull) and :class:`PlainGet` (a pull item fetched by plain GET);
* :class:`Features` — what an archive can do, the only thing the engine reads to decide how to send;
* :class:`ChunkWriter` and :class:`Adapter` — the interface an archive implements;
* :func:`register` and :data:`REGISTRY` — URL schemes to adapter factories (``asyncdepo.adapters`` loads the
  built-in ones).

Buffers: ``Chunk.data`` is valid only until the writer's ``write``/``write_part`` call returns (the buffer is
reused), so an adapter that needs the bytes later must copy them; each view a ByteSource yields is valid until
the next one is requested, and a body class must not hand a view to a transport that may still hold it after
that (see :mod:`asyncdepo.transport.httpbody`).

An adapter translates a job into one archive's API. The engine never branches on an adapter's name or
type; what differs between archives is declared in :class:`Features`, and the engine reads those.

Push, per item, the engine picks one of three modes from the features:

* **multipart** (``features.multipart`` and the item is larger than one chunk): the engine reads the
  file in order into reserved buffers, hashes them, and hands each to ``writer.write_part`` — several
  parts of one file may be in flight at once, in any order. Parts already in ``writer.parts`` are skipped.
* **chunked** (``features.chunked``, or multipart with a file that fits in one chunk): chunks are sent
  in order with ``writer.write``, starting at ``writer.confirmed`` (the offset the server confirmed).
* **stream** (neither): one ``writer.write_stream(source)`` with the whole file as a ByteSource.

After the last byte, ``writer.complete(digests, size)`` finalises the item and compares the digest the
server reports with ``digests`` (computed while reading), raising IntegrityError on a mismatch.

Retries: an adapter makes one attempt per call and raises from the ``asyncdepo.errors`` tree; the engine
retries transient errors (per request with backoff, per item by reopening with the journaled state, per
run). ``write``/``write_part`` must be idempotent for the same chunk: the engine may resend a chunk
whose response was lost, after calling ``writer.resync()`` to learn the server's offset.

Secrets: an adapter keeps credentials to itself; ``describe()`` and ``state()`` must not contain any.

Adapters import this module, :mod:`asyncdepo.transport` and the engine's facade :mod:`asyncdepo.engine.api`;
never the engine's internals.
"""

from __future__ import annotations

import dataclasses
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Protocol, Self, runtime_checkable


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



@dataclasses.dataclass(frozen=True)
class Features:
    """What an archive can do; the engine reads these and never the adapter's name.

    :param multipart: parts of one file may be sent concurrently (``write_part``).
    :param chunked: a file may be sent as ordered chunks, resumable at a server-confirmed offset.
    :param resumable: the server can tell what it already holds (tus HEAD, S3 ListParts, a partial file).
    :param needs_digests_before_start: ``prepare`` must receive every item's digests before any byte moves.
    :param packed: the whole source goes as one archive stream (tar, optionally zstd).
    :param max_part_size: largest chunk/part the target accepts (None: no limit).
    :param min_part_size: smallest non-final part (S3: 5 MiB).
    :param max_parts: most parts one multipart upload may have.
    :param max_concurrency: cap on concurrent requests to this target (None: the engine's --transfers).
    :param chunk_digests: digests the adapter needs for every chunk before it is sent (e.g. ``("md5",)``
        for Content-MD5, ``("sha1",)`` for tus Upload-Checksum).
    :param item_digests: digests of the whole file that the adapter needs (``prepare``/``complete``).
    :param server_digest: which digest the server reports back, so the engine computes it while reading.
    :param pull: the adapter can list and read remote items.
    :param any_name: the target can store a file whose name is not valid UTF-8 (any bytes Linux allows);
        without it such a file fails on its own (an S3 key, a JSON API's path must be UTF-8).
    """

    multipart: bool = False
    chunked: bool = False
    resumable: bool = False
    needs_digests_before_start: bool = False
    packed: bool = False
    max_part_size: int | None = None
    min_part_size: int = 0
    max_parts: int = 10_000
    max_concurrency: int | None = None
    chunk_digests: tuple[str, ...] = ()
    item_digests: tuple[str, ...] = ()
    server_digest: str | None = None
    pull: bool = False
    any_name: bool = False


class ChunkWriter(ABC):
    """Sends one item. Created by :meth:`Adapter.open_item`; used by one item task.

    ``confirmed`` and ``parts`` describe what the server already holds when the writer is opened
    (from the journaled state, checked against the server). ``state()`` is journaled after every
    confirmed chunk/part so a crash loses at most the chunks in flight.
    """

    confirmed: int = 0
    parts: dict[int, PartInfo]

    def __init__(self) -> None:
        self.confirmed = 0
        self.parts = {}

    def state(self) -> dict[str, Any]:
        """JSON-able resume state (remote ids, locations, parts); never a secret."""
        return {}

    async def resync(self) -> int:
        """Ask the server how many bytes it holds (after a lost response); returns the new ``confirmed``."""
        return self.confirmed

    async def write(self, chunk: Chunk) -> None:
        """Send ``chunk`` at ``chunk.offset == self.confirmed``; on success advance ``confirmed``.

        :raises OffsetMismatchError: the server holds a different offset (the engine resyncs).
        :raises TransientError | PermanentError: from the target.
        """
        raise NotImplementedError

    async def write_part(self, chunk: Chunk) -> PartInfo:
        """Send part ``chunk.part_number``; may run concurrently with other parts of the same item."""
        raise NotImplementedError

    async def write_stream(self, source: ByteSource) -> None:
        """Send the whole item as one streamed body."""
        raise NotImplementedError

    @abstractmethod
    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """Finalise the item and verify it; returns what to journal about the remote copy.

        :raises IntegrityError: the server's digest or size differs from ours.
        """

    async def verify(self, chunks: AsyncIterator[list[tuple[int, int, str]]], algo: str) -> int:
        """Check what the target holds before the engine builds on it, after a reopen from saved state.

        ``chunks`` yields, in offset order and in batches, ``(offset, length, digest)`` of every chunk the
        target confirmed in earlier attempts (the journal's record; ``digest`` is the hex ``algo`` digest of
        the chunk's bytes). A target that can read its bytes back re-hashes them and keeps only the prefix
        whose chunks match, contiguously from 0 (a local part file is truncated to it). Returns the offset
        from which the item resumes, and sets ``confirmed`` to it; never more than ``confirmed``.

        The default trusts ``confirmed``: for targets that cannot be read back (tus checks each chunk's
        digest as it arrives, ``Upload-Checksum``) the server's offset is what can be checked.

        :raises TransientError: the target could not be read.
        """
        return self.confirmed

    async def abort(self) -> None:
        """Discard what was sent (terminate, AbortMultipartUpload, delete a temp file). Must not raise."""


class Adapter(ABC):
    """One archive. Use as ``async with adapter:``; the engine calls, in order:

    ``prepare(items)`` (only when ``needs_digests_before_start``: every item with its digests),
    ``open_item`` per item, and ``finish(ok)`` at the end (``ok`` False on failure or cancel:
    the adapter aborts job-level state, e.g. releases a lock, unless ``keep_for_resume``).
    """

    name: ClassVar[str] = ""
    features: ClassVar[Features] = Features()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    def describe(self) -> str:
        """A stable, secret-free identity of the target (used for the job id and in messages)."""

    def job_state(self) -> dict[str, Any]:
        """Job-level resume state to journal (e.g. an upload session); never a secret."""
        return {}

    def restore_job_state(self, state: Mapping[str, Any]) -> None:
        """Take back what ``job_state`` returned in an earlier run of the same job."""

    async def prepare(self, items: list[tuple[Item, dict[str, str]]]) -> set[str]:
        """Start the job with every item and its digests; return the ``rel`` paths that need no upload."""
        return set()

    @abstractmethod
    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        """Open (or reopen, from ``saved`` journal state) the upload of ``item``."""

    async def finish(self, ok: bool) -> dict[str, Any]:
        """End the job: commit on success, abort on failure. Returns a secret-free summary."""
        return {}

    async def discard(self, rel: str, saved: Mapping[str, Any] | None) -> None:
        """Remove what an earlier run started on the target for ``rel`` (a part file, a multipart or tus
        upload), described by its journaled writer state ``saved``; called when the source file vanished.
        The default does nothing (targets that keep nothing unfinished). Must not raise for what is already
        gone.

        :raises TransferError: the target refused (the engine reports it and goes on).
        """

    # -- pull ---------------------------------------------------------------------------------------
    def list_remote(self) -> AsyncIterator[RemoteItem]:
        """Every remote item to fetch, lazily."""
        raise NotImplementedError

    def read(self, item: RemoteItem, offset: int) -> AsyncIterator[bytes]:
        """The item's bytes from ``offset`` to the end (a ranged GET); raises from the errors tree."""
        raise NotImplementedError

    async def plain_get(self, item: RemoteItem) -> PlainGet | None:
        """The item as a plain GET (URL and headers; the engine adds Range), or None to use :meth:`read`.

        A plain GET is received, hashed and written in a worker thread (:mod:`asyncdepo.transport.httpget`),
        which is much cheaper than streaming it through the event loop.
        """
        return None


AdapterFactory = Callable[..., Adapter]
#: URL scheme -> adapter factory; filled by :func:`register` as adapter modules are imported
REGISTRY: dict[str, AdapterFactory] = {}


def register(scheme: str) -> Callable[[AdapterFactory], AdapterFactory]:
    """Class decorator: make an adapter reachable by a URL scheme (``tus+http``, ``file``, ``s3``)."""

    def deco(factory: AdapterFactory) -> AdapterFactory:
        REGISTRY[scheme] = factory
        return factory

    return deco
