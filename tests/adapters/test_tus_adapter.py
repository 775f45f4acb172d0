"""The tus adapter's writer driven directly with Chunk objects against the tus simulator (real loopback)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from asyncdepo.adapters.tus import ChecksumMismatchError, TusAdapter
from asyncdepo.contract import Chunk, Item
from asyncdepo.digests import digest_bytes
from asyncdepo.errors import (
    IntegrityError,
    OffsetMismatchError,
    QuotaError,
    TransientError,
    is_transient,
)
from asyncdepo.sim import tus as tus_sim
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.server import SimServer
from tests.adapters.contract_suite import AdapterContract, Harness, tree_of
from tests.conftest import tus_args, upload_bytes

TOKEN = "s3cret-token-value"
CHUNK = 64 * 1024


class Sim:
    """A running tus simulator plus what its requests carried."""

    def __init__(self, server: SimServer, root: Path, auth: list[str | None]) -> None:
        self.server = server
        self.root = root
        self.auth = auth
        self.faults = server.faults

    @property
    def url(self) -> str:
        return f"tus+{self.server.url}/files/"


async def start_sim(root: Path, **kw: object) -> SimServer:
    return await SimServer(tus_sim.build_app(root, FaultInjector(), tus_args(**kw))).start()


@pytest.fixture(params=[True, False], ids=["checksum", "no-checksum"])
async def sim(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Sim]:
    ext = ",".join(e for e in tus_sim.ALL_EXTENSIONS if request.param or e != "checksum")
    app = tus_sim.build_app(tmp_path, FaultInjector(), tus_args(extensions=ext, max_size=1 << 30))
    auth: list[str | None] = []

    @web.middleware
    async def record(
        req: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth.append(req.headers.get("Authorization"))
        return await handler(req)

    app.middlewares.append(record)  # type: ignore[arg-type]
    async with SimServer(app) as server:
        yield Sim(server, tmp_path, auth)


def make_item(tmp_path: Path, rel: str, data: bytes) -> Item:
    return Item(path=str(tmp_path / "src" / rel), rel=rel, size=len(data), mtime_ns=1)


def chunks(data: bytes, size: int = CHUNK, total: int | None = None) -> list[Chunk]:
    """The engine's chunks: hashed by us to fill ``digests`` as the engine would."""
    out = []
    for off in range(0, len(data), size):
        piece = data[off : off + size]
        last = off + size >= len(data)
        digest = digest_bytes(piece, ("sha1", "crc32", "crc32c"))
        out.append(Chunk(off, memoryview(piece), digest, last=last, total=total if last else None))
    return out


def landed(sim: Sim, rel: str) -> bytes:
    return (sim.root / "complete" / rel).read_bytes()


async def test_full_upload(sim: Sim, tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 123)
    item = make_item(tmp_path, "dir/sub/file.bin", data)
    adapter = TusAdapter(sim.url, None, {"token": TOKEN})
    async with adapter:
        checksum = "checksum" in adapter.extensions
        # the cheapest algorithm the server lists (the simulator: sha1, md5, sha256, crc32 and, with the
        # crc32c package, crc32c)
        cheapest = "crc32c" if "crc32c" in tus_sim.CHECKSUM_ALGORITHMS else "crc32"
        assert adapter.features.chunk_digests == ((cheapest,) if checksum else ())
        assert adapter.features.chunked and adapter.features.resumable
        writer = await adapter.open_item(item, None)
        assert writer.confirmed == 0
        for c in chunks(data):
            await writer.write(c)
        result = await writer.complete({"md5": hashlib.md5(data).hexdigest()}, len(data))
        assert result["size"] == len(data)
        state = writer.state()
    assert landed(sim, "dir/sub/file.bin") == data
    assert upload_bytes(sim.faults) == len(data)
    assert set(sim.auth) == {f"Bearer {TOKEN}"}
    assert TOKEN not in repr(state) and TOKEN not in adapter.describe()
    assert adapter.describe() == f"tus+{sim.server.url}/files/"


