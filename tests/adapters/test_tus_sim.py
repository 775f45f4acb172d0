"""Fidelity of the tus 1.0.0 simulator (asyncdepo.sim.tus), over real loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from asyncdepo.sim import tus as tus_sim
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.server import SimServer
from tests.conftest import tus_args

V = {"Tus-Resumable": "1.0.0"}
OCTET = {**V, "Content-Type": "application/offset+octet-stream"}
PATCH_ROUTE = "PATCH /files/{upload_id}"


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = tus_sim.build_app(tmp_path, FaultInjector(), tus_args(max_size=1 << 20))
    async with SimServer(app) as server:
        yield server


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def create(http: aiohttp.ClientSession, sim: SimServer, length: int, rel: str = "a/b.bin") -> str:
    headers = {
        **V,
        "Upload-Length": str(length),
        "Upload-Metadata": f"relpath {b64(rel)},filename {b64('b.bin')}",
    }
    async with http.post(f"{sim.url}/files/", headers=headers) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Tus-Resumable"] == "1.0.0"
        return r.headers["Location"]


async def head(http: aiohttp.ClientSession, loc: str) -> aiohttp.ClientResponse:
    async with http.head(loc, headers=V) as r:
        return r


async def offset(http: aiohttp.ClientSession, loc: str) -> int:
    r = await head(http, loc)
    assert r.status == 200
    return int(r.headers["Upload-Offset"])


def data_file(root: Path, loc: str) -> Path:
    return root / "uploads" / (loc.rsplit("/", 1)[1] + ".bin")


async def test_options_advertises_extensions(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.options(f"{sim.url}/files/") as r:
        assert r.status == 204
        assert r.headers["Tus-Version"] == "1.0.0"
        assert set(r.headers["Tus-Extension"].split(",")) == set(tus_sim.ALL_EXTENSIONS)
        assert r.headers["Tus-Max-Size"] == str(1 << 20)
        assert r.headers["Tus-Checksum-Algorithm"] in ("sha1,md5,sha256,crc32", "sha1,md5,sha256,crc32,crc32c")


async def test_full_upload_materialises(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    data = os.urandom(3000)
    loc = await create(http, sim, len(data))
    r = await head(http, loc)
    assert r.headers["Upload-Offset"] == "0" and r.headers["Upload-Length"] == "3000"
    assert r.headers["Cache-Control"] == "no-store"
    assert "relpath" in r.headers["Upload-Metadata"]
    for start in (0, 1000, 2000):
        hdrs = {**OCTET, "Upload-Offset": str(start)}
        async with http.patch(loc, data=data[start : start + 1000], headers=hdrs) as p:
            assert p.status == 204
            assert p.headers["Upload-Offset"] == str(start + 1000)
            assert p.headers["Tus-Resumable"] == "1.0.0"
    assert (tmp_path / "complete" / "a" / "b.bin").read_bytes() == data


async def test_wrong_offset_409_appends_nothing(
    sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    loc = await create(http, sim, 100)
    async with http.patch(loc, data=b"x" * 10, headers={**OCTET, "Upload-Offset": "5"}) as r:
        assert r.status == 409
    assert await offset(http, loc) == 0
    assert data_file(tmp_path, loc).stat().st_size == 0


async def test_wrong_content_type_415_appends_nothing(
    sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    loc = await create(http, sim, 100)
    hdrs = {**V, "Content-Type": "application/octet-stream", "Upload-Offset": "0"}
    async with http.patch(loc, data=b"x" * 10, headers=hdrs) as r:
        assert r.status == 415
    assert await offset(http, loc) == 0
    assert data_file(tmp_path, loc).stat().st_size == 0


async def test_checksum_mismatch_460_discards(
    sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    loc = await create(http, sim, 20)
    chunk = b"0123456789"
    bad = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    hdrs = {**OCTET, "Upload-Offset": "0", "Upload-Checksum": f"sha1 {bad}"}
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 460
    assert await offset(http, loc) == 0
    assert data_file(tmp_path, loc).stat().st_size == 0
    good = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
    hdrs["Upload-Checksum"] = f"sha256 {good}"
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == "10"
    hdrs = {**OCTET, "Upload-Offset": "10", "Upload-Checksum": f"sha384 {good}"}
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 400  # unsupported algorithm
    # crc32: the base64 of the big-endian CRC-32 (as tusd); a wrong one is refused, the right one taken
    hdrs["Upload-Checksum"] = "crc32 " + base64.b64encode((zlib.crc32(chunk) ^ 1).to_bytes(4, "big")).decode()
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 460
    hdrs["Upload-Checksum"] = "crc32 " + base64.b64encode(zlib.crc32(chunk).to_bytes(4, "big")).decode()
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == "20"
    assert data_file(tmp_path, loc).read_bytes() == chunk + chunk


async def test_crc32c_checksum_when_offered(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    crc32c = pytest.importorskip("crc32c")
    loc = await create(http, sim, 10)
    chunk = b"0123456789"
    value = crc32c.crc32c(chunk)
    hdrs = {**OCTET, "Upload-Offset": "0"}
    hdrs["Upload-Checksum"] = "crc32c " + base64.b64encode((value ^ 4).to_bytes(4, "big")).decode()
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 460
    hdrs["Upload-Checksum"] = "crc32c " + base64.b64encode(value.to_bytes(4, "big")).decode()
    async with http.patch(loc, data=chunk, headers=hdrs) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == "10"


async def test_drop_keeps_received_bytes(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    data = os.urandom(600_000)
    loc = await create(http, sim, len(data))
    sim.faults.add(FaultRule("drop", method="PATCH", path="/files/*", after=200_000))
    with pytest.raises(aiohttp.ClientError):
        async with http.patch(loc, data=data, headers={**OCTET, "Upload-Offset": "0"}) as r:
            await r.read()
    assert await offset(http, loc) == 200_000
    assert data_file(tmp_path, loc).read_bytes() == data[:200_000]
    async with http.patch(loc, data=data[200_000:], headers={**OCTET, "Upload-Offset": "200000"}) as r:
        assert r.status == 204
    assert (tmp_path / "complete" / "a" / "b.bin").read_bytes() == data
    assert sim.faults.bytes_in[PATCH_ROUTE] == len(data)


async def test_drop_with_checksum_discards(
    sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    loc = await create(http, sim, len(data))
    sim.faults.add(FaultRule("drop", method="PATCH", path="/files/*", after=100_000))
    digest = base64.b64encode(hashlib.sha1(data).digest()).decode()
    hdrs = {**OCTET, "Upload-Offset": "0", "Upload-Checksum": f"sha1 {digest}"}
    with pytest.raises(aiohttp.ClientError):
        async with http.patch(loc, data=data, headers=hdrs) as r:
            await r.read()
    assert await offset(http, loc) == 0
    assert data_file(tmp_path, loc).stat().st_size == 0


async def test_bad_tus_resumable_412(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sim.url}/files/", headers={"Upload-Length": "5"}) as r:
        assert r.status == 412 and r.headers["Tus-Version"] == "1.0.0"
    loc = await create(http, sim, 5)
    hdrs = {**OCTET, "Tus-Resumable": "0.2.2", "Upload-Offset": "0"}
    async with http.patch(loc, data=b"abcde", headers=hdrs) as r:
        assert r.status == 412 and r.headers["Tus-Resumable"] == "1.0.0"
    assert await offset(http, loc) == 0


async def test_create_validation(sim: SimServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{sim.url}/files/", headers={**V, "Upload-Length": str(2 << 20)}) as r:
        assert r.status == 413
    async with http.post(f"{sim.url}/files/", headers=V) as r:
        assert r.status == 400
    bad = {**V, "Upload-Length": "3", "Upload-Metadata": f"relpath {b64('../evil')}"}
    async with http.post(f"{sim.url}/files/", headers=bad) as r:
        assert r.status == 400
    bad = {**V, "Upload-Length": "3", "Upload-Metadata": "relpath !!notbase64"}
    async with http.post(f"{sim.url}/files/", headers=bad) as r:
        assert r.status == 400


async def test_patch_past_length_400(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    loc = await create(http, sim, 5)
    async with http.patch(loc, data=b"abcdef", headers={**OCTET, "Upload-Offset": "0"}) as r:
        assert r.status == 400
    assert await offset(http, loc) == 0
    assert data_file(tmp_path, loc).stat().st_size == 0


async def test_delete_then_410(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    loc = await create(http, sim, 10)
    async with http.patch(loc, data=b"abc", headers={**OCTET, "Upload-Offset": "0"}) as r:
        assert r.status == 204
    async with http.delete(loc, headers=V) as r:
        assert r.status == 204
    assert (await head(http, loc)).status == 410
    async with http.patch(loc, data=b"def", headers={**OCTET, "Upload-Offset": "3"}) as r:
        assert r.status == 410
    assert not data_file(tmp_path, loc).exists()
    assert (await head(http, loc.rsplit("/", 1)[0] + "/0123abcd")).status == 404


async def test_deferred_length(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    hdrs = {**V, "Upload-Defer-Length": "1", "Upload-Metadata": f"relpath {b64('s.tar.zst')}"}
    async with http.post(f"{sim.url}/files/", headers=hdrs) as r:
        assert r.status == 201
        loc = r.headers["Location"]
    r2 = await head(http, loc)
    assert r2.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in r2.headers
    async with http.patch(loc, data=b"hello ", headers={**OCTET, "Upload-Offset": "0"}) as r:
        assert r.status == 204
    assert not (tmp_path / "complete" / "s.tar.zst").exists()
    last = {**OCTET, "Upload-Offset": "6", "Upload-Length": "11"}
    async with http.patch(loc, data=b"world", headers=last) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == "11"
    assert (await head(http, loc)).headers["Upload-Length"] == "11"
    assert (tmp_path / "complete" / "s.tar.zst").read_bytes() == b"hello world"
    async with http.patch(
        loc, data=b"", headers={**OCTET, "Upload-Offset": "11", "Upload-Length": "12"}
    ) as r:
        assert r.status == 400  # the length cannot change once set


async def test_creation_with_upload(sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    hdrs = {**OCTET, "Upload-Length": "8", "Upload-Metadata": f"filename {b64('x.txt')}"}
    async with http.post(f"{sim.url}/files/", data=b"12345678", headers=hdrs) as r:
        assert r.status == 201 and r.headers["Upload-Offset"] == "8"
    assert (tmp_path / "complete" / "x.txt").read_bytes() == b"12345678"


async def _raw_patch_start(url: str, loc: str, off: int, total: int, first: bytes) -> asyncio.StreamWriter:
    """Open a PATCH by hand and send only ``first`` of its ``total`` body bytes."""
    u = URL(loc)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    writer.write(
        (
            f"PATCH {u.path} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {off}\r\n"
            f"Content-Length: {total}\r\n\r\n"
        ).encode()
        + first
    )
    await writer.drain()
    writer.reader = reader  # type: ignore[attr-defined]
    return writer


async def _wait_offset(http: aiohttp.ClientSession, loc: str, want: int) -> None:
    for _ in range(2000):  # each HEAD is a round trip through the server's loop
        if await offset(http, loc) == want:
            return
    raise AssertionError(f"offset never reached {want}")


async def test_concurrent_patch_waits_for_lock(
    sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    loc = await create(http, sim, 20)
    slow = await _raw_patch_start(sim.url, loc, 0, 10, b"AAAAA")
    await _wait_offset(http, loc, 5)  # bytes are visible while the PATCH is still running

    async def patch_second() -> tuple[int, str | None]:
        async with http.patch(loc, data=b"B" * 10, headers={**OCTET, "Upload-Offset": "10"}) as r:
            return r.status, r.headers.get("Upload-Offset")

    counted = asyncio.Event()
    sim.faults.on_request.append(lambda route, n: counted.set() if route == PATCH_ROUTE and n == 2 else None)
    second = asyncio.ensure_future(patch_second())
    async with asyncio.timeout(30):  # a bound, not a timing assertion
        await counted.wait()  # the handler reaches the lock in the same step that counts the request
    assert not second.done()
    slow.write(b"AAAAA")
    status_line = await slow.reader.readline()  # type: ignore[attr-defined]
    assert b" 204 " in status_line
    slow.close()
    assert await second == (204, "20")
    assert (tmp_path / "complete" / "a" / "b.bin").read_bytes() == b"A" * 10 + b"B" * 10


async def test_lock_timeout_423(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    app = tus_sim.build_app(tmp_path, FaultInjector(), tus_args(lock_timeout=0.0))
    async with SimServer(app) as server:
        loc = await create(http, server, 20)
        slow = await _raw_patch_start(server.url, loc, 0, 10, b"AAAAA")
        await _wait_offset(http, loc, 5)
        async with http.patch(loc, data=b"B" * 5, headers={**OCTET, "Upload-Offset": "5"}) as r:
            assert r.status == 423
        slow.close()
        assert await offset(http, loc) == 5  # bytes of the broken request are kept
