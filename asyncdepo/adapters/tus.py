"""``tus+http://HOST/PATH`` and ``tus+https://...`` — any tus 1.0.0 server (https://tus.io) as a target.

The URL names the creation endpoint (``tus+https://host/files/`` -> ``https://host/files/``; an empty path
means ``/files/``). The optional secret ``token`` is sent as ``Authorization: Bearer ...``, only to the
endpoint's own origin (a Location on another host, e.g. a CDN, never receives it), and never appears in
``describe()``, ``state()`` or error messages.

Per item (chunked mode): the engine calls ``create`` (an empty POST) and journals the upload's location
before the first PATCH: tus offers no way to list uploads, so one created by a request in flight at a kill
(a creation-with-upload POST creates its upload before its body arrives) could never be found again. (An
empty POST whose answer is lost still leaves an empty upload behind.) A writer used without ``create``
creates the upload with its first ``write``, with creation-with-upload when the server offers it (one
request for a small file). Uploads are created with POST (``Upload-Length``; for an item of unknown size, i.e. a compressed stream,
``Upload-Defer-Length: 1`` and the length is sent with the last chunk) and ``Upload-Metadata`` ``filename``
(the base name) and ``relpath`` (the item's path). With saved state ``{"location": ...}`` it asks HEAD for
the offset instead, so only the rest is sent; a 404/410, or a length that no longer matches the item,
starts a new upload from zero.

``write`` sends one PATCH per chunk (``Content-Type: application/offset+octet-stream``, ``Upload-Offset``,
an explicit Content-Length, the chunk's memoryview as body) and, when the server offers the checksum
extension, ``Upload-Checksum: <algo> <base64>`` from ``chunk.digests[algo]`` with the cheapest algorithm it
lists in ``Tus-Checksum-Algorithm`` (:data:`CHECKSUM_PREFERENCE`, fastest first: crc32 at ~3.4 GB/s a core
before sha1 at ~1.5 and md5 at ~0.6). Writes are
idempotent: a chunk the server already holds in full is a no-op, one it holds in part sends only the tail
(hashed here, in a thread). ``resync`` is HEAD; ``complete`` checks with HEAD that the server holds exactly
the bytes sent (tus reports no digest, so the size is what can be verified; no HEAD when the last
PATCH's Upload-Offset already confirmed the whole length; for a deferred upload whose
length was not yet declared it sends an empty PATCH with ``Upload-Length``); ``abort`` is DELETE
(termination extension) and never raises. ``write_stream`` sends a whole ByteSource as one PATCH.

Resume check: tus has no way to read an upload back, so what is checked before building on it is the
server's offset (HEAD) and length against the item; every byte the server holds was checked by the server
itself as it arrived when the checksum extension is in use (``Upload-Checksum`` per PATCH, 460 on a
mismatch). The engine forgets its journaled chunk digests past the server's offset, so nothing is built on
chunks the server lost.

Names: ``relpath`` and ``filename`` metadata are base64 of the name's bytes, so a name that is not UTF-8 is
sent as it is (``Features.any_name``). ``discard(rel, saved)`` terminates the saved upload (DELETE) of an
item whose source vanished.

Features are decided in ``__aenter__`` from OPTIONS: ``chunk_digests`` is the chosen algorithm, or nothing
when the server does not offer the checksum extension or none of the algorithms we know (the class default
assumes sha1, the spec's mandatory one, so an engine that reads features before entering computes a
digest rather than missing it). ``Tus-Max-Size`` is the largest *upload*, not a
part size, so it does not set ``max_part_size``; an item above it is refused before any byte moves
(QuotaError).

Errors: 409 -> OffsetMismatchError (no offset: servers do not send one; the engine resyncs), 460 ->
:class:`ChecksumMismatchError` (a TransientError: the chunk was damaged on the way and is simply re-sent;
if the buffer itself is bad the per-item retry re-reads the file), 404/410 on PATCH/HEAD -> TransientError
(the upload expired or was terminated; reopening the item creates a new one), 423 -> TransientError
(another request holds the upload), other statuses as ``transport.failures.status_error`` maps them; network
errors and timeouts
-> TransientError naming the method and path (never headers or query strings). Every request has its own
timeout (connect, sock_read, and a total scaled to the body size).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Self
from urllib.parse import urljoin, urlsplit

import aiohttp
import anyio
from multidict import CIMultiDictProxy

from asyncdepo.contract import Adapter, ByteSource, Chunk, ChunkWriter, Features, Item, register
from asyncdepo.digests import digest_bytes
from asyncdepo.errors import (
    IntegrityError,
    OffsetMismatchError,
    QuotaError,
    TransferError,
    TransientError,
    UsageError,
)
from asyncdepo.transport.failures import boundary, status_error
from asyncdepo.transport.httpbody import SourcePayload, ViewPayload, client_session, request_timeout

TUS_VERSION = "1.0.0"
OFFSET_TYPE = "application/offset+octet-stream"


#: tus checksum algorithms we can compute, cheapest first (measured a core here: crc32c ~9.7 GB/s, crc64nvme
#: ~9.8, crc32 ~3.4, sha1 ~1.5, sha256 ~1.4, sha512, md5 ~0.6); the first one a server lists is used
CHECKSUM_PREFERENCE = ("crc32c", "crc64nvme", "crc32", "sha1", "sha256", "sha512", "md5")


class ChecksumMismatchError(TransientError):
    """The server computed a different checksum for a chunk (tus status 460); the chunk is re-sent."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def _hex_to_b64(hexdigest: str) -> str:
    return base64.b64encode(binascii.unhexlify(hexdigest)).decode("ascii")


