"""One file's upload to gypsum's store: presign, then a streamed PUT with Content-MD5.

:class:`GypsumWriter` is what ``GypsumAdapter.open_item`` returns. ``write_stream`` makes one attempt
(the engine retries transient failures with a fresh source): it presigns when it has no URL or the URL is
older than ``PRESIGN_REUSE`` seconds, and forgets the URL when the store refuses it as expired or with a
bad signature, so the next attempt presigns again. ``complete`` compares the store's ETag (an md5 for a
single PUT) with the md5 computed while reading. A body the store refuses (BadDigest) is damage on the way,
sent again, unless the file itself no longer has the md5 the upload session was started with: then no
attempt in this upload can succeed, and the file fails at once (a new push starts a new upload). The body is the transport's
:class:`~asyncdepo.transport.httpbody.SourcePayload` (buffer lifetime, the source finished before its final
byte goes out, never replayed by aiohttp).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from asyncdepo.adapters.gypsum.api import GypsumClient, map_status
from asyncdepo.contract import ByteSource, ChunkWriter, Item
from asyncdepo.engine.api import hash_file
from asyncdepo.errors import IntegrityError, PermanentError, TransientError
from asyncdepo.transport.failures import boundary
from asyncdepo.transport.httpbody import SourcePayload, request_timeout
from asyncdepo.transport.s3errors import parse_s3_xml

PRESIGN_REUSE = 3000.0  # seconds a presigned URL is reused (the real server signs them for 3600 s)


class GypsumWriter(ChunkWriter):
    """One file's presign + PUT. Used by one item task; request-level retries call ``write_stream`` again."""

    def __init__(self, client: GypsumClient, item: Item, url_path: str, token: str, md5: str | None) -> None:
        super().__init__()
        self.client, self.item, self._url_path, self._token, self._md5 = client, item, url_path, token, md5
        self._put: tuple[str, str, float] | None = None
        self.etag: str | None = None

    async def _presigned(self) -> tuple[str, str]:
        if self._put is None or time.monotonic() - self._put[2] > PRESIGN_REUSE:
            url, b64 = await self.client.presign(self._url_path, self._token, self.item.rel)
            self._put = (url, b64, time.monotonic())
        return self._put[0], self._put[1]

    async def write_stream(self, source: ByteSource) -> None:
        """Presign (when needed) and PUT the whole file.

        :raises TransientError: connection failures, 5xx, an expired or refused signature (presigned anew
            on the next call).
        :raises IntegrityError: the store's md5 of the body differs from Content-MD5 (400 BadDigest).
        :raises PermanentError: that, and the file no longer has the md5 the upload was started with.
        """
        url, md5b64 = await self._presigned()
        what = f"gypsum PUT {self.item.rel}"
        size = self.item.size
        session = self.client.session
        assert session is not None
        headers = {"Content-MD5": md5b64, "Content-Length": str(size), "Content-Type": "application/octet-stream"}
        with boundary(what):
            async with session.put(url, data=SourcePayload(source, what=what), headers=headers,
                                   timeout=request_timeout(size)) as resp:
                body = await resp.read()
                if resp.status == 200:
                    self.etag = resp.headers.get("ETag", "").strip('"').lower() or None
                    self.confirmed = size
                    return
        code, message = parse_s3_xml(body)
        if resp.status in (400, 403) and ("expired" in message.lower() or code == "SignatureDoesNotMatch"):
            self._put = None  # the next attempt presigns again
            raise TransientError(f"{what}: the presigned URL was refused ({code or resp.status}: {message}); "
                                 "presigning again", status=resp.status)
        if code == "BadDigest":
            await self._changed(what)
            raise IntegrityError(f"{what}: the store's md5 of the body differs from {self._md5} (corrupted in "
                                 "transit; it is sent again)")
        raise map_status(resp.status, f"{code}: {message}" if code else message, what,
                         resp.headers.get("Retry-After"))

    async def _changed(self, what: str) -> None:
        """After a refused body: fail for good when the file no longer has the md5 the upload was started with.

        The upload session holds every file's md5 from its start and the store takes no other content for
        this file, so sending it again in this upload cannot succeed (it would be refused each time, until
        the item's attempts are spent); a new push starts a new upload with the new md5.

        :raises PermanentError: the file changed after it was hashed.
        """
        if not self._md5:
            return
        try:
            now = (await hash_file(self.item.path, ("md5",)))["md5"]
        except OSError:
            return  # unreadable now: the next attempt finds out and says so
        if now != self._md5.lower():
            raise PermanentError(f"{what}: the file changed after it was hashed; this gypsum upload holds the "
                                 "md5 given at its start and takes no other content: run the push again")

    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """:raises IntegrityError: the store's ETag (md5) differs from the md5 computed while reading."""
        md5 = digests.get("md5")
        if self.etag and md5 and self.etag != md5.lower():
            raise IntegrityError(f"gypsum PUT {self.item.rel}: the store reports md5 {self.etag}, "
                                 f"the file read has {md5}")
        return {"etag": self.etag}
