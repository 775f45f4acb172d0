"""The buffer rule of asyncdepo.transport.httpbody: every request body class streams intact to a server that
reads slowly, in odd-sized pieces, through a small receive buffer (tests/slowsink.py); the server's SHA-256
of what it received must equal the body's.

The sources here yield views of ONE buffer that they refill for every block and scribble over when the
body is done with them (as a pooled buffer handed to the next file is), so a body class that gives a view
back while the transport still holds it sends the wrong bytes. Each case runs on asyncio's loop and on
uvloop (which keeps references to queued writes), over plain HTTP and over TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from asyncdepo.contract import Item
from asyncdepo.engine.pipeline import BufferPool, FileSource
from asyncdepo.errors import SourceChangedError
from asyncdepo.transport.httpbody import SourcePayload, ViewPayload, form_file_payload
from tests.slowsink import SlowSink

DATA = os.urandom(6 * (1 << 20) + 4099)
BLOCK = (1 << 18) + 3  # odd-sized blocks, so pieces and slices never line up with the reader's


def loops() -> list[str]:
    kinds = ["asyncio"]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pytest.fail("uvloop is a dependency (the CLI runs on it): install it")
    kinds.append("uvloop")
    return kinds


def run(kind: str, coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro())
    with asyncio.Runner() as runner:
        return runner.run(coro())


class ReusingSource:
    """A ByteSource over ``data`` whose views all share one buffer: refilled for each block, scribbled over
    (0xAA) when iteration ends. ``size_known=False`` declares no size (the body goes chunked)."""

    def __init__(self, data: bytes, *, block: int = BLOCK, size_known: bool = True) -> None:
        self.size: int | None = len(data) if size_known else None
        self.digests: dict[str, str] = {}
        self._data, self._block = data, block
        self._buf = bytearray(block)
        self.iterations = 0

    def __aiter__(self) -> AsyncIterator[memoryview]:
        self.iterations += 1
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[memoryview]:
        try:
            for start in range(0, len(self._data), self._block):
                piece = self._data[start : start + self._block]
                self._buf[: len(piece)] = piece
                yield memoryview(self._buf)[: len(piece)]
            self.digests = {"sha256": hashlib.sha256(self._data).hexdigest()}
        finally:
            self._buf[:] = b"\xaa" * len(self._buf)


@pytest.fixture(params=["http", "https"])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def sink_for(scheme: str, folder: Path, **kw: Any) -> tuple[SlowSink, Any]:
    if scheme == "http":
        return SlowSink(**kw), None
    pytest.importorskip("cryptography")
    from tests.tlscert import contexts

    server_ctx, client_ctx = contexts(folder)
    return SlowSink(tls=server_ctx, **kw), client_ctx


async def post(url: str, body: Any, ssl_ctx: Any) -> dict[str, Any]:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
                session.post(url + "/up", data=body, ssl=ssl_ctx if ssl_ctx is not None else True) as r):
        assert r.status == 200
        return dict(await r.json())


BODIES: dict[str, Callable[[], tuple[Any, bytes]]] = {}


def body(name: str) -> Callable[[Callable[[], tuple[Any, bytes]]], Callable[[], tuple[Any, bytes]]]:
    def register(make: Callable[[], tuple[Any, bytes]]) -> Callable[[], tuple[Any, bytes]]:
        BODIES[name] = make
        return make

    return register


@body("source, size known")
def _sized() -> tuple[Any, bytes]:
    return SourcePayload(ReusingSource(DATA)), DATA


@body("source, chunked")
def _chunked() -> tuple[Any, bytes]:
    return SourcePayload(ReusingSource(DATA, size_known=False)), DATA


class MixedSource(ReusingSource):
    """Yields every other block as immutable ``bytes`` (which the transport may keep queued, as a
    compressor's output is) and the others as views of the one reused buffer: a reused view sent after
    queued bytes must still not be given back while the transport holds any of it."""

    async def _blocks(self) -> AsyncIterator[memoryview]:
        try:
            for n, start in enumerate(range(0, len(self._data), self._block)):
                piece = self._data[start : start + self._block]
                if n % 2:
                    self._buf[: len(piece)] = piece
                    yield memoryview(self._buf)[: len(piece)]
                else:
                    yield memoryview(bytes(piece))
            self.digests = {"sha256": hashlib.sha256(self._data).hexdigest()}
        finally:
            self._buf[:] = b"\xaa" * len(self._buf)


@body("bytes and reused views, size known")
def _mixed() -> tuple[Any, bytes]:
    return SourcePayload(MixedSource(DATA)), DATA


@body("bytes and reused views, chunked")
def _mixed_chunked() -> tuple[Any, bytes]:
    return SourcePayload(MixedSource(DATA, size_known=False)), DATA


@body("multipart form, chunked")
def _form() -> tuple[Any, bytes]:
    p = form_file_payload(ReusingSource(DATA, size_known=False), field="file", filename="a b\"é.bin",
                          fields={"kind": "x"})
    return p, p._head + DATA + p._tail


@body("multipart form, size known")
def _form_sized() -> tuple[Any, bytes]:
    p = form_file_payload(ReusingSource(DATA), field="file", filename="f.bin", fields={})
    return p, p._head + DATA + p._tail


@pytest.mark.parametrize("kind", loops())
@pytest.mark.parametrize("name", list(BODIES))
def test_streamed_bodies_arrive_intact(kind: str, name: str, scheme: str, tmp_path: Path) -> None:
    sink, ctx = sink_for(scheme, tmp_path)
    with sink:
        payload, expected = BODIES[name]()
        answer = run(kind, lambda: post(sink.url, payload, ctx))
    assert answer == {"sha256": hashlib.sha256(expected).hexdigest(), "size": len(expected)}
    assert payload._source.iterations == 1


@pytest.mark.parametrize("kind", loops())
def test_file_source_through_the_pool_arrives_intact(kind: str, scheme: str, tmp_path: Path) -> None:
    """The engine's own FileSource: three files at once from a pool with room for two 1 MiB blocks, so the
    third file starts in the block the first one gives back."""
    files = []
    for i in range(3):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(6 * (1 << 20) + 4099 * (i + 1)))
        st = path.stat()
        files.append(Item(str(path), path.name, st.st_size, st.st_mtime_ns))
    sink, ctx = sink_for(scheme, tmp_path)

    async def main() -> list[dict[str, Any]]:
        pool = BufferPool(2 << 20)
        answers: list[dict[str, Any]] = [{} for _ in files]

        async def one(i: int) -> None:
            source = FileSource(files[i], digests=("sha256",), block=1 << 20, pool=pool)
            answers[i] = await post(sink.url, SourcePayload(source), ctx)

        async with anyio.create_task_group() as tg:
            for i in range(len(files)):
                tg.start_soon(one, i)
        return answers

    with sink:
        answers = run(kind, main)
    assert answers == [{"sha256": hashlib.sha256(Path(f.path).read_bytes()).hexdigest(), "size": f.size}
                       for f in files]


@pytest.mark.parametrize("kind", loops())
def test_view_body_arrives_intact(kind: str, scheme: str, tmp_path: Path) -> None:
    view = memoryview(bytearray(DATA))
    sink, ctx = sink_for(scheme, tmp_path)
    with sink:
        answer = run(kind, lambda: post(sink.url, ViewPayload(view), ctx))
    assert answer == {"sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA)}


@pytest.mark.parametrize("kind", loops())
def test_a_body_cut_short_never_sends_memory_given_back(kind: str, scheme: str, tmp_path: Path) -> None:
    """A request cancelled mid-body (as a timeout does) while the transport still holds part of the view:
    once the caller has the buffer back and reuses it, the server must receive no byte of the new content:
    whatever arrives is a prefix of the true body."""
    buf = bytearray(DATA)
    sink, ctx = sink_for(scheme, tmp_path, pause_after=1 << 20)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, sink.url, ViewPayload(memoryview(buf)), ctx)
            await anyio.to_thread.run_sync(sink.paused.wait)
            tg.cancel_scope.cancel()  # as a timeout does
        buf[:] = b"\xaa" * len(buf)  # the request is over: the caller reuses its buffer
        sink.resume.set()
        # the loop runs on while the server reads the rest: a graceful close would send what it still held
        await anyio.to_thread.run_sync(sink.served.wait)

    with sink:
        run(kind, main)
    assert len(sink.received) == 1
    got = sink.received[0]
    assert 1 << 20 <= len(got) < len(DATA)
    assert got == DATA[: len(got)]


def test_a_source_that_grows_or_shrinks_is_refused(tmp_path: Path) -> None:
    sink, ctx = sink_for("http", tmp_path)

    class Lying(ReusingSource):
        def __init__(self, data: bytes, size: int) -> None:
            super().__init__(data)
            self.size = size

    async def main(size: int) -> None:
        with pytest.raises(aiohttp.ClientError) as info:
            await post(sink.url, SourcePayload(Lying(DATA, size)), ctx)
        cause: BaseException | None = info.value
        while cause is not None and not isinstance(cause, SourceChangedError):
            cause = cause.__cause__ or cause.__context__
        assert isinstance(cause, SourceChangedError), info.value

    with sink:
        run("asyncio", lambda: main(len(DATA) - BLOCK - 5))  # grew
        run("asyncio", lambda: main(len(DATA) + 5))  # shrank
    assert sink.bodies == []
