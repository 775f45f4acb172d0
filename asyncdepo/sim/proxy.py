"""A TCP proxy that injects faults on the wire, in front of any server: a simulator, moto, ``rclone serve s3``.

The simulators inject faults inside their handlers (:mod:`asyncdepo.sim.faults`); a third-party server has no
such hooks, and some damage (a bit flipped in transit, a reader slower than the writer) is best done between
the two ends. So the client talks to this proxy, and the proxy to the server::

    async with FaultProxy(("127.0.0.1", 9000)) as proxy:      # proxy.url, proxy.faults
        proxy.faults.add("PUT * drop after=1M first=1")

    asyncdepo sim proxy --upstream 127.0.0.1:9000 --port 8080 --fault 'PUT * status=503 first=2'

In HTTP/1.1 mode (the default) it frames requests and answers (Content-Length, chunked, or the answer's
end of connection), so a rule of :class:`~asyncdepo.sim.faults.FaultRule` matches one request by method and
path (the query is not part of the path) and acts on that request only:

* ``status`` — the proxy answers (an S3-style XML error: ``SlowDown`` for 503, ``InternalError`` for 500,
  ``TooManyRequests`` for 429, ``Retry-After`` when given) after reading the body, and closes the
  connection; the server never sees the request;
* ``drop`` — ``after`` body bytes reach the server, then both connections are reset;
* ``stall`` / ``delay`` — the request is held (until ``faults.release_stalls()``) / delayed before it is sent on;
* ``corrupt`` — the lowest bit of body byte ``after`` is flipped on the way;
* ``slow`` — the client's body is read in odd-sized pieces (the socket's receive buffer shrunk), ``delay``
  seconds apart, so the client's writes return while its bytes still wait in its own buffers;
* ``digest`` — the server's answer gets every digest header (``ETag``, ``x-amz-checksum-*`` ...) and the digests
  in its XML/JSON body falsified;
* ``lose`` — the request reaches the server, which does the work; its answer is thrown away and both
  connections are reset (a lost response).

Counters are the injector's: body bytes and requests per route ``"METHOD /path"``, and the pause point
(``faults.pause_at(n)``) that holds every body once ``n`` bytes went through. In raw mode (``http=False``) the
client's whole byte stream of a connection is one body (route ``"TCP /"``; rules match method ``TCP``),
for servers spoken to over TLS or another protocol.

Why our own: the proxies on PyPI (mitmproxy, toxiproxy clients) either need a separate daemon or cannot flip
one chosen bit of a body; this one is ~300 lines of asyncio streams and shares the simulators' fault rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import TracebackType
from typing import Any, Self

from asyncdepo.sim.faults import (
    DIGEST_HEADER,
    PIECES,
    FaultInjector,
    FaultRule,
    falsify,
    falsify_text,
    parse_rule,
)

BLOCK = 64 * 1024
S3_CODES = {500: "InternalError", 503: "SlowDown", 429: "TooManyRequests", 400: "BadRequest",
            403: "AccessDenied", 404: "NoSuchKey"}


class Reset(Exception):
    """A ``drop`` fault cut the connection."""


@dataclasses.dataclass
class Head:
    """A request or status line and its headers, as received (``raw`` is forwarded unchanged)."""

    first: str
    headers: dict[str, str]
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Head:
        lines = raw.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        return cls(lines[0], headers, raw)

    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value.split(",")[0]) if value else None

    def rebuilt(self, length: int) -> bytes:
        """This head with a Content-Length of ``length`` instead of its own framing."""
        keep = [line for line in self.raw.decode("latin-1").split("\r\n")[1:]
                if line and line.split(":", 1)[0].strip().lower() not in ("content-length", "transfer-encoding")]
        return "\r\n".join([self.first, *keep, f"Content-Length: {length}", "", ""]).encode("latin-1")


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The next head, or None at a clean end of stream (nothing pending)."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise ConnectionError("connection closed inside a head") from None
        return None
    while raw.startswith(b"\r\n"):  # a stray CRLF between messages is allowed
        raw = raw[2:]
    return Head.parse(raw)


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, bytes]]:
    """A chunked body as (framing, data) pairs, the framing forwarded verbatim; the last pair ends it."""
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            trailer = b""
            while (t := await reader.readuntil(b"\r\n")) != b"\r\n":
                trailer += t
            yield line, b""
            yield trailer + b"\r\n", b""
            return
        data = await reader.readexactly(size)
        yield line, data
        yield await reader.readexactly(2), b""


@dataclasses.dataclass
class _Flow:
    """One request body on its way: the rule that hit it and how many of its bytes went by."""

    route: str
    rule: FaultRule | None
    seen: int = 0


@dataclasses.dataclass
class _Pending:
    method: str
    rule: FaultRule | None


class FaultProxy:
    """Listens on ``host:port`` (0: any free port) and relays every connection to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], faults: FaultInjector | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, http: bool = True) -> None:
        self.upstream = upstream
        self.faults = faults or FaultInjector()
        self.host, self.port, self.http = host, port, http
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._live: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.faults.release_stalls()
            self.faults.pause_at(None)
            for writers in self._live.values():
                for writer in writers:
                    writer.transport.abort()
            await asyncio.gather(*self._live, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- one connection ----------------------------------------------------------------------------------
    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        writers = self._live[task] = [cwriter]
        self.connections += 1
        uwriter: asyncio.StreamWriter | None = None
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
            writers.append(uwriter)
            if self.http:
                pending: asyncio.Queue[_Pending] = asyncio.Queue()
                await _both(self._requests(creader, cwriter, uwriter, pending),
                            self._answers(ureader, cwriter, pending))
            else:
                await _both(self._raw(creader, uwriter), self._copy(ureader, cwriter))
        except (ConnectionError, OSError, Reset, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, asyncio.CancelledError):
            # either end went away, a drop fault cut it, or the loop is shutting down: both are closed below
            # (a connection task that ended cancelled would be logged as an error by asyncio's server)
            pass
        finally:
            for writer in writers:
                writer.transport.abort()
            self._live.pop(task, None)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(BLOCK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def _raw(self, creader: asyncio.StreamReader, uwriter: asyncio.StreamWriter) -> None:
        rule = self.faults.rule_for("TCP", "/")
        self.faults.requests["TCP /"] += 1
        await self._before(rule, creader)
        await self._body(creader, uwriter, None, _Flow("TCP /", rule))
        if uwriter.can_write_eof():
            uwriter.write_eof()

    async def _before(self, rule: FaultRule | None, creader: asyncio.StreamReader) -> None:
        if rule is None:
            return
        if rule.kind == "stall":
            await self.faults.stall()
        elif rule.kind == "delay":
            await asyncio.sleep(rule.delay)
        elif rule.kind == "slow":
            transport = creader._transport  # type: ignore[attr-defined]  # no public way to the socket
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def _requests(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                        uwriter: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]) -> None:
        while (head := await read_head(creader)) is not None:
            method, target = (head.first.split(" ") + ["", ""])[:2]
            path = target.split("?", 1)[0]
            route = f"{method} {path}"
            self.faults.requests[route] += 1
            for hook in self.faults.on_request:
                hook(route, self.faults.requests[route])
            rule = self.faults.rule_for(method, path)
            if rule is not None and rule.kind == "status":
                await self._refuse(creader, cwriter, head, route, rule)
                return
            await self._before(rule, creader)
            await pending.put(_Pending(method, rule))
            uwriter.write(head.raw)
            flow = _Flow(route, rule)
            if head.chunked():
                async for framing, data in _chunks(creader):
                    uwriter.write(framing)
                    if data:
                        await self._body_bytes(data, uwriter, flow)
            else:
                await self._body(creader, uwriter, head.length() or 0, flow)
            await uwriter.drain()
        if uwriter.can_write_eof():
            uwriter.write_eof()

    async def _refuse(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter, head: Head, route: str,
                      rule: FaultRule) -> None:
        """Answer ``rule.status`` ourselves (after reading the body, unless the client waits for a 100)."""
        if "100-continue" not in head.headers.get("expect", "").lower():
            if head.chunked():
                async for _, data in _chunks(creader):
                    self.faults.count(route, len(data))
            else:
                left = head.length() or 0
                while left:
                    data = await creader.read(min(BLOCK, left))
                    if not data:
                        break
                    left -= len(data)
                    self.faults.count(route, len(data))
        code = S3_CODES.get(rule.status, "InjectedFault")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected fault: '
                f"HTTP {rule.status}</Message><RequestId>asyncdepo-proxy</RequestId></Error>").encode()
        lines = [f"HTTP/1.1 {rule.status} Injected", "Content-Type: application/xml",
                 f"Content-Length: {len(body)}", "Connection: close"]
        if rule.retry_after is not None:
            lines.append(f"Retry-After: {rule.retry_after:g}")
        self.faults.statuses[route] += 1
        cwriter.write("\r\n".join([*lines, "", ""]).encode() + body)
        await cwriter.drain()

    async def _body(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int | None,
                    flow: _Flow) -> None:
        """Relay ``length`` body bytes (None: until the end of the stream), applying ``flow.rule``."""
        rule = flow.rule
        pieces: Iterator[int] = itertools.cycle(PIECES) if rule is not None and rule.kind == "slow" \
            else itertools.repeat(BLOCK)
        left = length
        while left is None or left > 0:
            want = next(pieces) if left is None else min(next(pieces), left)
            if rule is not None and rule.kind == "slow":
                await asyncio.sleep(rule.delay)
            data = await reader.read(want)
            if not data:
                if left:
                    raise ConnectionError("the client closed the connection inside a body")
                return
            if left is not None:
                left -= len(data)
            await self._body_bytes(data, writer, flow)

    async def _body_bytes(self, data: bytes, writer: asyncio.StreamWriter, flow: _Flow) -> None:
        """Count, damage and forward one piece of a body; the offsets of faults are per request body."""
        rule, route, start = flow.rule, flow.route, flow.seen
        flow.seen += len(data)
        if rule is not None:
            if rule.kind == "corrupt" and start <= rule.after < start + len(data):
                damaged = bytearray(data)
                damaged[rule.after - start] ^= 0x01
                data = bytes(damaged)
            if rule.kind == "drop" and start + len(data) >= rule.after:
                data = data[: max(0, rule.after - start)]
                async for piece in self.faults.admit(route, data):
                    writer.write(piece)
                await writer.drain()
                raise Reset(f"injected drop after {rule.after} bytes")
        async for piece in self.faults.admit(route, data):
            writer.write(piece)
            await writer.drain()

    async def _answers(self, ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                       pending: asyncio.Queue[_Pending]) -> None:
        while (head := await read_head(ureader)) is not None:
            status = int((head.first.split(" ") + ["0", "0"])[1])
            if 100 <= status < 200:
                cwriter.write(head.raw)  # 100 Continue and friends: the answer is still to come
                await cwriter.drain()
                continue
            asked = pending.get_nowait() if not pending.empty() else _Pending("GET", None)
            if asked.rule is not None and asked.rule.kind == "lose":
                raise Reset("injected: the response was lost")
            falsified = asked.rule is not None and asked.rule.kind == "digest"
            no_body = asked.method == "HEAD" or status in (204, 304)
            if falsified:
                raw = _falsified_head(head)
                if no_body:
                    cwriter.write(raw)
                else:
                    body = falsify(await self._whole(ureader, head), head.headers.get("content-type", ""))
                    cwriter.write(_falsified_head(Head.parse(head.rebuilt(len(body)))) + body)
            else:
                cwriter.write(head.raw)
                if not no_body:
                    await self._relay_answer(ureader, cwriter, head)
            await cwriter.drain()
            if "close" in head.headers.get("connection", "").lower():
                return

    async def _whole(self, reader: asyncio.StreamReader, head: Head) -> bytes:
        if head.chunked():
            return b"".join([data async for _, data in _chunks(reader)])
        length = head.length()
        return await reader.readexactly(length) if length is not None else await reader.read()

    async def _relay_answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: Head) -> None:
        if head.chunked():
            async for framing, data in _chunks(reader):
                writer.write(framing + data)
                await writer.drain()
            return
        left = head.length()
        while left is None or left > 0:
            data = await reader.read(BLOCK if left is None else min(BLOCK, left))
            if not data:
                if left:
                    raise ConnectionError("the server closed the connection inside an answer")
                return
            if left is not None:
                left -= len(data)
            writer.write(data)
            await writer.drain()


