"""The tus adapter's recovery paths, each reached by a fault of the tus simulator (its FaultInjector, a restart
on rolled-back state) and checked by what the server holds: answers without the header the protocol promises,
a length declaration that was lost, a file that changed size between runs, a server that lost its last chunk,
a termination the server refuses, servers that cannot take our uploads."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from asyncdepo.adapters.tus import TusAdapter
from asyncdepo.cli import main as cli_main
from asyncdepo.contract import Item
from asyncdepo.errors import OffsetMismatchError, TransferError, TransientError, UsageError
from asyncdepo.sim import tus as tus_sim
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import SimServer
from tests.adapters.test_tus_adapter import CHUNK, chunks, make_item
from tests.conftest import tus_args, upload_bytes


class Source:
    """A ByteSource over ``data`` in 10 kB blocks, with or without a known size."""

    def __init__(self, data: bytes, sized: bool) -> None:
        self.data = data
        self.size: int | None = len(data) if sized else None
        self.digests: dict[str, str] = {}

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        for off in range(0, len(self.data), 10_000):
            yield memoryview(self.data[off : off + 10_000])


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SimServer]:
    async with SimServer(tus_sim.build_app(tmp_path / "tus", FaultInjector(), None)) as srv:
        yield srv


def url_of(server: SimServer) -> str:
    return f"tus+{server.url}/files/"


def landed(tmp_path: Path, rel: str) -> bytes:
    return (tmp_path / "tus" / "complete" / rel).read_bytes()


async def head_status(location: str) -> int:
    async with aiohttp.ClientSession() as http, http.head(location, headers={"Tus-Resumable": "1.0.0"}) as r:
        return r.status


async def test_head_answer_without_offset_is_transient_then_the_reopen_resumes(
    server: SimServer, tmp_path: Path
) -> None:
    data = os.urandom(3 * CHUNK)
    item = make_item(tmp_path, "h/eads.bin", data)
    parts = chunks(data)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(parts[0])
        saved = writer.state()
        path = URL(writer.location).path
        # an answer of 200 without Upload-Offset (a proxy's page, a server bug): nothing to resume from
        server.faults.add("HEAD /files/* status=200 first=1")
        with pytest.raises(TransientError) as info:
            await adapter.open_item(item, saved)
        assert str(info.value) == f"tus HEAD {path}: no Upload-Offset in the answer"
        again = await adapter.open_item(item, saved)  # the next HEAD is answered properly
        assert again.location == writer.location and again.confirmed == CHUNK
        for c in parts[1:]:
            await again.write(c)
        await again.complete({}, len(data))
    assert landed(tmp_path, "h/eads.bin") == data
    assert upload_bytes(server.faults) == len(data)  # nothing re-sent


async def test_patch_answer_without_offset_is_an_offset_mismatch_and_the_chunk_is_resent(
    server: SimServer, tmp_path: Path
) -> None:
    data = os.urandom(3 * CHUNK)
    item = make_item(tmp_path, "p.bin", data)
    parts = chunks(data)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(parts[0])  # the creation-with-upload POST
        server.faults.add("PATCH /files/* status=200 first=1")  # a 200 that never reached the upload
        with pytest.raises(OffsetMismatchError) as info:
            await writer.write(parts[1])
        path = URL(writer.location).path
        assert str(info.value) == f"tus PATCH {path}: server at None, expected {2 * CHUNK}"
        assert info.value.offset is None and writer.confirmed == CHUNK
        assert await writer.resync() == CHUNK  # the server never appended the chunk
        for c in parts[1:]:
            await writer.write(c)
        await writer.complete({}, len(data))
    assert landed(tmp_path, "p.bin") == data


async def test_write_stream_of_known_size_and_an_answer_without_offset(server: SimServer, tmp_path: Path) -> None:
    data = os.urandom(5 * 10_000 + 17)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(make_item(tmp_path, "sized.bin", data), None)
        await writer.write_stream(Source(data, sized=True))  # Content-Length sent; the length is known already
        assert writer.confirmed == len(data)
        assert await writer.complete({}, len(data)) == {"location": writer.location, "size": len(data)}
        assert landed(tmp_path, "sized.bin") == data
        patches = server.faults.requests["PATCH /files/{upload_id}"]
        assert patches == 1  # no length declaration after it

        other = await adapter.open_item(make_item(tmp_path, "lost.bin", data), None)
        server.faults.add("PATCH /files/* status=200 first=1")
        with pytest.raises(TransientError) as info:
            await other.write_stream(Source(data, sized=True))
        path = URL(other.location).path
        assert str(info.value) == f"tus PATCH {path}: no Upload-Offset in the answer"
        assert await other.resync() == 0  # the server took none of it
    assert not (tmp_path / "tus" / "complete" / "lost.bin").exists()


async def test_a_lost_length_declaration_is_made_by_complete_after_a_reopen(
    server: SimServer, tmp_path: Path
) -> None:
    data = os.urandom(4 * 10_000 + 3)
    item = Item(path=str(tmp_path / "x"), rel="stream.tar.zst", size=-1, mtime_ns=1)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(item, None)
        # the body's PATCH goes through, the PATCH declaring the length gets a 503
        server.faults.add("PATCH /files/* status=503 skip=1 first=1")
        with pytest.raises(TransientError) as info:
            await writer.write_stream(Source(data, sized=False))
        assert info.value.status == 503
        saved = writer.state()
    assert not (tmp_path / "tus" / "complete" / "stream.tar.zst").exists()  # all bytes, but no length yet
    async with TusAdapter(url_of(server)) as adapter:
        again = await adapter.open_item(item, saved)
        assert again.confirmed == len(data) and again.length is None
        assert await again.resync() == len(data) and again.length is None  # still deferred on the server
        assert await again.complete({}, 10 * len(data)) == {"location": writer.location, "size": len(data)}
        assert again.length == len(data)
    assert landed(tmp_path, "stream.tar.zst") == data
    assert upload_bytes(server.faults) == len(data)


async def test_a_server_that_lost_its_last_chunk_gets_it_again(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    item = make_item(tmp_path, "back.bin", data)
    parts = chunks(data)
    root = tmp_path / "tus"
    server = await SimServer(tus_sim.build_app(root, FaultInjector(), None)).start()
    port = server.port
    try:
        async with TusAdapter(url_of(server)) as adapter:
            writer = await adapter.open_item(item, None)
            await writer.write(parts[0])
            await writer.write(parts[1])
            assert writer.confirmed == 2 * CHUNK
            await server.stop()
            # the server comes back from a backup taken before the second chunk: its offset went back
            info_file = next((root / "uploads").glob("*.json"))
            info = orjson.loads(info_file.read_bytes())
            info["offset"] = CHUNK
            info_file.write_bytes(orjson.dumps(info))
            server = await SimServer(tus_sim.build_app(root, FaultInjector(), None), port=port).start()
            with pytest.raises(OffsetMismatchError):  # PATCH at 2 chunks: 409, the server is elsewhere
                await writer.write(parts[2])
            assert await writer.resync() == CHUNK
            with pytest.raises(OffsetMismatchError) as mismatch:  # a gap would be left: refused before a request
                await writer.write(parts[2])
            path = URL(writer.location).path
            assert str(mismatch.value) == f"tus PATCH {path}: chunk at {2 * CHUNK}, {CHUNK} confirmed"
            assert mismatch.value.offset == CHUNK
            patches = server.faults.requests["PATCH /files/{upload_id}"]
            assert patches == 1
            await writer.write(parts[1])
            await writer.write(parts[2])
            await writer.complete({}, len(data))
        assert landed(tmp_path, "back.bin") == data
    finally:
        await server.stop()


async def test_abort_swallows_a_refused_termination_discard_does_not(server: SimServer, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(make_item(tmp_path, "keep.bin", data), None)
        await writer.write(chunks(data)[0])
        server.faults.add("DELETE /files/* status=500 first=2")
        await writer.abort()  # cleanup path: the 500 is not raised over the error being handled
        assert await head_status(writer.location) == 200  # the upload is still there
        with pytest.raises(TransferError) as info:
            await adapter.discard("keep.bin", writer.state())
        assert info.value.status == 500 and "DELETE" in str(info.value)
        assert await head_status(writer.location) == 200
        await adapter.discard("keep.bin", writer.state())  # the fault is spent: terminated
        assert await head_status(writer.location) == 410
        await adapter.discard("keep.bin", writer.state())  # already gone is fine
        assert server.faults.requests["DELETE /files/{upload_id}"] == 4


async def test_reopen_head_failing_otherwise_than_gone_is_raised(server: SimServer, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    item = make_item(tmp_path, "busy.bin", data)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(item, None)
        await writer.write(chunks(data)[0])
        server.faults.add("HEAD /files/* status=503 first=1")
        with pytest.raises(TransientError) as info:
            await adapter.open_item(item, writer.state())
        assert info.value.status == 503
        assert server.faults.requests["POST /files/"] == 1  # no new upload for a server that is busy
        again = await adapter.open_item(item, writer.state())
        assert again.location == writer.location and again.confirmed == CHUNK


async def test_a_file_that_changed_size_terminates_its_old_upload(server: SimServer, tmp_path: Path) -> None:
    old = os.urandom(2 * CHUNK)
    new = os.urandom(3 * CHUNK)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(make_item(tmp_path, "v.bin", old), None)
        await writer.write(chunks(old)[0])
        saved = writer.state()
        again = await adapter.open_item(make_item(tmp_path, "v.bin", new), saved)
        assert again.location is None and again.confirmed == 0
        assert await head_status(writer.location) == 410  # the other version's upload was terminated
        for c in chunks(new):
            await again.write(c)
        await again.complete({}, len(new))
        assert again.location != writer.location
    assert landed(tmp_path, "v.bin") == new


async def test_unknown_length_without_defer_extension_is_a_usage_error(tmp_path: Path) -> None:
    app = tus_sim.build_app(tmp_path / "tus", FaultInjector(),
                            tus_args(extensions="creation,creation-with-upload,termination"))
    async with SimServer(app) as server, TusAdapter(url_of(server)) as adapter:
        item = Item(path=str(tmp_path / "x"), rel="s.zst", size=-1, mtime_ns=1)
        writer = await adapter.open_item(item, None)
        with pytest.raises(UsageError) as info:
            await writer.write(chunks(b"z" * 100, total=100)[0])
        assert str(info.value) == (
            f"{adapter.describe()} cannot take uploads of unknown length (no creation-defer-length)"
        )
        assert server.faults.requests["POST /files/"] == 0  # refused before any request


async def test_creation_answer_without_location_is_transient_then_created(
    server: SimServer, tmp_path: Path
) -> None:
    data = os.urandom(CHUNK + 5)
    async with TusAdapter(url_of(server)) as adapter:
        writer = await adapter.open_item(make_item(tmp_path, "loc.bin", data), None)
        server.faults.add("POST /files/ status=201 first=1")  # "created", but where?
        with pytest.raises(TransientError) as info:
            await writer.write(chunks(data)[0])
        assert str(info.value) == "tus POST /files/: no Location in the answer"
        assert writer.location is None and writer.confirmed == 0
        for c in chunks(data):
            await writer.write(c)
        await writer.complete({}, len(data))
    assert landed(tmp_path, "loc.bin") == data


async def test_servers_that_cannot_take_our_uploads_are_refused_at_enter(tmp_path: Path) -> None:
    app = tus_sim.build_app(tmp_path / "tus", FaultInjector(), tus_args(extensions="termination"))
    async with SimServer(app) as server:
        adapter = TusAdapter(url_of(server))
        with pytest.raises(UsageError) as info:
            await adapter.__aenter__()
        assert str(info.value) == f"{adapter.describe()} does not offer the tus creation extension"
        assert adapter._http.session is None  # closed on the way out

    async def options(_: web.Request) -> web.Response:  # a server of an older protocol version
        return web.Response(status=204, headers={"Tus-Version": "0.2.2, 0.2.1", "Tus-Extension": "creation"})

    old = web.Application()
    old.router.add_route("OPTIONS", "/files/", options)
    async with SimServer(old) as server:
        adapter = TusAdapter(url_of(server))
        with pytest.raises(UsageError) as info:
            await adapter.__aenter__()
        assert str(info.value) == f"{adapter.describe()} does not speak tus 1.0.0 (it offers 0.2.2, 0.2.1)"
        assert adapter._http.session is None


def test_url_forms() -> None:
    with pytest.raises(UsageError) as info:
        TusAdapter("tus+ftp://h/files/?token=x")
    assert str(info.value) == "not a tus URL: 'tus+ftp://h/files/' (expected tus+https://HOST/PATH)"
    with pytest.raises(UsageError, match="secrets"):
        TusAdapter("tus+https://user:pw@h/files/")
    adapter = TusAdapter("tus+https://h:8443?tenant=a")
    assert adapter.endpoint == "https://h:8443/files/?tenant=a"
    assert adapter.describe() == "tus+https://h:8443/files/"


def test_a_file_changed_after_a_failed_run_replaces_its_upload_on_resume(
    threaded_tus: Any, tmp_path: Path, journal: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * CHUNK))
    url = f"tus+http://127.0.0.1:{threaded_tus.server.port}/files/"
    # every attempt of the run finds the server busy: the item fails, its upload journaled for a resume
    threaded_tus.faults.add("PATCH /files/* status=503 first=3")
    argv = ["push", str(src), url, "--journal", str(journal), "--chunk-size", "64K", "--retries", "0",
            "--request-attempts", "1"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "failed: a.bin: " in err and "503" in err, err
    db = sqlite3.connect(journal)
    try:
        job, state, remote = db.execute("SELECT job, state, remote FROM items WHERE rel='a.bin'").fetchone()
    finally:
        db.close()
    assert state == "failed"
    old = orjson.loads(remote)["location"]
    new = os.urandom(5 * CHUNK)
    (src / "a.bin").write_bytes(new)  # the file changed (another size) before the failed item is retried
    assert cli_main(["resume", job, "--journal", str(journal)]) == 0, capsys.readouterr().err
    assert (threaded_tus.store / "complete" / "a.bin").read_bytes() == new
    assert threaded_tus.faults.requests["DELETE /files/{upload_id}"] == 1  # the old version's upload ended
    info = orjson.loads((threaded_tus.store / "uploads" / f"{URL(old).name}.json").read_bytes())
    assert info["terminated"] is True
