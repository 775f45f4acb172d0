"""TLS for the threaded GET (:mod:`asyncdepo.transport.httpget`) through memory BIOs, not ``SSLSocket``.

Why: an ``SSLSocket`` read returns at most one TLS record (16 KiB) and OpenSSL reads each record from the
kernel in two ``read`` calls (header, then body), each with the GIL released and taken back. Measured on
2 cores with a bare loop of eight threads pulling 300 x 4 MiB over TLS from nginx with md5: 2.9 s user +
3.1 s system through ``SSLSocket``; 2.6 s user + 1.0-1.3 s system through memory BIOs, where one ``recv`` brings up to 512 KiB
of ciphertext and OpenSSL decrypts it from memory (``ssl.SSLObject``, the standard library's own
non-socket TLS, which asyncio uses too). The certificate checks are the context's, unchanged. Again on
2026-12-04, the whole ``bench_immport`` pull over nginx's TLS: urllib3 (``SSLSocket``) 1.37x the client CPU
of this route (httpget's docstring).

:class:`TLSStream` offers the few socket methods ``http.client`` calls (``sendall``, ``makefile``,
``close``...), so :class:`BioHTTPSConnection` is an ``HTTPSConnection`` in every other way, plus
:meth:`TLSStream.read_into` for bodies of known length.
"""

from __future__ import annotations

import http.client
import io
import mmap
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")
RAW = 1 << 19  # at most this much ciphertext is read from the kernel at once


class TLSStream:
    """A TLS session over a connected plain socket; the handshake runs in the constructor (blocking).

    :raises ssl.SSLCertVerificationError: the server's certificate is not trusted. :raises OSError: transport.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str | None) -> None:
        self.raw = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=hostname)
        self._view = memoryview(mmap.mmap(-1, RAW))  # page-aligned, as httpget's block buffer
        self._failed: OSError | None = None
        # readers made by makefile() still open, and whether close() was asked for: as a socket does, the
        # connection stays open while a reader needs it (http.client closes a "Connection: close" connection
        # right after reading the head, handing it over to the response, which reads the body afterwards)
        self._readers = 0
        self._closing = False
        # blocking, the kernel enforcing the timeout: one system call per receive (a Python timeout polls first)
        timeout = sock.gettimeout()
        sock.settimeout(None)
        set_timeouts(sock, timeout)
        self._io(self.tls.do_handshake)

    # -- plumbing -------------------------------------------------------------------------------------
    def _flush(self) -> None:
        data = self._out.read()
        if data:
            try:
                self.raw.sendall(data)
            except BlockingIOError:  # SO_SNDTIMEO ran out
                raise TimeoutError("timed out") from None

    def _fill(self) -> None:
        """Move what ciphertext has arrived (up to :data:`RAW`) from the kernel into the incoming BIO.

        Not ``MSG_WAITALL`` as on the plain route: a server may send close_notify and then wait for ours
        (asyncio's TLS does, for 30 s), while a receive waiting for a full block would wait for more.
        """
        try:
            n = self.raw.recv_into(self._view, RAW)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise TimeoutError("timed out") from None
        if n:
            self._in.write(self._view[:n])
        else:
            self._in.write_eof()

    def _io(self, op: Callable[..., T], *args: Any) -> T:
        """Run one TLS operation, feeding it ciphertext and sending what it produces until it completes."""
        while True:
            try:
                result = op(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            self._flush()
            return result

    def _read(self, n: int, buffer: memoryview | bytearray) -> int:
        """``SSLObject.read`` into a buffer: returns a count (typeshed knows only the bytes-returning form)."""
        return cast(int, self.tls.read(n, buffer))

    # -- the socket methods http.client uses ----------------------------------------------------------
    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self._io(self.tls.write, view)
            view = view[n:]

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        """Up to ``nbytes`` (default: the buffer's size) of plaintext; 0 at the end of the stream."""
        try:
            return self._io(self._read, nbytes or len(buffer), buffer)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0  # close_notify, or a server that just closed (as SSLSocket's suppress_ragged_eofs)

    def read_into(self, view: memoryview, n: int) -> int:
        """Fill ``view[:n]`` with plaintext, with one GIL release per record and one receive per arrival.

        Returns fewer than ``n`` bytes at the end of the stream, or when the transport failed after some bytes
        arrived: those are returned first, and the next call raises the error.
        """
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        got = 0
        while got < n:
            try:
                k = self._read(n - got, view[got:n])
                if not k:
                    return got  # close_notify arrived: the stream ends here
                got += k
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            try:
                self._fill()
            except OSError as exc:
                if not got:
                    raise
                self._failed = exc  # hand over what did arrive first: the caller writes it before failing
                return got
        return got

    def makefile(self, mode: str = "rb", buffering: int = -1, **_: Any) -> io.BufferedReader:
        if "r" not in mode or "b" not in mode:
            raise ValueError(f"TLSStream.makefile: mode {mode!r} (only binary reading)")
        self._readers += 1
        return io.BufferedReader(_Reader(self), buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        """Close the connection, or, while a reader from :meth:`makefile` is open, once the last one closes."""
        self._closing = True
        if self._readers <= 0:
            self.raw.close()

    def _reader_closed(self) -> None:
        self._readers -= 1
        if self._closing and self._readers <= 0:
            self.raw.close()


class _Reader(io.RawIOBase):
    """The raw reader under ``TLSStream.makefile``: plaintext from the session."""

    def __init__(self, stream: TLSStream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._stream.recv_into(memoryview(buffer).cast("B"))

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._stream._reader_closed()


def set_timeouts(sock: socket.socket, timeout: float | None, *, send: bool = True) -> None:
    """Let the kernel end a blocking receive (and send) after ``timeout`` seconds (None or 0: wait for ever);
    the call then fails with EAGAIN."""
    whole = int(timeout or 0)  # a timeval of (0, 0) would mean no timeout at all: keep the fraction
    value = struct.pack("ll", whole, max(1, int(((timeout or 0) - whole) * 1e6)) if timeout else 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class BioHTTPSConnection(http.client.HTTPSConnection):
    """``http.client.HTTPSConnection`` with its TLS in memory BIOs (:class:`TLSStream`); no proxy tunnels."""

    def __init__(self, host: str, port: int | None = None, *, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls_context = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP (and TCP_NODELAY) only
        assert self.sock is not None
        try:
            self.sock = TLSStream(self.sock, self._tls_context, self.host)
        except BaseException:
            self.sock.close()
            self.sock = None
            raise
