"""One file's upload to gypsum's store: presign, then a streamed PUT with Content-MD5.

:class:`GypsumWriter` is what ``GypsumAdapter.open_item`` returns. ``write_stream`` makes one attempt
(the engine retries transient failures with a fresh source): it presigns when it has no URL or the URL is
older than ``PRESIGN_REUSE`` seconds, and forgets the URL when the store refuses it as expired or with a
bad signature, so the next attempt presigns again. ``complete`` compares the store's ETag (an md5 for a
single PUT) with the md5 computed while reading.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from asyncdepo.adapters.gypsum.api import GypsumClient, map_status
from asyncdepo.contract import ByteSource, ChunkWriter, Item
from asyncdepo.errors import IntegrityError, SourceChangedError, TransientError
from asyncdepo.transport.failures import boundary
from asyncdepo.transport.httpbody import SourcePayload, request_timeout
from asyncdepo.transport.s3errors import parse_s3_xml

PRESIGN_REUSE = 3000.0  # seconds a presigned URL is reused (the real server signs them for 3600 s)


async def _next_block(it: Any) -> Any:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


class _OncePayload(SourcePayload):
    """The PUT body, a SourcePayload with three guarantees the plain one lacks:

    * the source is finished (digests filled, the file-changed check run) *before* its last bytes are
      written: once the server has every byte it answers, and aiohttp then cancels a body writer still
      running — the digests would be lost and the connection closed instead of reused. So the final byte
      is held back (copied) while the source is driven to its end;
    * the source is iterated through one ``__aiter__`` call (a ByteSource may refuse a second one);
    * it is marked consumed, so aiohttp does not replay it after a dropped connection (the engine retries
      with a fresh source instead).
    """

    async def write(self, writer: Any) -> None:
        self._consumed = True
        source = self._source
        it = source.__aiter__()
        remaining = source.size
        try:
            block = await _next_block(it)
            while block is not None:
                if remaining is not None and len(block) >= remaining:
                    # all but the final byte go now (the transport sends or copies them before write returns,
                    # so the block's buffer may be reused); the final byte is held back until the source ended
                    if len(block) > 1:
                        await writer.write(block[:-1])
                    tail = bytes(block[-1:])
                    if await _next_block(it) is not None:
                        raise SourceChangedError("the file grew while it was read; it will be re-sent")
                    await writer.write(tail)
                    return
                await writer.write(block)
                if remaining is not None:
                    remaining -= len(block)
                block = await _next_block(it)
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()


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
        """
        url, md5b64 = await self._presigned()
        what = f"gypsum PUT {self.item.rel}"
        size = self.item.size
        session = self.client.session
        assert session is not None
        headers = {"Content-MD5": md5b64, "Content-Length": str(size), "Content-Type": "application/octet-stream"}
        with boundary(what):
            async with session.put(url, data=_OncePayload(source), headers=headers,
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
            raise IntegrityError(f"{what}: the store's md5 of the body differs from {self._md5} (the file "
                                 "changed after it was hashed, or was corrupted in transit)")
        raise map_status(resp.status, f"{code}: {message}" if code else message, what,
                         resp.headers.get("Retry-After"))

    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """:raises IntegrityError: the store's ETag (md5) differs from the md5 computed while reading."""
        md5 = digests.get("md5")
        if self.etag and md5 and self.etag != md5.lower():
            raise IntegrityError(f"gypsum PUT {self.item.rel}: the store reports md5 {self.etag}, "
                                 f"the file read has {md5}")
        return {"etag": self.etag}
