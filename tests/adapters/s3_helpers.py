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


class DamagingProxy:
    """A loopback TCP proxy in front of an HTTP server that flips one bit of request bodies on the way:
    byte ``at`` of every body longer than ``at``, for the first ``times`` such bodies (None: all of them).
    It models damage in transit, which only the server's check of the declared digest can catch. Runs its
    own event loop in a thread, so a synchronous test can drive the CLI through it.
    """

    def __init__(self, target: str, at: int = 100_000, times: int | None = None) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", int(parts.port or 80)
        self.at, self.times = at, times
        self.damaged = 0
        self.url = ""
        self._loop: Any = None
        self._thread: Any = None

    def __enter__(self) -> DamagingProxy:
        import asyncio
        import threading

        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()
            loop.run_forever()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop), return_exceptions=True))
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="damaging-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: Any, writer: Any) -> None:
        import asyncio

        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return

        async def down() -> None:
            while data := await up_r.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(down())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                up_w.write(head)
                flip = length > self.at and (self.times is None or self.damaged < self.times)
                if flip:
                    self.damaged += 1
                sent = 0
                while sent < length:
                    data = bytearray(await reader.read(min(1 << 16, length - sent)))
                    if not data:
                        raise ConnectionError("client went away")
                    if flip and sent <= self.at < sent + len(data):
                        data[self.at - sent] ^= 0x01
                    up_w.write(data)
                    await up_w.drain()
                    sent += len(data)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            up_w.close()
            await asyncio.gather(task, return_exceptions=True)
