"""Keep-alive ``http.client`` connections shared by :mod:`asyncdepo.transport.httpget`'s worker threads.

Why not urllib3's pool: speed is not the reason. Fitted with our TLS (:mod:`asyncdepo.transport.tlsbio`)
and httpget's receive loop, it measured at par on ``benchmarks/bench_immport.py``'s pull (2026-12-04,
whole-process medians of alternated pairs, urllib3 / this pool: HTTPS CPU 0.94, wall 0.99; plain CPU
1.04-1.06, wall 0.95-1.30). But the fitting goes through urllib3's internals -- its private connection
set-up (``_new_conn``, ``is_verified``), the response's ``_fp`` -- which change between its releases, and
the socket wrapper must grow ``settimeout``/``fileno`` for its liveness checks; urllib3 used as it is
documented (its own TLS and ``readinto``) cost 1.37-1.43x the CPU (httpget's docstring). This pool is a dict
of lists under a lock.

A connection is taken for one request and given back once its response has been read to the end (and the
server did not ask to close). A request that fails on a reused connection before any response arrived
(the server closed it while it sat idle) is sent again on a fresh one: :data:`STALE` lists those errors.
"""

from __future__ import annotations

import functools
import http.client
import ssl
import threading

from asyncdepo.transport.tlsbio import BioHTTPSConnection

STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

Key = tuple[str, str, "int | None", int]  # scheme, host, port, id of the SSL context (0 for http)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """One verifying context for the process (building one loads the CA store: tens of milliseconds)."""
    return ssl.create_default_context()


class ConnectionPool:
    """Idle connections by (scheme, host, port, SSL context); at most ``max_idle`` kept per key."""

    def __init__(self, max_idle: int = 8) -> None:
        self._max_idle = max_idle
        self._idle: dict[Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(scheme: str, host: str, port: int | None, ctx: ssl.SSLContext | None) -> Key:
        return scheme, host, port, id(ctx or default_ssl_context()) if scheme == "https" else 0

    def take(self, scheme: str, host: str, port: int | None, *, timeout: float,
             ctx: ssl.SSLContext | None = None) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection (and True), or a new, not yet connected one (and False)."""
        with self._lock:
            pool = self._idle.get(self.key(scheme, host, port, ctx))
            if pool:
                return pool.pop(), True
        if scheme == "https":
            return BioHTTPSConnection(host, port, timeout=timeout, context=ctx or default_ssl_context()), False
        return http.client.HTTPConnection(host, port, timeout=timeout), False

    def give(self, scheme: str, host: str, port: int | None, conn: http.client.HTTPConnection, *,
             ctx: ssl.SSLContext | None = None) -> None:
        """Keep ``conn`` for the next request to the same place (its response must be fully read)."""
        with self._lock:
            pool = self._idle.setdefault(self.key(scheme, host, port, ctx), [])
            if len(pool) < self._max_idle:
                pool.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for pool in pools:
            for conn in pool:
                conn.close()
