"""What an archive declares and implements (see :mod:`asyncdepo.contract`): :class:`Features`, the writers and
readers, :class:`Adapter`, and the registry of URL schemes."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Self

from asyncdepo.contract.values import (
    ByteSource,
    Chunk,
    FetchPlan,
    Item,
    Part,
    PartInfo,
    PlainGet,
    RemoteItem,
    SessionPlan,
    SessionProgress,
)


class SessionWriter(ABC):
    """Sends one :class:`SessionPlan`; created by :meth:`Adapter.open_session`, used once."""

    @abstractmethod
    async def send(self, progress: SessionProgress) -> None:
        """Move every item of the plan, reporting through ``progress``; see "Sessions" in :mod:`asyncdepo.contract` for what returning
        and raising mean. Cancellation stops the transport (a child process is reaped) before it returns.

        :raises DepoError: the session failed (AuthError: the job cannot go on).
        """


class SessionReader(ABC):
    """Fetches one :class:`FetchPlan`; created by :meth:`Adapter.open_fetch_session`, used once."""

    @abstractmethod
    async def fetch(self, progress: SessionProgress) -> None:
        """Write every fetch's bytes to its ``part``, reporting through ``progress`` (``done`` once a part
        holds the whole file); see "Sessions" in :mod:`asyncdepo.contract`.

        :raises DepoError: the session failed (AuthError: the job cannot go on).
        """


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
    :param part_streams: with ``multipart``, parts go to ``write_part_stream`` as streams instead of
        buffers (see :mod:`asyncdepo.contract`); not used with ``--compress`` (a compressed stream cannot be
        re-read by range).
    :param chunk_digests: digests the adapter needs for every chunk or part before it is sent (e.g.
        ``("crc64nvme",)`` for an S3 checksum header, ``("crc32",)`` for tus Upload-Checksum).
    :param item_digests: digests of the whole file that the adapter needs (``prepare``/``complete``).
    :param server_digest: which digest the server reports back, so the engine computes it while reading.
    :param pull: the adapter can list and read remote items.
    :param any_name: the target can store a file whose name is not valid UTF-8 (any bytes Linux allows);
        without it such a file fails on its own (an S3 key, a JSON API's path must be UTF-8).
    :param sessions: pushes go in sessions of many items (:meth:`Adapter.open_session`); see "Sessions" in :mod:`asyncdepo.contract`.
    :param pull_sessions: pulls go in sessions of many items (:meth:`Adapter.open_fetch_session`).
    :param session_items: most items in one session.
    :param session_bytes: most bytes in one session (None: no limit; a larger single item goes alone).
    :param watch_units: in watch mode each batch of files that became complete together is one unit of the
        target, opened and closed on its own (a gypsum version); see "Watch units" in :class:`Adapter`.
        Without it, a target that ``needs_digests_before_start`` refuses watch mode.
    """

    multipart: bool = False
    part_streams: bool = False
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
    sessions: bool = False
    pull_sessions: bool = False
    session_items: int = 1000
    session_bytes: int | None = None
    watch_units: bool = False


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

    async def create(self) -> None:
        """Create the item's upload on the target now, with no byte of it, so that ``state()`` names it
        before any body goes (a target whose writes would otherwise create it lazily, e.g. tus). The engine
        calls it before the first chunk of every chunked item and, when ``state()`` changed, journals it
        durably: a run killed during the first body then leaves no upload the journal does not know. The
        default does nothing (the upload is created by the first write, is atomic like a PutObject, or
        can be found again by the target's own listing).

        :raises TransientError | PermanentError: from the target.
        """

    async def write(self, chunk: Chunk) -> None:
        """Send ``chunk`` at ``chunk.offset == self.confirmed``; on success advance ``confirmed``.

        :raises OffsetMismatchError: the server holds a different offset (the engine resyncs).
        :raises TransientError | PermanentError: from the target.
        """
        raise NotImplementedError

    async def write_part(self, chunk: Chunk) -> PartInfo:
        """Send part ``chunk.part_number``; may run concurrently with other parts of the same item."""
        raise NotImplementedError

    async def write_part_stream(self, part: Part, source: ByteSource) -> PartInfo:
        """Send ``part`` with ``source`` as its body (``Features.part_streams``); may run concurrently with
        other parts of the same item. ``source`` yields exactly ``part.size`` bytes, read from the item when
        the body is written; it is the part ``part.digests`` were computed over unless the file changed
        since, which the target's check of those digests (or the engine's size/mtime check) reveals.

        :raises IntegrityError: the target reports a digest of the part other than ``part.digests``.
        :raises TransientError | PermanentError: from the target.
        """
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

    ``prepare(items)`` (only when ``needs_digests_before_start``: every item with its digests; or, with
    ``sessions``, once with an empty list), ``open_item`` per item (or ``open_session`` per batch), and
    ``finish(ok)`` at the end (``ok`` False on failure or cancel:
    the adapter aborts job-level state, e.g. releases a lock, unless ``keep_for_resume``).

    Watch units (``features.watch_units``, watch mode only): the run is a sequence of units, one at a time.
    First :meth:`open_unit` (after ``restore_job_state``) names the files of a unit an earlier run opened and
    did not close; they are sent and closed before anything new. Then, per batch of files that became
    complete together: :meth:`check_item` per file, the digests of ``features.item_digests``, ``prepare``
    (opens the unit; returns what needs no upload: the engine sends every other file of the unit, whatever
    the journal remembers of an earlier attempt), ``open_item`` per file, ``finish(ok)`` (closes the unit:
    commit when every file arrived, else discard it; the engine offers the files of a discarded unit again).
    ``job_state()`` is journaled after each ``prepare`` and ``finish``, so it must name an open unit. A unit
    cut short (a stop timeout, a second signal, ``kill -9``) gets no ``finish``: it stays open for the next
    run. There is no ``finish`` at the end of the run.
    """

    name: ClassVar[str] = ""
    #: declared by the class; an instance may narrow it by its options (e.g. a route that moves files in sessions)
    features: Features = Features()

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
        """Start the job with every item and its digests; return the ``rel`` paths that need no upload.

        With ``features.sessions`` it is called once with an empty list before the first session: the
        job-level start (what it raises ends the job before any byte moves)."""
        return set()

    def check_item(self, item: Item) -> None:
        """(Watch units) Raise when the target cannot store ``item`` (e.g. its name), so that it fails alone
        before its unit is opened; the default accepts every item.

        :raises DepoError: naming the item and what to do.
        """

    async def open_unit(self) -> list[str]:
        """(Watch units) The ``rel`` paths of the unit an earlier run of the job opened and did not close,
        known from ``restore_job_state`` (empty: none). A unit the target shows closed already is taken as
        closed. Called once, before any ``prepare``.

        :raises DepoError: the target could not be asked.
        """
        return []

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

    # -- sessions (features.sessions / features.pull_sessions) ------------------------------------------
    def session_group(self, item: Item) -> str:
        """Items with different groups never share a session (e.g. one ascp session per image set)."""
        return ""

    async def open_session(self, plan: SessionPlan) -> SessionWriter:
        """Open a push session over ``plan`` (one attempt; the engine retries through the pacer)."""
        raise NotImplementedError

    async def open_fetch_session(self, plan: FetchPlan) -> SessionReader:
        """Open a pull session over ``plan`` (one attempt; the engine retries through the pacer)."""
        raise NotImplementedError

    # -- copies in other processes (the workers of a cluster) ------------------------------------------
    async def handoff(self) -> dict[str, Any]:
        """What a copy of this adapter in another process needs, after ``prepare``, to open items there:
        credentials resolved here (that process may have none), a job-level session. May hold secrets: the
        engine passes it only through its secret channel, never in a task, a log, an event or the journal.
        Called on the entered adapter; the default is nothing to hand over."""
        return {}

    def take_handoff(self, data: Mapping[str, Any]) -> None:
        """Take what :meth:`handoff` returned in the coordinating process; called on a fresh adapter before
        ``async with``. Such a copy only opens items (or sessions): its ``prepare`` and ``finish`` are never
        called."""

    def handback(self) -> dict[str, Any]:
        """What a copy in another process learned of the job that the coordinating process's ``finish``
        needs (e.g. which route each of EMPIAR's session groups went by): JSON-able, never a secret. Read
        after each batch the copy ran; the same facts may come back many times. Default: nothing."""
        return {}

    def take_handback(self, data: Mapping[str, Any]) -> None:
        """Merge what a copy's :meth:`handback` returned into this (the coordinating) adapter."""

    def fallback(self) -> Adapter | None:
        """On a cluster, the adapter with which the coordinating process sends, in sessions of its own, the
        items a worker's copy failed for good — a route the workers do not take (EMPIAR's Globus task, which
        needs the user's endpoint and is one job-wide wait), or None (the default): a worker's failure stands.
        Called after ``prepare`` and ``handoff``; the adapter it returns moves items in sessions
        (``features.sessions``), shares this adapter's job state (its ``job_state`` is this adapter's) and is
        used inside this adapter's ``async with``."""
        return None

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
