"""Helpers shared by the S3 adapter tests (tests/adapters/test_s3_adapter.py) and the end-to-end S3
tests (tests/e2e/test_s3_push.py): deterministic payloads, parts hashed as the engine hands them over, and a
wrapper of the aiobotocore client that counts calls and injects failures. Not a test module."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import anyio

from asyncdepo.adapters.s3.writer import S3Writer
from asyncdepo.contract import Chunk, Item
from asyncdepo.digests import digest_bytes

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

MiB = 1 << 20
PART = 5 * MiB


def crc(data: bytes) -> str:
    """The hex CRC-64/NVME of ``data`` (the adapter's default checksum)."""
    return digest_bytes(data, ("crc64nvme",))["crc64nvme"]


class Cfg:
    """The engine options the adapter reads."""

    transfers = 4
    chunk_size = PART


def payload(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-enough bytes."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def chunk(data: bytes, offset: int, size: int, number: int, total: int, md5: str | None = None,
          crc: str | None = None) -> Chunk:
    """One part as the engine hands it over: read into a buffer and hashed (md5 and crc64nvme, as the
    adapter may ask for either; ``md5``/``crc`` replace them, e.g. with a wrong value)."""
    body = data[offset : offset + size]
    return Chunk(
        offset=offset,
        data=memoryview(body),
        digests={"md5": md5 or hashlib.md5(body).hexdigest(),
                 "crc64nvme": crc or digest_bytes(body, ("crc64nvme",))["crc64nvme"]},
        last=offset + size >= total,
        part_number=number,
        total=total,
    )


def parts_of(data: bytes, part: int = PART) -> list[Chunk]:
    n = max(1, -(-len(data) // part))
    return [chunk(data, i * part, part, i + 1, len(data)) for i in range(n)]


def item_for(rel: str, data: bytes) -> Item:
    return Item(path=f"/src/{rel}", rel=rel, size=len(data), mtime_ns=1)


async def send_parts(writer: S3Writer, chunks: list[Chunk]) -> None:
    """All parts at once, like the engine's workers."""
    async with anyio.create_task_group() as tg:
        for c in chunks:
            tg.start_soon(writer.write_part, c)


def read_back(server: S3TestServer, bucket: str, key: str) -> tuple[bytes, str]:
    obj = server.client().get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj["ETag"].strip('"')


def stored_etag(server: S3TestServer, data: bytes, multipart: str) -> str:
    """The ETag a GET reports for an object completed from parts: S3 and moto keep the multipart ETag;
    ``rclone serve s3 --etag-hash MD5`` reports the md5 of the stored file (only its Complete answer
    carries the multipart ETag, which is what the adapter checks)."""
    return hashlib.md5(data).hexdigest() if server.name == "rclone" else multipart


class CallCounter:
    """Wraps the aiobotocore client's methods to count calls and inject one failure."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.fail: dict[tuple[str, int], str] = {}  # (op, part number) -> "before" | "after"
        self.gate = 0  # a failing call first waits until this many calls of its kind succeeded
        self.succeeded: dict[str, int] = {}
        self.changed = anyio.Condition()

    def wrap(self, op: str) -> None:
        original = getattr(self.client, op)

        async def wrapper(**kw: Any) -> Any:
            self.calls.setdefault(op, []).append(kw)
            mode = self.fail.pop((op, int(kw.get("PartNumber", 0))), None)
            if mode is not None:
                async with self.changed:  # let the other parts be confirmed first (no cancellation)
                    while self.succeeded.get(op, 0) < self.gate:
                        await self.changed.wait()
            if mode == "before":
                raise ConnectionResetError("injected: connection reset before the part")
            result = await original(**kw)
            if mode == "after":
                raise ConnectionResetError("injected: the response was lost")
            async with self.changed:
                self.succeeded[op] = self.succeeded.get(op, 0) + 1
                self.changed.notify_all()
            return result

        setattr(self.client, op, wrapper)
