"""The S3 item writer: one PutObject for a file that fits in one chunk, else a multipart upload.

Contracts (see :class:`asyncdepo.contract.ChunkWriter`):

* ``write(chunk)`` takes the whole file (``offset == 0`` and ``last``): PutObject with Content-MD5, and the
  returned ETag must equal the chunk's md5.
* ``write_part(chunk)`` may run concurrently for parts of the same item. The multipart upload is created
  by the first part that needs it, under a lock, so concurrent parts share one UploadId. Each UploadPart
  carries Content-MD5; a returned plain-md5 ETag must equal the part's md5 (servers that skip the
  Content-MD5 check, like moto, are still caught).
* ``state()`` = ``{"key", "upload_id", "part_size", "parts": {n: [size, etag, md5]}}`` — never a secret.
* ``restore(saved)`` (from ``open_item``) asks ListParts (1,000 a page) and keeps a part only when S3 still
  holds it with the journaled ETag and size: a part S3 holds but the journal lacks has no md5 of ours to
  verify the final ETag with, so it is sent again (UploadPart of the same number replaces it). A vanished
  upload (NoSuchUpload) or a changed part size starts over.
* ``complete(digests, size)`` lists the parts in order, checks they are 1..N and add up to ``size``, and
  compares the final ETag with ``md5(concat part md5s)-N``. A lost Complete response is recovered: on
  NoSuchUpload the object's ETag is read with HEAD and accepted when it is the expected one.
* ``abort()`` AbortMultipartUpload; never raises.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import anyio

from asyncdepo import errors
from asyncdepo.adapters.s3.etags import etag_md5, multipart_etag
from asyncdepo.contract import ByteSource, Chunk, ChunkWriter, Item, PartInfo
from asyncdepo.transport.s3errors import s3_code

log = logging.getLogger(__name__)


def _content_md5(chunk: Chunk) -> tuple[str, str]:
    """(hex md5, base64 Content-MD5) of a chunk, from the engine's digest or computed here as a fallback."""
    hexmd5 = chunk.digests.get("md5")
    if not hexmd5:
        hexmd5 = hashlib.md5(chunk.data).hexdigest()
    return hexmd5, base64.b64encode(bytes.fromhex(hexmd5)).decode("ascii")


def _body(chunk: Chunk) -> memoryview:
    """The chunk as a flat byte view: aiohttp sends it without a copy (see the module docs of s3)."""
    data = chunk.data
    if data.format != "B" or data.ndim != 1:
        data = data.cast("B")
    return data


class S3Calls(Protocol):
    """What the writer needs of the adapter: one S3 call, one body upload, names for messages."""

    list_page_size: int

    def where(self, key: str) -> str: ...

    async def call(self, op: str, what: str, nbytes: int = 0, **params: Any) -> dict[str, Any]: ...

    async def put_data(self, key: str, body: memoryview, content_md5: str, what: str,
                       upload: tuple[str, int] | None = None) -> str: ...


