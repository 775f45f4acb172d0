"""How the stand-in ascp talks: console writes, scp-style sizes and progress lines, management frames.

Contract: :func:`out` writes to stdout and :func:`err` writes a line to stderr, both flushed at once and
silent when the reader has gone (a closed pipe is not an error for a child: the stream is then pointed at
``/dev/null``, so later writes and the flush at exit cost nothing and raise nothing). :func:`fmt_size` and
:func:`progress_line` format what real ascp prints (see :mod:`asyncdepo.transport.ascp.console` for the
reader's side). :class:`Manager` connects to ``127.0.0.1:port`` when ``-M port`` was given (raising
``OSError`` when it cannot) and writes ``FASPMGR 2`` frames with escaped values; once the connection
fails it stops sending rather than failing the transfer. Nothing here ever receives a secret.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TextIO

__all__ = ("Manager", "err", "fmt_size", "out", "progress_line")


def out(text: str) -> None:
    _write(sys.stdout, text)


def err(text: str) -> None:
    _write(sys.stderr, text + "\n")


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except ConnectionError:  # the reader went away (EPIPE; a socket may say ECONNRESET): nothing left to tell
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def fmt_size(n: int) -> str:
    """scp-style: whole units, next unit from 10000 on (ascp truncates: 1523228 -> ``1487KB``)."""
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 10000 and i < len(units) - 1:
        n //= 1024
        i += 1
    return f"{n}{units[i]}"


def progress_line(name: str, done: int, size: int, rate_bps: float, eta: float | None) -> str:
    pct = 100 if size == 0 else done * 100 // size
    rate = f"{rate_bps / 1e6:.1f}Mb/s" if rate_bps else ""
    when = "--:--" if eta is None else f"{int(eta) // 60:02d}:{int(eta) % 60:02d} ETA"
    return f"{name:<45} {pct:3d}% {fmt_size(done):>6} {rate:>9}    {when}"


class Manager:
    """The management-port connection (``-M``): frames ``FASPMGR 2`` / ``Key: Value`` / blank line."""

    def __init__(self, port: int | None) -> None:
        self.sock: socket.socket | None = None
        if port is not None:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, kind: str, **fields: object) -> None:
        if self.sock is None:
            return
        body = "".join(f"{k}: {_escape(str(v))}\n" for k, v in fields.items())
        try:
            self.sock.sendall(f"FASPMGR 2\nType: {kind}\n{body}\n".encode())
        except OSError:
            self.sock = None


def _escape(value: str) -> str:
    """A management-frame value as ascp writes it: ESC doubled, newline and CR as ESC n / ESC r."""
    return value.replace("\x1b", "\x1b\x1b").replace("\n", "\x1bn").replace("\r", "\x1br")