async def _both(there: Coroutine[Any, Any, None], back: Coroutine[Any, Any, None]) -> None:
    """Run the two directions of a connection; the first to fail ends both (and its error is raised)."""
    tasks = [asyncio.create_task(there), asyncio.create_task(back)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raises the failure, if any
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _falsified_head(head: Head) -> bytes:
    """``head`` with the value of every header named like a digest (ETag, x-amz-checksum-*, Content-MD5 ...)
    falsified."""
    lines = head.raw.decode("latin-1").split("\r\n")
    out = []
    for line in lines:
        name, sep, value = line.partition(":")
        out.append(f"{name}: {falsify_text(value.strip())}" if sep and DIGEST_HEADER.search(name) else line)
    return "\r\n".join(out).encode("latin-1")


# -- `asyncdepo sim proxy` --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", required=True, metavar="HOST:PORT", help="the server to relay to")
    parser.add_argument("--raw", action="store_true",
                        help="relay bytes without reading HTTP (for TLS or other protocols): rules match "
                             "method TCP, a connection's stream is one body")


def serve(args: argparse.Namespace) -> int:
    """Run the proxy in the foreground until interrupted."""
    host, _, port = str(args.upstream).rpartition(":")
    faults = FaultInjector([parse_rule(r) for r in args.fault])

    async def main() -> None:
        proxy = FaultProxy((host or "127.0.0.1", int(port)), faults, host=args.host, port=args.port,
                           http=not args.raw)
        async with proxy:
            print(f"asyncdepo sim proxy listening on {proxy.url}, relaying to {args.upstream}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