class S3Writer(ChunkWriter):
    """Sends one item to ``s3://bucket/key``. Created by :meth:`S3Adapter.open_item`."""

    def __init__(self, adapter: S3Calls, item: Item, key: str) -> None:
        super().__init__()
        self.adapter = adapter
        self.item = item
        self.key = key
        self.upload_id: str | None = None
        # the size of every part but the last, learned from the chunks (the engine may grow it past
        # --chunk-size for a file that would need more than 10,000 parts) or from the journal
        self.part_size: int | None = None
        self._restored = False
        self._create_lock = anyio.Lock()
        self._part_upload: dict[int, str] = {}  # part number -> the UploadId it was confirmed under
        self._lost = False  # the upload vanished with confirmed parts: only a restart of the item helps
        self._single_etag: str | None = None
        self._single_size = 0

    @property
    def where(self) -> str:
        return self.adapter.where(self.key)

    def state(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "upload_id": self.upload_id,
            "part_size": self.part_size,
            "parts": {str(n): [p.size, p.etag, p.md5] for n, p in sorted(self.parts.items())},
        }

    # -- resume -------------------------------------------------------------------------------------
    async def restore(self, saved: Mapping[str, Any]) -> None:
        """Take back a journaled multipart upload; keep the parts S3 confirms (see module docs).

        :raises DepoError: ListParts failed (other than NoSuchUpload, which starts over).
        """
        upload_id = saved.get("upload_id")
        if not upload_id or saved.get("key", self.key) != self.key:
            return
        part_size = int(saved.get("part_size") or 0)
        if self.item.size < 0:
            # a compressed stream (length unknown): a re-read is not guaranteed to compress to the same
            # bytes, so parts of an earlier run cannot be mixed with new ones — start over
            await self._abort_id(str(upload_id))
            return
        journal: dict[int, tuple[int, str, str]] = {}
        for number, rec in (saved.get("parts") or {}).items():
            size, etag, md5 = rec
            journal[int(number)] = (int(size), str(etag), str(md5))
        try:
            held = await self._list_parts(str(upload_id))
        except errors.TransientError as exc:
            if s3_code(exc) != "NoSuchUpload":
                raise
            log.info("%s: the multipart upload is gone; starting over", self.where)
            return
        self.upload_id = str(upload_id)
        if part_size <= 0:
            return  # no part was confirmed: nothing to keep, the upload itself is reused
        self.part_size = part_size
        for number, (size, etag) in held.items():
            mine = journal.get(number)
            if mine is None or mine[0] != size or etag.strip('"') != mine[1] or not mine[2]:
                continue  # not verifiable: the engine sends this part again
            if size != min(part_size, self.item.size - (number - 1) * part_size):
                continue  # the file changed size since: this part does not fit it
            self.parts[number] = PartInfo(number=number, size=size, etag=mine[1], md5=mine[2])
            self._part_upload[number] = self.upload_id
        self._restored = bool(self.parts)

    async def _list_parts(self, upload_id: str) -> dict[int, tuple[int, str]]:
        held: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            params: dict[str, Any] = {
                "Key": self.key,
                "UploadId": upload_id,
                "MaxParts": self.adapter.list_page_size,
            }
            if marker:
                params["PartNumberMarker"] = marker
            page = await self.adapter.call("list_parts", f"ListParts {self.where}", **params)
            for part in page.get("Parts", ()):
                held[int(part["PartNumber"])] = (int(part["Size"]), str(part["ETag"]))
            nxt = int(page.get("NextPartNumberMarker") or 0)
            if not page.get("IsTruncated") or nxt <= marker:
                return held
            marker = nxt

    # -- single object ------------------------------------------------------------------------------
    async def write(self, chunk: Chunk) -> None:
        """The whole file in one PutObject (the engine uses this for files that fit in one chunk).

        :raises PermanentError: a chunk that is not the whole file (S3 cannot append).
        :raises IntegrityError: the ETag S3 returned is not the chunk's md5.
        """
        if chunk.offset != 0 or not chunk.last:
            raise errors.PermanentError(
                f"PutObject {self.where}: S3 cannot append at offset {chunk.offset}; send parts instead"
            )
        hexmd5, b64 = _content_md5(chunk)
        body = _body(chunk)
        etag = await self.adapter.put_data(self.key, body, b64, f"PutObject {self.where}")
        if etag_md5(etag) is not None and etag_md5(etag) != hexmd5:
            raise errors.IntegrityError(
                f"PutObject {self.where}: S3 reports ETag {etag}, we sent md5 {hexmd5}"
            )
        self._single_etag = etag.strip('"')
        self._single_size = len(body)
        self.confirmed = len(body)

    async def write_stream(self, source: ByteSource) -> None:
        raise errors.PermanentError(f"{self.where}: the S3 adapter takes chunks or parts, not a stream")

    # -- multipart ----------------------------------------------------------------------------------
    async def _ensure_upload(self) -> str:
        if self.upload_id is not None:
            return self.upload_id
        async with self._create_lock:
            if self.upload_id is None:
                response = await self.adapter.call(
                    "create_multipart_upload", f"CreateMultipartUpload {self.where}", Key=self.key
                )
                self.upload_id = str(response["UploadId"])
        return self.upload_id

    async def write_part(self, chunk: Chunk) -> PartInfo:
        """UploadPart ``chunk.part_number`` with Content-MD5; may run concurrently with other parts.

        :raises IntegrityError: the part ETag is a plain md5 other than ours.
        :raises TransientError: BadDigest (the part was damaged on the way), 5xx, throttling, network.
        """
        number = chunk.part_number
        if not 1 <= number <= 10_000:
            raise errors.PermanentError(f"UploadPart {self.where}: part number {number} is outside 1..10000")
        body = _body(chunk)
        what = f"UploadPart {self.where} part {number}"
        await self._check_geometry(chunk, len(body), what)
        hexmd5, b64 = _content_md5(chunk)
        for attempt in (1, 2):
            self._check_not_lost(what)
            upload_id = await self._ensure_upload()
            try:
                etag = await self.adapter.put_data(self.key, body, b64, what, (upload_id, number))
                break
            except errors.TransientError as exc:
                if s3_code(exc) != "NoSuchUpload" or attempt == 2:
                    raise
                await self._vanished(upload_id, what)  # a new upload if no part is lost; else raises
        got = etag_md5(etag)
        if got is not None and got != hexmd5:
            raise errors.IntegrityError(f"{what}: S3 reports ETag {etag}, we sent md5 {hexmd5}")
        info = PartInfo(number=number, size=len(body), etag=etag.strip('"'), md5=hexmd5)
        self.parts[number] = info
        self._part_upload[number] = upload_id
        return info

    def _check_not_lost(self, what: str) -> None:
        if self._lost:
            raise errors.TransientError(
                f"{what}: the multipart upload vanished with confirmed parts; the item starts over"
            )

    async def _vanished(self, upload_id: str, what: str) -> None:
        """S3 no longer knows ``upload_id`` (aborted by a lifecycle rule; some servers, e.g. rclone's, drop
        an upload after a BadDigest part). With no part confirmed under it, the next attempt creates a new
        upload; otherwise the confirmed parts are gone and the item must restart (engine: reopen).

        :raises TransientError: confirmed parts were lost with the upload.
        """
        async with self._create_lock:
            if self.upload_id != upload_id:
                return  # another part already replaced it
            if any(u == upload_id for u in self._part_upload.values()):
                self._lost = True
                self._check_not_lost(what)
            log.info(
                "%s: the multipart upload vanished before any part was confirmed; creating a new one",
                self.where,
            )
            self.upload_id = None

    async def _check_geometry(self, chunk: Chunk, length: int, what: str) -> None:
        """Learn the part size from the chunks; if it differs from the journaled parts', start over.

        :raises TransientError: the part size changed since the journaled upload, which is now aborted
            (the engine reopens the item; ListParts then finds no upload and every part is sent again).
        """
        number = chunk.part_number
        if number > 1 and chunk.offset % (number - 1) == 0:
            implied: int | None = chunk.offset // (number - 1)
        else:
            implied = None if chunk.last else length
        if implied is None:
            return
        if self.part_size is None:
            self.part_size = implied
        elif implied != self.part_size and self._restored:
            log.info("%s: the part size changed since the journaled upload; starting over", self.where)
            await self.abort()
            self._restored = False
            raise errors.TransientError(
                f"{what}: part size changed since the last run; the upload starts over"
            )

    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """Finish the item and verify it against what was hashed while reading.

        With ``--compress`` the engine passes the file's size and digests and adds ``stream_size``, the
        length of what was sent: the object is then checked against the sent bytes (part md5s, part
        sizes), not against the file's md5.

        :raises IntegrityError: sizes or ETags differ, or parts are missing.
        :raises DepoError: CompleteMultipartUpload failed.
        """
        if "stream_size" in digests:
            size = int(digests["stream_size"])
            digests = {k: v for k, v in digests.items() if k not in ("stream_size", "md5")}
        if self.upload_id is None and not self.parts:
            return await self._complete_single(digests, size)
        self._check_not_lost(f"CompleteMultipartUpload {self.where}")
        upload_id = await self._ensure_upload()
        numbers = sorted(self.parts)
        stale = [n for n in numbers if self._part_upload.get(n, upload_id) != upload_id]
        if stale:
            self._lost = True
            raise errors.IntegrityError(
                f"CompleteMultipartUpload {self.where}: parts {stale[:10]} belong to a vanished upload"
            )
        if numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, (numbers[-1] if numbers else 0) + 1)) - set(numbers))
            raise errors.IntegrityError(f"CompleteMultipartUpload {self.where}: parts {missing[:10]} missing")
        total = sum(self.parts[n].size for n in numbers)
        if total != size:
            raise errors.IntegrityError(
                f"CompleteMultipartUpload {self.where}: parts hold {total} bytes, the file has {size}"
            )
        expected = multipart_etag([self.parts[n].md5 for n in numbers])
        listing = [{"PartNumber": n, "ETag": f'"{self.parts[n].etag}"'} for n in numbers]
        what = f"CompleteMultipartUpload {self.where}"
        etag: str | None
        try:
            response = await self.adapter.call(
                "complete_multipart_upload",
                what,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listing},
            )
            etag = str(response.get("ETag", "")).strip('"')
        except errors.TransientError as exc:
            if s3_code(exc) != "NoSuchUpload":
                raise
            # the upload may have completed and only our answer been lost: look at the object
            etag = await self._head_etag()
            if etag != expected:
                self.upload_id = None
                self.parts.clear()
                self._part_upload.clear()
                raise
        if etag != expected:
            raise errors.IntegrityError(
                f"{what}: S3 reports ETag {etag}, the parts we hashed give {expected}"
            )
        self.upload_id = None
        self.confirmed = size
        return {"key": self.key, "etag": etag, "size": size, "md5": digests.get("md5", "")}

    async def _complete_single(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        if self._single_etag is None:
            if size != 0:
                raise errors.IntegrityError(f"PutObject {self.where}: complete() before any byte was sent")
            # an empty file: the engine may have nothing to write
            await self.write(Chunk(offset=0, data=memoryview(b""), digests={}, last=True))
        md5 = digests.get("md5")
        if self._single_size != size:
            raise errors.IntegrityError(
                f"PutObject {self.where}: sent {self._single_size} bytes, file has {size}"
            )
        if md5 and etag_md5(self._single_etag) is not None and etag_md5(self._single_etag) != md5.lower():
            raise errors.IntegrityError(
                f"PutObject {self.where}: S3 reports ETag {self._single_etag}, md5 is {md5}"
            )
        return {"key": self.key, "etag": self._single_etag, "size": size, "md5": md5 or ""}

    async def _head_etag(self) -> str | None:
        try:
            head = await self.adapter.call("head_object", f"HeadObject {self.where}", Key=self.key)
        except errors.DepoError:
            return None
        return str(head.get("ETag", "")).strip('"')

    # -- abort --------------------------------------------------------------------------------------
    async def abort(self) -> None:
        """AbortMultipartUpload (shielded from cancellation); logs and swallows failures."""
        upload_id, self.upload_id = self.upload_id, None
        self.parts.clear()
        self._part_upload.clear()
        if upload_id:
            await self._abort_id(upload_id)

    async def _abort_id(self, upload_id: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.adapter.call(
                    "abort_multipart_upload",
                    f"AbortMultipartUpload {self.where}",
                    Key=self.key,
                    UploadId=upload_id,
                )
            except errors.DepoError as exc:
                if s3_code(exc) != "NoSuchUpload":
                    log.warning("%s", exc)