Headers = CIMultiDictProxy[str]


def _int_header(headers: Headers, name: str) -> int | None:
    value = headers.get(name, "")
    return int(value) if value.isascii() and value.isdigit() else None


class _Http:
    """The adapter's session plus the request discipline: tus headers, timeouts, error mapping."""

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint
        self._origin = urlsplit(endpoint)[:2]
        self._token = token
        self.session: aiohttp.ClientSession | None = None

    def headers(self, url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Tus-Resumable": TUS_VERSION, **(extra or {})}
        if self._token and urlsplit(url)[:2] == self._origin:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        nbytes: int = 0,
        ok: tuple[int, ...] = (200, 201, 204),
        passthrough: tuple[int, ...] = (),
        upload: bool = True,
    ) -> tuple[int, Headers]:
        """One request; returns (status, headers) for ``ok`` and ``passthrough`` statuses, raises otherwise.
        ``upload`` says the URL is an upload resource (404/410 then mean "gone, start anew").

        :raises TransientError: network error or timeout (message: method and path only).
        :raises TransferError: an unexpected status, mapped by ``transport.failures.status_error``.
        """
        assert self.session is not None, "use the adapter as 'async with adapter:'"
        what = f"tus {method} {urlsplit(url).path}"
        with boundary(what):
            async with self.session.request(
                method,
                url,
                headers=self.headers(url, headers),
                data=data,
                timeout=request_timeout(nbytes),
                allow_redirects=False,
            ) as resp:
                if resp.status in ok or resp.status in passthrough:
                    await resp.release()
                    return resp.status, resp.headers
                text = (await resp.content.read(300)).decode("utf-8", "replace").strip().splitlines()
                server = text[0] if text else (resp.reason or "")
                meaning = _MEANING.get(resp.status) if upload or resp.status not in (404, 410) else None
                message = f"{meaning} ({server})" if meaning and server else (meaning or server)
                raise status_error(resp.status, message, what=what, retry_after=resp.headers.get("Retry-After"),
                                   refine=_upload_statuses if upload else _statuses)


# what tus's own statuses mean (the protocol's, not HTTP's): tus.io/protocols/resumable-upload
_MEANING = {
    409: "the server holds a different offset",
    460: "checksum mismatch, chunk discarded",
    404: "the upload is gone; it will be created anew",
    410: "the upload is gone; it will be created anew",
    423: "the upload is locked by another request",
}


def _statuses(status: int, message: str) -> type[TransferError] | None:
    """tus's statuses: 409 another offset (the engine resyncs), 460 a damaged chunk (re-sent), 423 locked."""
    return {409: OffsetMismatchError, 460: ChecksumMismatchError, 423: TransientError}.get(status)


