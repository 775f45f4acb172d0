"""A raw-socket HTTP/1.1 sink that reads request bodies slowly, in odd-sized pieces, through a small receive
buffer, and answers with the SHA-256 of what it received.

It shares no code with the client (blocking sockets in a thread, its own parsing of Content-Length and
chunked bodies). A client writing faster than it reads finds its kernel send buffer full, so its
transport keeps the rest of each write queued in user space: exactly where a body class that hands a
buffer back too early corrupts what is sent.

Each complete body (decoded from chunked encoding when sent so) is appended to :attr:`SlowSink.bodies`;
every connection's raw bytes after the request head, complete or not, to :attr:`SlowSink.received`.
``pause_after=N``: stop reading after N bytes of a body and wait for :attr:`SlowSink.resume`, then read on
until the peer closes; :attr:`SlowSink.paused` is set while it waits, :attr:`SlowSink.served` when a
connection's handling ended.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self

PIECES = (1, 4093, 997, 13, 65521, 7, 32749)  # odd sizes, cycled, for every recv


class SlowSink:
    """``with SlowSink() as sink: ... sink.url ...``; one thread per connection, one request per connection."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, rcvbuf: int = 4096,
                 pause_after: int | None = None) -> None:
        self._tls = tls
        self._rcvbuf = rcvbuf
        self.pause_after = pause_after
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.served = threading.Event()  # set when a connection's handling ended
        self.bodies: list[bytes] = []
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        # before listen(): accepted sockets inherit it, and the window it implies is announced at connect
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._closed = False

    def __enter__(self) -> Self:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closed = True
        self.resume.set()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()  # wake accept()
        except OSError:
            pass
        self._listener.close()
        for t in self._threads:
            t.join(timeout=30)

    # -- server side ------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            conn, _ = self._listener.accept()
            if self._closed:
                conn.close()
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(60)
        try:
            conn = self._tls.wrap_socket(raw, server_side=True) if self._tls else raw
        except (OSError, ssl.SSLError):
            raw.close()
            return
        reader = _Reader(conn, self)
        got = bytearray()
        try:
            head = reader.until(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                for piece in _chunks(reader):
                    got += piece
            else:
                got += reader.exactly(int(headers.get("content-length", "0")))
            answer = json.dumps({"sha256": hashlib.sha256(got).hexdigest(), "size": len(got)}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
        except (OSError, ValueError, ssl.SSLError):
            pass  # the client went away: keep what arrived
        else:
            with self._lock:
                self.bodies.append(bytes(got))
        finally:
            with self._lock:
                self.received.append(bytes(reader.raw))
            conn.close()
            self.served.set()


class _Reader:
    """Receives in the odd sizes of :data:`PIECES`; counts body bytes to honour ``pause_after``."""

    def __init__(self, conn: socket.socket, sink: SlowSink) -> None:
        self._conn, self._sink = conn, sink
        self._pending = bytearray()
        self._sizes = iter(_cycle(PIECES))
        self.raw = bytearray()  # everything after the request head
        self._in_body = False

    def _recv(self) -> bytes:
        pause = self._sink.pause_after
        if self._in_body and pause is not None and len(self.raw) >= pause and not self._sink.resume.is_set():
            self._sink.paused.set()
            self._sink.resume.wait()
        data = self._conn.recv(next(self._sizes))
        if not data:
            raise ValueError("the peer closed the connection")
        if self._in_body:
            self.raw += data
        return data

    def until(self, marker: bytes) -> bytes:
        while marker not in self._pending:
            self._pending += self._recv()
        head, _, rest = bytes(self._pending).partition(marker)
        self._pending = bytearray(rest)
        self._in_body = True
        self.raw += rest
        return head

    def exactly(self, n: int) -> bytes:
        while len(self._pending) < n:
            self._pending += self._recv()
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self._pending:
            self._pending += self._recv()
        out, _, rest = bytes(self._pending).partition(b"\r\n")
        self._pending = bytearray(rest)
        return out


def _chunks(reader: _Reader) -> Iterator[bytes]:
    while True:
        size = int(reader.line().split(b";")[0], 16)
        if size == 0:
            reader.line()
            return
        yield reader.exactly(size)
        reader.exactly(2)


def _cycle(sizes: tuple[int, ...]) -> Iterator[int]:
    while True:
        yield from sizes