async def test_resume_after_drop_sends_only_the_rest(sim: Sim, tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    item = make_item(tmp_path, "big.bin", data)
    parts = chunks(data)
    # the first chunk creates the upload (creation-with-upload POST); the first PATCH carries the second
    sim.faults.add(FaultRule("drop", method="PATCH", path="/files/*", after=CHUNK // 4))
    async with TusAdapter(sim.url, None) as adapter:
        checksum = bool(adapter.features.chunk_digests)
        writer = await adapter.open_item(item, None)
        await writer.write(parts[0])
        with pytest.raises(TransientError) as info:
            await writer.write(parts[1])
        assert "PATCH /files/" in str(info.value)
        saved = writer.state()
    # a new run: reopen from the journaled state; the server says what it holds
    async with TusAdapter(sim.url, None) as adapter:
        writer = await adapter.open_item(item, saved)
        # without a checksum the server keeps the bytes that arrived; with one it discards the unverifiable chunk
        kept = CHUNK if checksum else CHUNK + CHUNK // 4
        assert writer.confirmed == kept
        for c in parts[1:]:  # the engine restarts at the chunk holding the offset; the adapter sends the tail
            await writer.write(c)
        await writer.complete({}, len(data))
    assert landed(sim, "big.bin") == data
    # re-sent: only the discarded part of the dropped chunk (checksum), or nothing at all (bytes kept)
    assert upload_bytes(sim.faults) == len(data) + (CHUNK // 4 if checksum else 0)
    assert sim.faults.requests["POST /files/"] == 1  # the upload was resumed, not recreated


async def test_offset_mismatch_then_resync(sim: Sim, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    item = make_item(tmp_path, "m.bin", data)
    parts = chunks(data)
    async with TusAdapter(sim.url, None) as adapter:
        first = await adapter.open_item(item, None)
        await first.write(parts[0])
        other = await adapter.open_item(item, first.state())
        assert other.confirmed == CHUNK
        other.confirmed = 0  # as if it missed the first response: it believes the server holds nothing
        with pytest.raises(OffsetMismatchError) as info:
            await other.write(parts[0])
        assert is_transient(info.value) and info.value.status == 409
        assert await other.resync() == CHUNK
        await other.write(parts[0])  # already held: no request
        await other.write(parts[1])
        await other.write(parts[2])
        await other.complete({}, len(data))
    assert landed(sim, "m.bin") == data
    assert upload_bytes(sim.faults) == len(data)


async def test_checksum_mismatch_is_transient(sim: Sim, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    item = make_item(tmp_path, "c.bin", data)
    parts = chunks(data)
    async with TusAdapter(sim.url, None) as adapter:
        if not adapter.features.chunk_digests:
            pytest.skip("server without the checksum extension")
        writer = await adapter.open_item(item, None)
        bad = Chunk(0, parts[0].data, digest_bytes(b"not it", ("sha1", "crc32", "crc32c")), last=False)
        with pytest.raises(ChecksumMismatchError) as info:
            await writer.write(bad)
        assert is_transient(info.value)
        assert await writer.resync() == 0
        for c in parts:
            await writer.write(c)
        await writer.complete({}, len(data))
    assert landed(sim, "c.bin") == data


async def test_abort_terminates(sim: Sim, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    item = make_item(tmp_path, "gone.bin", data)
    async with TusAdapter(sim.url, None) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(chunks(data)[0])
        await writer.abort()
        await writer.abort()  # never raises, even when already terminated
        async with (
            aiohttp.ClientSession() as http,
            http.head(writer.location, headers={"Tus-Resumable": "1.0.0"}) as r,
        ):
            assert r.status == 410
        with pytest.raises(TransientError):
            await writer.resync()
        again = await adapter.open_item(item, writer.state())  # 410: a new upload from zero
        assert again.location != writer.location and again.confirmed == 0


async def test_deferred_length_chunks_and_stream(sim: Sim, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 7)
    item = Item(path=str(tmp_path / "x"), rel="stream.tar.zst", size=-1, mtime_ns=1)
    async with TusAdapter(sim.url, None) as adapter:
        writer = await adapter.open_item(item, None)
        assert writer.length is None
        for c in chunks(data, total=len(data)):
            await writer.write(c)
        await writer.complete({}, 10 * len(data))  # the inner (uncompressed) size is not what was sent
        assert landed(sim, "stream.tar.zst") == data

        class Source:
            def __init__(self) -> None:
                self.size: int | None = None
                self.digests: dict[str, str] = {}

            async def __aiter__(self) -> AsyncIterator[memoryview]:
                for off in range(0, len(data), 10_000):
                    yield memoryview(data[off : off + 10_000])

        item2 = Item(path=str(tmp_path / "y"), rel="whole.zst", size=-1, mtime_ns=1)
        writer = await adapter.open_item(item2, None)
        await writer.write_stream(Source())
        await writer.complete({}, 0)
    assert landed(sim, "whole.zst") == data


async def test_errors_mapped(tmp_path: Path) -> None:
    server = await start_sim(tmp_path, max_size=100)
    try:
        url = f"tus+{server.url}/files/"
        async with TusAdapter(url, None, {"token": TOKEN}) as adapter:
            assert adapter.max_size == 100
            with pytest.raises(QuotaError):
                await adapter.open_item(make_item(tmp_path, "huge", b"x" * 101), None)
            server.faults.add(FaultRule("status", method="POST", path="/files/", status=503))
            lazy = await adapter.open_item(make_item(tmp_path, "a", b"abc"), None)
            with pytest.raises(TransientError) as info:  # the upload is created by the first write
                await lazy.write(Chunk(0, memoryview(b"abc"), {"sha1": hashlib.sha1(b"abc").hexdigest()},
                                       last=True))
            assert info.value.status == 503 and TOKEN not in str(info.value)
            writer = await adapter.open_item(make_item(tmp_path, "a", b"abc"), None)
            await writer.write(
                Chunk(0, memoryview(b"ab"), {"sha1": hashlib.sha1(b"ab").hexdigest()}, last=False)
            )
            with pytest.raises(IntegrityError):
                await writer.complete({}, 3)  # the server holds 2 of 3 bytes
    finally:
        await server.stop()
    with pytest.raises(TransientError) as info:
        async with TusAdapter(url, None, {"token": TOKEN}):
            pass  # nobody listens any more
    assert "OPTIONS /files/" in str(info.value) and TOKEN not in str(info.value)


class TestContract(AdapterContract):
    """The shared contract suite (tests/adapters/contract_suite.py) over tus, faults aimed at the PATCHes."""

    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        store = tmp_path / "tus"
        async with SimServer(tus_sim.build_app(store, FaultInjector(), None)) as server:
            yield Harness(lambda cfg: TusAdapter(f"tus+{server.url}/files/", cfg),
                          lambda: tree_of(store / "complete"), faults=server.faults, data=("PATCH", "/files/*"))