def _upload_statuses(status: int, message: str) -> type[TransferError] | None:
    """On an upload resource 404/410 mean it expired or was terminated: reopening the item creates another."""
    return TransientError if status in (404, 410) else _statuses(status, message)


class TusWriter(ChunkWriter):
    """One upload resource; see the module docstring."""

    def __init__(self, http: _Http, item: Item, location: str | None, checksum: str | None,
                 length: int | None, creator: TusAdapter | None = None) -> None:
        super().__init__()
        self._http = http
        self.item = item
        self.location = location  # None until the upload is created (lazily, by the first write)
        self._checksum = checksum
        self.length = length  # None while deferred
        self._creator = creator

    def state(self) -> dict[str, Any]:
        return {"location": self.location} if self.location else {}

    @property
    def _path(self) -> str:
        """The upload URL's path, for messages ("" while the upload is not created yet)."""
        return urlsplit(self.location).path if self.location else ""

    async def _ensure(self) -> str:
        """The upload's location, creating the upload (empty POST) when it does not exist yet."""
        if self.location is None:
            assert self._creator is not None
            self.location = await self._creator._post(self.item, None, None)
        return self.location

    async def create(self) -> None:
        """Create the upload (empty POST) unless it exists: the engine journals its location before the
        first PATCH (see the module docstring)."""
        await self._ensure()

    async def _head(self) -> tuple[int, int | None]:
        if self.location is None:
            return 0, self.length
        _, headers = await self._http.request("HEAD", self.location, ok=(200, 204))
        offset = _int_header(headers, "Upload-Offset")
        if offset is None:
            raise TransientError(f"tus HEAD {self._path}: no Upload-Offset in the answer")
        return offset, _int_header(headers, "Upload-Length")

    async def resync(self) -> int:
        """HEAD: the server's offset becomes ``confirmed`` (0 while the upload was never created)."""
        self.confirmed, length = await self._head()
        if length is not None:
            self.length = length
        return self.confirmed

    async def write(self, chunk: Chunk) -> None:
        """PATCH ``chunk`` (only the part the server lacks); see the module docstring.

        :raises OffsetMismatchError: 409, or the chunk starts past ``confirmed``.
        :raises ChecksumMismatchError: 460.
        :raises TransientError | PermanentError: other failures.
        """
        end = chunk.offset + len(chunk.data)
        if chunk.offset > self.confirmed:
            raise OffsetMismatchError(
                f"tus PATCH {self._path}: chunk at {chunk.offset}, {self.confirmed} confirmed",
                offset=self.confirmed,
            )
        final_length = None
        if self.length is None and chunk.last:
            final_length = chunk.total if chunk.total is not None else end
        if end <= self.confirmed and final_length is None:
            return  # the server already holds all of it (a response that was lost)
        skip = self.confirmed - chunk.offset
        body = chunk.data[skip:]
        headers = {
            "Content-Type": OFFSET_TYPE,
            "Upload-Offset": str(self.confirmed),
            "Content-Length": str(len(body)),
        }
        if final_length is not None:
            headers["Upload-Length"] = str(final_length)
        algo = self._checksum
        if algo:
            digest = chunk.digests.get(algo) if skip == 0 else None
            if digest is None:  # a tail, or an engine that did not hash: hashed off the loop
                digest = (await anyio.to_thread.run_sync(digest_bytes, body, (algo,)))[algo]
            headers["Upload-Checksum"] = f"{algo} {_hex_to_b64(digest)}"
        if self.location is None and self._creator is not None and self._creator.with_upload and skip == 0:
            # creation-with-upload: one request creates the upload and carries the first chunk
            del headers["Upload-Offset"]
            self.location, resp = await self._creator._post_with(self.item, headers, body)
        else:
            location = await self._ensure()
            _, resp = await self._http.request(
                "PATCH", location, headers=headers, data=ViewPayload(body), nbytes=len(body)
            )
        offset = _int_header(resp, "Upload-Offset")
        if final_length is not None:
            self.length = final_length
        end = self.confirmed + len(body)
        if offset != end:
            # a server that took fewer bytes than it was sent: learn where it is and let the engine resend
            if offset is not None:
                self.confirmed = offset
            raise OffsetMismatchError(
                f"tus PATCH {self._path}: server at {offset}, expected {end}", offset=offset
            )
        self.confirmed = end

    async def write_stream(self, source: ByteSource) -> None:
        """Send ``source`` (which must start at byte ``confirmed``) as one PATCH; when the length is
        deferred, declare it afterwards with an empty PATCH.

        :raises TransientError | PermanentError: from the target (the engine retries with a new source).
        """
        headers = {"Content-Type": OFFSET_TYPE, "Upload-Offset": str(self.confirmed)}
        if source.size is not None:
            headers["Content-Length"] = str(source.size)
        location = await self._ensure()
        _, resp = await self._http.request(
            "PATCH",
            location,
            headers=headers,
            data=SourcePayload(source, OFFSET_TYPE),
            nbytes=source.size or 0,
        )
        offset = _int_header(resp, "Upload-Offset")
        if offset is None:
            raise TransientError(f"tus PATCH {self._path}: no Upload-Offset in the answer")
        self.confirmed = offset
        if self.length is None:
            await self._declare_length(offset)

    async def _declare_length(self, length: int) -> None:
        headers = {
            "Content-Type": OFFSET_TYPE,
            "Upload-Offset": str(self.confirmed),
            "Upload-Length": str(length),
        }
        await self._http.request("PATCH", await self._ensure(), headers=headers, data=b"")
        self.length = length

    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """HEAD: the server must hold exactly the bytes sent (``size``; for a deferred upload, what was sent).

        :raises IntegrityError: the server's offset or length differs.
        """
        expect = size if self.item.size >= 0 else self.confirmed
        if self.location is not None and self.confirmed == expect and self.length == expect:
            # the last PATCH's answer already confirmed every byte: no HEAD needed
            return {"location": self.location, "size": expect}
        await self._ensure()
        offset, length = await self._head()
        if length is None and offset == expect:
            await self._declare_length(expect)
            length = expect
        if offset != expect or length != expect:
            raise IntegrityError(
                f"{self.item.rel}: tus server holds {offset} of {length} bytes, expected {expect}"
            )
        return {"location": self.location, "size": expect}

    async def abort(self) -> None:
        """DELETE the upload (termination); never raises."""
        if self.location is None:
            return
        try:
            await self._http.request("DELETE", self.location, ok=(204, 200), passthrough=(404, 410))
        except Exception:  # noqa: BLE001 - abort runs in cleanup paths and must not mask the first error
            return


