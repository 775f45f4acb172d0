"""The value types that cross the line between the engine and the adapters (see :mod:`asyncdepo.contract`):
files found by the walk, chunks and streamed bodies, parts, remote items, session plans and the progress a
session reports through."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from asyncdepo.errors import DepoError


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
class Part:
    """One part of a multipart item handed over as a stream (``Features.part_streams``): bytes
    ``[offset, offset + size)`` of the item, part ``number`` (1-based), and the hex ``digests`` of those bytes
    for the algorithms in ``Features.chunk_digests``, computed by the engine before the part is sent."""

    number: int
    offset: int
    size: int
    digests: dict[str, str]
    last: bool


@dataclasses.dataclass(frozen=True, slots=True)
class PartInfo:
    """What the server confirmed for one part of a multipart upload (journaled). ``digests`` are the part's
    hex digests that were sent with it (e.g. ``{"crc64nvme": ...}``), so a resume can check them."""

    number: int
    size: int
    etag: str
    md5: str = ""
    digests: Mapping[str, str] = dataclasses.field(default_factory=dict)


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



@dataclasses.dataclass(frozen=True, slots=True)
class SessionPlan:
    """What one push session moves (:meth:`Adapter.open_session`).

    :param items: the files, in walk order (at most ``features.session_items``, one session group).
    :param saved: ``rel`` -> the resume state journaled for it by an earlier session (``done``/``note``).
    :param rate: bytes per second this session may use (its share of ``--bwlimit``); None: no limit.
    :param last_try: no further session for these items follows in this run.
    """

    items: tuple[Item, ...]
    saved: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    rate: float | None = None
    last_try: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Fetch:
    """One file of a pull session: its bytes go to ``part`` (under the plan's ``root``), which may already
    hold a prefix of them (``offset`` bytes) to continue from."""

    item: RemoteItem
    part: Path
    offset: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class FetchPlan:
    """What one pull session fetches (:meth:`Adapter.open_fetch_session`); fields as :class:`SessionPlan`."""

    root: Path
    fetches: tuple[Fetch, ...]
    rate: float | None = None
    last_try: bool = False


class SessionProgress(Protocol):
    """How a session reports (see "Sessions" in :mod:`asyncdepo.contract`). The synchronous methods must be quick;
    they may be called from a transport's progress callback."""

    def moved(self, rel: str, n: int) -> None:
        """``n`` more bytes of ``rel`` moved (``rel`` may be ``""``: a session total)."""

    def done(self, rel: str, state: Mapping[str, Any] | None = None) -> None:
        """``rel`` is complete on the far side; ``state`` (secret-free) is journaled with it."""

    def failed(self, rel: str, error: DepoError) -> None:
        """``rel`` failed in this session (retried when ``error`` is transient)."""

    async def note(self, state: Mapping[str, Any]) -> None:
        """Journal ``state`` as the resume state of every item of the session not yet done; returns once it
        is committed, so it survives a kill that follows."""
