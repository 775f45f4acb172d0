"""The S3 item writer: one PutObject for a file that fits in one chunk, else a multipart upload.

Contracts (see :class:`asyncdepo.contract.ChunkWriter`; the headers are :mod:`asyncdepo.adapters.s3.checksums`):

* ``write(chunk)`` takes the whole file (``offset == 0`` and ``last``): PutObject with the chunk's checksum
  (and Content-MD5 with ``--s3-md5``). A checksum S3 reports that differs from ours, or a plain-md5 ETag
  other than the md5 we sent, is an IntegrityError.
* ``write_part_stream(part, source)`` (the engine's streamed parts) and ``write_part(chunk)`` (buffered parts,
  with ``--compress``) may run concurrently for parts of the same item. The multipart upload is created by
  the first part that needs it, under a lock, so concurrent parts share one UploadId; it names the
  checksum algorithm and the FULL_OBJECT type. Each UploadPart carries its part's checksum; the value S3
  reports must equal it, and so must a plain-md5 ETag when Content-MD5 was sent (servers that skip the
  check, like moto, are still caught).
* ``state()`` = ``{"key", "upload_id", "part_size", "parts": {n: [size, etag, md5, {algo: hex}]}}`` — never a
  secret. The per-part checksums are what a resume checks.
* ``restore(saved)`` (from ``open_item``) asks ListParts (1,000 a page) and keeps a part only when S3 still
  holds it with the journaled size and ETag, and with the journaled checksum when ListParts reports one,
  and the journal has a digest of it (a checksum, or an md5): the engine then compares those digests with
  the ones it computes from the file, and sends the part again when they differ. A vanished upload
  (NoSuchUpload) or a changed part size starts over.
* ``complete(digests, size)`` lists the parts in order with their checksums, checks they are 1..N and add
  up to ``size``, and sends the full-object checksum composed from the parts' (CRC combine; it must equal
  the engine's whole-file value). S3 checks it and reports its own: when the Complete answer carries none,
  HeadObject with ``ChecksumMode=ENABLED`` asks for it (moto computes it there from the bytes it holds).
  A reported value other than ours is an IntegrityError, and the upload is aborted so the engine's retry
  of the item sends every part again from a fresh read. With md5s of every part, the final ETag must also
  be ``md5(concat part md5s)-N``. A lost Complete response is recovered: on NoSuchUpload the object is
  looked at with HEAD and accepted when its checksum (or ETag) is the expected one.
* ``abort()`` AbortMultipartUpload; never raises.

Orphans: an UploadId reaches the journal only with the item's state after its first part, so a run killed
in between, or a CreateMultipartUpload whose answer was lost and which is then sent again, leaves an upload
nobody knows of (and that S3 bills for until a lifecycle rule removes it). So before it creates an upload,
a writer that may have such predecessors (``sweep``: the journal held state for the item, i.e. an earlier
attempt started it, or a create of this writer failed) lists the key's multipart uploads and aborts them.
The journaled upload, when S3 still holds it, is reused instead and no listing is made; a fresh item makes
no listing either, so a first push costs no extra request. Another client's unfinished upload of the same
key is aborted too: two writers of one key cannot both win anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import anyio

from asyncdepo import errors
from asyncdepo.adapters.s3 import checksums
from asyncdepo.adapters.s3.etags import etag_md5, multipart_etag
from asyncdepo.contract import ByteSource, Chunk, ChunkWriter, Item, Part, PartInfo
from asyncdepo.digests import combine, digest_bytes
from asyncdepo.transport.s3errors import s3_code

log = logging.getLogger(__name__)


def _body(chunk: Chunk) -> memoryview:
    """The chunk as a flat byte view: aiohttp sends it without a copy (see the module docs of s3)."""
    data = chunk.data
    if data.format != "B" or data.ndim != 1:
        data = data.cast("B")
    return data


class S3Calls(Protocol):
    """What the writer needs of the adapter: one S3 call, one body upload, the integrity options, names."""

    list_page_size: int
    checksum: str | None
    md5: bool

    async def call(self, op: str, what: str, nbytes: int = 0, **params: Any) -> dict[str, Any]: ...

    async def put_data(self, key: str, body: memoryview | ByteSource, size: int, digests: Mapping[str, str],
                       what: str, upload: tuple[str, int] | None = None) -> tuple[str, dict[str, str]]: ...

    def where(self, key: str) -> str: ...


class S3Writer(ChunkWriter):
    """Sends one item to ``s3://bucket/key``. Created by :meth:`S3Adapter.open_item`."""

    def __init__(self, adapter: S3Calls, item: Item, key: str) -> None:
        super().__init__()
        self.adapter = adapter
        self.item = item
        self.key = key
        self.algo = adapter.checksum
        self.upload_id: str | None = None
        # the size of every part but the last, learned from the parts (the engine may grow it past
        # --chunk-size for a file that would need more than 10,000 parts) or from the journal
        self.part_size: int | None = None
        self._restored = False
        self._create_lock = anyio.Lock()
        self._part_upload: dict[int, str] = {}  # part number -> the UploadId it was confirmed under
        self._lost = False  # the upload vanished with confirmed parts: only a restart of the item helps
        self._single: PartInfo | None = None
        #: before creating an upload, abort the key's uploads the journal does not know (see module docs)
        self.sweep = False

    @property
    def where(self) -> str:
        return self.adapter.where(self.key)

    def _wanted(self, digests: Mapping[str, str], data: memoryview | None = None) -> dict[str, str]:
        """The digests to send with a body (the checksum, md5 with ``--s3-md5``), from the engine's; one it
        did not compute is computed here from ``data`` when given (an empty file), else left empty."""
        want = {a: digests.get(a, "") for a in (self.algo, "md5" if self.adapter.md5 else None) if a}
        missing = tuple(a for a, v in want.items() if not v)
        if missing and data is not None:
            want.update(digest_bytes(data, missing))
        return want

    def state(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "upload_id": self.upload_id,
            "part_size": self.part_size,
            "parts": {str(n): [p.size, p.etag, p.md5, dict(p.digests)] for n, p in sorted(self.parts.items())},
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
        journal: dict[int, PartInfo] = {}
        for number, rec in (saved.get("parts") or {}).items():
            size, etag, md5, *rest = rec
            journal[int(number)] = PartInfo(int(number), int(size), str(etag), str(md5),
                                            dict(rest[0]) if rest else {})
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
        for number, (size, etag, listed) in held.items():
            mine = journal.get(number)
            if mine is None or mine.size != size or etag.strip('"') != mine.etag:
                continue  # not ours, or another copy of it: the engine sends this part again
            if not (mine.md5 or mine.digests.get(self.algo or "")):
                continue  # nothing of ours to check it with
            if self.algo and listed.get(self.algo) and listed[self.algo] != mine.digests.get(self.algo):
                continue  # S3 holds other bytes than the journal says were sent
            if size != min(part_size, self.item.size - (number - 1) * part_size):
                continue  # the file changed size since: this part does not fit it
            self.parts[number] = mine
            self._part_upload[number] = self.upload_id
        self._restored = bool(self.parts)

    async def _list_parts(self, upload_id: str) -> dict[int, tuple[int, str, dict[str, str]]]:
        """Part number -> (size, ETag, {algo: hex} of the checksums ListParts reports)."""
        held: dict[int, tuple[int, str, dict[str, str]]] = {}
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
                listed = {a: v for a in checksums.ALGORITHMS if (v := checksums.from_response(part, a))}
                held[int(part["PartNumber"])] = (int(part["Size"]), str(part["ETag"]), listed)
            nxt = int(page.get("NextPartNumberMarker") or 0)
            if not page.get("IsTruncated") or nxt <= marker:
                return held
            marker = nxt

    # -- checks -------------------------------------------------------------------------------------
    def _verify(self, what: str, sent: Mapping[str, str], etag: str, reported: Mapping[str, str]) -> None:
        """Compare what S3 reported for a body with what we sent.

        :raises IntegrityError: a reported checksum, or a plain-md5 ETag when md5 was sent, differs.
        """
        for algo, value in reported.items():
            if algo in sent and value != sent[algo]:
                raise errors.IntegrityError(f"{what}: S3 reports {algo} {value}, we sent {sent[algo]}")
        got = etag_md5(etag)
        if sent.get("md5") and got is not None and got != sent["md5"]:
            raise errors.IntegrityError(f"{what}: S3 reports ETag {etag}, we sent md5 {sent['md5']}")

    # -- single object ------------------------------------------------------------------------------
    async def write(self, chunk: Chunk) -> None:
        """The whole file in one PutObject (the engine uses this for files that fit in one chunk).

        :raises PermanentError: a chunk that is not the whole file (S3 cannot append).
        :raises IntegrityError: S3 reports another checksum, or an ETag other than the md5 we sent.
        """
        if chunk.offset != 0 or not chunk.last:
            raise errors.PermanentError(
                f"PutObject {self.where}: S3 cannot append at offset {chunk.offset}; send parts instead"
            )
        body = _body(chunk)
        sent = self._wanted(chunk.digests, body)
        what = f"PutObject {self.where}"
        etag, reported = await self.adapter.put_data(self.key, body, len(body), sent, what)
        self._verify(what, sent, etag, reported)
        self._single = PartInfo(0, len(body), etag.strip('"'), sent.get("md5", ""), sent)
        self.confirmed = len(body)

    async def write_stream(self, source: ByteSource) -> None:
        raise errors.PermanentError(f"{self.where}: the S3 adapter takes chunks or parts, not a stream")

    # -- multipart ----------------------------------------------------------------------------------
    async def _ensure_upload(self) -> str:
        """The UploadId, created (under a lock) by the first part that needs it; see "Orphans" in the
        module docstring for the sweep that may come first.

        :raises DepoError: ListMultipartUploads or CreateMultipartUpload failed.
        """
        if self.upload_id is not None:
            return self.upload_id
        async with self._create_lock:
            if self.upload_id is not None:
                return self.upload_id  # another part created it while this one waited for the lock
            if self.sweep:
                await self._abort_unknown()
                self.sweep = False
            extra: dict[str, Any] = {}
            if self.algo:
                extra = {"ChecksumAlgorithm": self.algo.upper(), "ChecksumType": "FULL_OBJECT"}
            try:
                response = await self.adapter.call(
                    "create_multipart_upload", f"CreateMultipartUpload {self.where}", Key=self.key, **extra
                )
            except BaseException:
                self.sweep = True  # the request may have created an upload whose answer we never got
                raise
            self.upload_id = str(response["UploadId"])
            return self.upload_id

    async def _abort_unknown(self) -> None:
        """Abort every multipart upload S3 holds for this key (ListMultipartUploads, 1,000 a page): called
        before a new one is created, when uploads the journal never learned of may exist.

        :raises DepoError: ListMultipartUploads failed.
        """
        params: dict[str, Any] = {"Prefix": self.key, "MaxUploads": self.adapter.list_page_size}
        found: list[str] = []
        while True:
            page = await self.adapter.call("list_multipart_uploads", f"ListMultipartUploads {self.where}",
                                           **params)
            # Prefix also matches longer keys: only this key's uploads are ours to abort
            found += [str(u["UploadId"]) for u in page.get("Uploads", ()) if u.get("Key") == self.key]
            key, upload = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")
            if not page.get("IsTruncated") or not key or (key, upload) == (params.get("KeyMarker"),
                                                                           params.get("UploadIdMarker")):
                break
            params.update(KeyMarker=key, UploadIdMarker=upload or "")
        for upload_id in found:
            log.info("%s: aborting a multipart upload the journal does not know (%s)", self.where, upload_id)
            await self._abort_id(upload_id)

    async def write_part(self, chunk: Chunk) -> PartInfo:
        """UploadPart ``chunk.part_number`` from a buffer (the engine's buffered multipart: ``--compress``).

        :raises IntegrityError: S3 reports another checksum, or a plain-md5 ETag other than ours.
        :raises TransientError: BadDigest (the part was damaged on the way), 5xx, throttling, network.
        """
        body = _body(chunk)
        part = Part(chunk.part_number, chunk.offset, len(body), self._wanted(chunk.digests, body), chunk.last)
        return await self._send_part(part, body)

    async def write_part_stream(self, part: Part, source: ByteSource) -> PartInfo:
        """UploadPart ``part.number`` streamed from ``source``, with the checksum the engine computed.

        :raises IntegrityError: S3 reports another checksum, or a plain-md5 ETag other than ours.
        :raises TransientError: BadDigest, 5xx, throttling, network; the engine retries with a new source.
        """
        return await self._send_part(part, source)

    async def _send_part(self, part: Part, body: memoryview | ByteSource) -> PartInfo:
        number = part.number
        if not 1 <= number <= 10_000:
            raise errors.PermanentError(f"UploadPart {self.where}: part number {number} is outside 1..10000")
        what = f"UploadPart {self.where} part {number}"
        await self._check_geometry(part, what)
        sent = self._wanted(part.digests)
        missing = [a for a, v in sent.items() if not v]
        if missing:  # the engine computes Features.chunk_digests for every part: a broken contract
            raise errors.PermanentError(f"{what}: the part's {', '.join(missing)} was not computed")
        used: list[str] = []  # the upload each attempt went into

        async def put() -> Any:
            self._check_not_lost(what)
            used.append(await self._ensure_upload())
            return await self.adapter.put_data(self.key, body, part.size, sent, what, (used[-1], number))

        try:
            etag, reported = await put()
        except errors.TransientError as exc:
            if s3_code(exc) != "NoSuchUpload" or not used or not isinstance(body, memoryview):
                raise  # a stream is spent: the engine retries with a new one (and a new upload)
            # not a retry (that is the pacer's): the upload vanished; the part goes once into a new one when
            # no confirmed part was lost with it (else _vanished raises and the item starts over)
            await self._vanished(used[-1], what)
            etag, reported = await put()
        upload_id = used[-1]
        self._verify(what, sent, etag, reported)
        info = PartInfo(number=number, size=part.size, etag=etag.strip('"'), md5=sent.get("md5", ""),
                        digests={a: v for a, v in sent.items() if a != "md5"})
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

    async def _check_geometry(self, part: Part, what: str) -> None:
        """Learn the part size from the parts; if it differs from the journaled parts', start over.

        :raises TransientError: the part size changed since the journaled upload, which is now aborted
            (the engine reopens the item; ListParts then finds no upload and every part is sent again).
        """
        number = part.number
        if number > 1 and part.offset % (number - 1) == 0:
            implied: int | None = part.offset // (number - 1)
        else:
            implied = None if part.last else part.size
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
        """Finish the item and verify it against what was hashed while reading (see the module docs).

        With ``--compress`` the engine passes the file's size and digests and adds ``stream_size``, the
        length of what was sent: the object is then checked against the sent bytes (the parts' checksums
        and sizes), not against the file's digests.

        :raises IntegrityError: sizes, checksums or ETags differ, or parts are missing.
        :raises DepoError: CompleteMultipartUpload failed.
        """
        if "stream_size" in digests:
            size = int(digests["stream_size"])
            digests = {}
        if self.upload_id is None and not self.parts:
            return await self._complete_single(digests, size)
        what = f"CompleteMultipartUpload {self.where}"
        self._check_not_lost(what)
        upload_id = await self._ensure_upload()
        numbers = sorted(self.parts)
        stale = [n for n in numbers if self._part_upload.get(n, upload_id) != upload_id]
        if stale:
            self._lost = True
            raise errors.IntegrityError(f"{what}: parts {stale[:10]} belong to a vanished upload")
        if numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, (numbers[-1] if numbers else 0) + 1)) - set(numbers))
            raise errors.IntegrityError(f"{what}: parts {missing[:10]} missing")
        parts = [self.parts[n] for n in numbers]
        total = sum(p.size for p in parts)
        if total != size:
            raise errors.IntegrityError(f"{what}: parts hold {total} bytes, the file has {size}")
        full = self._full_checksum(parts, digests, what)
        md5s = [p.md5 for p in parts]
        expected_etag = multipart_etag(md5s) if all(md5s) else None
        listing = []
        for p in parts:
            entry: dict[str, Any] = {"PartNumber": p.number, "ETag": f'"{p.etag}"'}
            if self.algo and p.digests.get(self.algo):
                entry.update(checksums.request_params({self.algo: p.digests[self.algo]}))
                entry.pop("ChecksumAlgorithm", None)
            listing.append(entry)
        extra: dict[str, Any] = {}
        if self.algo and full:
            extra = {checksums.param(self.algo): checksums.request_params({self.algo: full})[
                checksums.param(self.algo)], "ChecksumType": "FULL_OBJECT"}
        try:
            response = await self.adapter.call(
                "complete_multipart_upload", what, Key=self.key, UploadId=upload_id,
                MultipartUpload={"Parts": listing}, **extra,
            )
            etag = str(response.get("ETag", "")).strip('"')
            reported = checksums.from_response(response, self.algo)
        except errors.TransientError as exc:
            if s3_code(exc) != "NoSuchUpload":
                raise
            # the upload may have completed and only our answer been lost: look at the object
            head = await self._head()
            etag, reported = head if head is not None else ("", None)
            if not ((full and reported == full) or (expected_etag and etag == expected_etag)):
                self._forget()
                raise
        if reported is None and full:
            head = await self._head()  # the Complete answer carried no checksum: ask for the stored one
            reported = head[1] if head is not None else None
        if full and reported is not None and reported != full:
            await self.abort()  # which part is damaged is unknown: the item's retry sends every part
            raise errors.IntegrityError(
                f"{what}: S3 reports {self.algo} {reported} for the object, the parts we hashed give {full}"
            )
        if expected_etag and etag != expected_etag:
            await self.abort()
            raise errors.IntegrityError(f"{what}: S3 reports ETag {etag}, the parts we hashed give {expected_etag}")
        self.upload_id = None
        self.confirmed = size
        return {"key": self.key, "etag": etag, "size": size,
                **({self.algo: full} if self.algo and full else {}),
                **({"md5": digests["md5"]} if digests.get("md5") else {})}

    def _full_checksum(self, parts: list[PartInfo], digests: Mapping[str, str], what: str) -> str | None:
        """The object's checksum composed from the parts' (None without an algorithm or a part's value).

        :raises IntegrityError: it differs from the engine's whole-file value (the parts are not this
            file's content, e.g. journaled parts of a file that changed since).
        """
        if not self.algo or not all(p.digests.get(self.algo) for p in parts):
            return None
        full = parts[0].digests[self.algo]
        for p in parts[1:]:
            full = combine(self.algo, full, p.digests[self.algo], p.size)
        if digests.get(self.algo) and digests[self.algo] != full:
            raise errors.IntegrityError(
                f"{what}: the parts' {self.algo} give {full}, the file's is {digests[self.algo]}"
            )
        return full

    def _forget(self) -> None:
        self.upload_id = None
        self.parts.clear()
        self._part_upload.clear()

    async def _complete_single(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        what = f"PutObject {self.where}"
        if self._single is None:
            if size != 0:
                raise errors.IntegrityError(f"{what}: complete() before any byte was sent")
            # an empty file: the engine may have nothing to write
            await self.write(Chunk(offset=0, data=memoryview(b""), digests={}, last=True))
        assert self._single is not None
        if self._single.size != size:
            raise errors.IntegrityError(f"{what}: sent {self._single.size} bytes, file has {size}")
        for algo, value in self._single.digests.items():
            if digests.get(algo) and digests[algo] != value:
                raise errors.IntegrityError(f"{what}: sent {algo} {value}, the file's is {digests[algo]}")
        etag = self._single.etag
        md5 = digests.get("md5")
        if md5 and etag_md5(etag) is not None and etag_md5(etag) != md5.lower():
            raise errors.IntegrityError(f"{what}: S3 reports ETag {etag}, md5 is {md5}")
        return {"key": self.key, "etag": etag, "size": size,
                **{a: v for a, v in self._single.digests.items() if a != "md5"},
                **({"md5": md5} if md5 else {})}

    async def _head(self) -> tuple[str, str | None] | None:
        """(ETag, the stored checksum of our algorithm or None) of the object, or None when HEAD failed."""
        params: dict[str, Any] = {"Key": self.key}
        if self.algo:
            params["ChecksumMode"] = "ENABLED"
        try:
            head = await self.adapter.call("head_object", f"HeadObject {self.where}", **params)
        except errors.DepoError:
            return None
        return str(head.get("ETag", "")).strip('"'), checksums.from_response(head, self.algo)

    # -- abort --------------------------------------------------------------------------------------
    async def abort(self) -> None:
        """AbortMultipartUpload (shielded from cancellation); logs and swallows failures."""
        upload_id = self.upload_id
        self._forget()
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