@register("tus+http")
@register("tus+https")
class TusAdapter(Adapter):
    """A tus 1.0.0 server; see the module docstring."""

    name = "tus"
    features = Features(chunked=True, resumable=True, chunk_digests=("sha1",), any_name=True)

    def __init__(self, url: str, config: Any = None, secrets: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tus+http", "tus+https") or not parts.hostname:
            raise UsageError(f"not a tus URL: {url.split('?')[0]!r} (expected tus+https://HOST/PATH)")
        if parts.username or parts.password:
            raise UsageError("put the tus token in the secrets (token), not in the URL")
        path = parts.path if parts.path not in ("", "/") else "/files/"
        self.endpoint = f"{parts.scheme.removeprefix('tus+')}://{parts.netloc}{path}"
        if parts.query:
            self.endpoint += f"?{parts.query}"
        self._describe = f"tus+{parts.scheme.removeprefix('tus+')}://{parts.netloc}{path}"
        self.config = config
        self._http = _Http(self.endpoint, (secrets or {}).get("token"))
        self.extensions: frozenset[str] = frozenset()
        self.max_size: int | None = None

    def describe(self) -> str:
        return self._describe

    async def handoff(self) -> dict[str, Any]:
        """The token, for a copy of the adapter on a cluster's worker (see ``Adapter.handoff``)."""
        return {"token": self._http._token} if self._http._token else {}

    def take_handoff(self, data: Mapping[str, Any]) -> None:
        if data.get("token"):
            self._http._token = str(data["token"])

    async def __aenter__(self) -> Self:
        self._http.session = client_session()
        try:
            _, headers = await self._http.request("OPTIONS", self.endpoint, ok=(200, 204), upload=False)
        except BaseException:
            await self._http.session.close()
            self._http.session = None
            raise
        versions = [v.strip() for v in headers.get("Tus-Version", TUS_VERSION).split(",")]
        if TUS_VERSION not in versions:
            await self.__aexit__()
            raise UsageError(
                f"{self._describe} does not speak tus {TUS_VERSION} (it offers {', '.join(versions)})"
            )
        ext = headers.get("Tus-Extension", "")
        self.extensions = frozenset(e.strip() for e in ext.split(",") if e.strip())
        algos = {a.strip().lower() for a in headers.get("Tus-Checksum-Algorithm", "").split(",")}
        offered = [a for a in CHECKSUM_PREFERENCE if a in algos] if "checksum" in self.extensions else []
        self.max_size = _int_header(headers, "Tus-Max-Size")
        # features depend on what this server offers, so they are set per instance
        self.features = Features(
            chunked=True, resumable=True, chunk_digests=tuple(offered[:1]), any_name=True
        )
        if "creation" not in self.extensions:
            await self.__aexit__()
            raise UsageError(f"{self._describe} does not offer the tus creation extension")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http.session is not None:
            await self._http.session.close()
            self._http.session = None

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> TusWriter:
        """Reopen the saved upload (HEAD) or create one (POST); see the module docstring.

        :raises QuotaError: the item is larger than Tus-Max-Size.
        :raises UsageError: an item of unknown size and no creation-defer-length extension.
        """
        checksum = self.features.chunk_digests[0] if self.features.chunk_digests else None
        if self.max_size is not None and item.size > self.max_size:
            raise QuotaError(
                f"{item.rel}: {item.size} bytes exceed the server's Tus-Max-Size {self.max_size}"
            )
        location = saved.get("location") if saved else None
        if isinstance(location, str) and location:
            writer = TusWriter(self._http, item, location, checksum, item.size if item.size >= 0 else None)
            try:
                offset, length = await writer._head()
            except TransferError as exc:
                if exc.status not in (404, 410):
                    raise
            else:
                if item.size < 0 or length == item.size:
                    writer.confirmed = offset
                    writer.length = length
                    return writer
                await writer.abort()  # an upload of another version of the file
        # created by the first write (creation-with-upload when offered), so a small file costs one request
        return TusWriter(self._http, item, None, checksum, item.size if item.size >= 0 else None, creator=self)

    async def discard(self, rel: str, saved: Mapping[str, Any] | None) -> None:
        """Terminate the saved upload of ``rel`` (DELETE; an upload already gone is fine).

        :raises TransferError: the server refused the termination.
        """
        location = saved.get("location") if saved else None
        if isinstance(location, str) and location:
            await self._http.request("DELETE", location, ok=(204, 200), passthrough=(404, 410))

    @property
    def with_upload(self) -> bool:
        return "creation-with-upload" in self.extensions

    def _create_headers(self, item: Item) -> dict[str, str]:
        headers = {
            "Upload-Metadata": f"filename {_b64(item.rel.rsplit('/', 1)[-1])},relpath {_b64(item.rel)}"
        }
        if item.size >= 0:
            headers["Upload-Length"] = str(item.size)
        elif "creation-defer-length" in self.extensions:
            headers["Upload-Defer-Length"] = "1"
        else:
            raise UsageError(
                f"{self._describe} cannot take uploads of unknown length (no creation-defer-length)"
            )
        return headers

    async def _post(self, item: Item, extra: Mapping[str, str] | None, body: Any) -> str:
        location, _ = await self._post_with(item, extra, body)
        return location

    async def _post_with(self, item: Item, extra: Mapping[str, str] | None, body: Any) -> tuple[str, Headers]:
        """POST the creation request (with ``body`` when creation-with-upload); returns (location, headers)."""
        headers = {**self._create_headers(item), **(extra or {})}
        if "Upload-Length" in headers:  # a deferred upload whose first chunk is also its last
            headers.pop("Upload-Defer-Length", None)
        data = ViewPayload(body) if body is not None else None
        _, resp = await self._http.request("POST", self.endpoint, headers=headers, data=data,
                                           nbytes=len(body) if body is not None else 0, ok=(201,),
                                           upload=False)
        location = resp.get("Location")
        if not location:
            raise TransientError(f"tus POST {urlsplit(self.endpoint).path}: no Location in the answer")
        return urljoin(self.endpoint, location), resp
