"""Servers for the fault suite that run beside the CLI under test: an event loop in a thread (for the fault
proxy in front of moto and ``rclone serve s3``) and a one-shot listener the stand-in ascp calls when it stalls."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread: ``run(coro)`` waits for a coroutine's result there, ``call(fn)``
    runs a function there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chaos-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 120) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def call(self, fn: Callable[[], Any]) -> None:
        done = threading.Event()

        def go() -> None:
            try:
                fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(go)
        done.wait(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


class Notified:
    """A TCP listener on 127.0.0.1 for ``ASYNCDEPO_SIM_ASCP_NOTIFY``: ``wait()`` returns the JSON line the
    first stalled ascp session sends (its byte count and pid)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def wait(self, timeout: float) -> dict[str, Any]:
        """The line of the first caller (whose connection is then closed)."""
        conn = self.accept(timeout)
        conn.close()
        return self.said

    def accept(self, timeout: float) -> socket.socket:
        """The first caller's connection, open (the caller waits until it is closed); its line in ``said``."""
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            piece = conn.recv(4096)
            if not piece:
                break
            data += piece
        self.said: dict[str, Any] = json.loads(data)
        return conn

    def close(self) -> None:
        self.sock.close()
