"""Running a simulator: in the current event loop (tests), in a thread of its own (the demo), or as
``asyncdepo sim NAME`` in the foreground.

Every simulator module in ``asyncdepo.sim`` provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None   # its own flags (besides --port/--root/--fault)
    def build_app(root: Path, faults: FaultInjector, args: argparse.Namespace | None) -> web.Application

and is listed in :data:`SIMULATORS`. ``build_app`` must install ``faults.middleware`` and call
``faults.add_routes(app)``; :func:`make_app` does both around the simulator's own routes. A module that is no
web application (the fault proxy, :mod:`asyncdepo.sim.proxy`) provides ``serve(args) -> int`` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

from aiohttp import web

from asyncdepo.sim.faults import FaultInjector, parse_rule

SIMULATORS: dict[str, str] = {
    "tus": "asyncdepo.sim.tus",
    "pdis": "asyncdepo.sim.pdis",
    "gypsum": "asyncdepo.sim.gypsum",
    "empiar": "asyncdepo.sim.empiar",
    "globus": "asyncdepo.sim.globus",
    "immport": "asyncdepo.sim.immport",
    "proxy": "asyncdepo.sim.proxy",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAULTS_KEY: web.AppKey[FaultInjector] = web.AppKey("asyncdepo_faults", FaultInjector)


@web.middleware
async def forwarded_proto(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Behind a TLS-terminating proxy (``X-Forwarded-Proto: https``) the URLs a simulator hands out say https.

    The proxy passes the client's Host header on, so ``request.url`` names the proxy; only the scheme is lost.
    """
    proto = request.headers.get("X-Forwarded-Proto", "").lower()
    if proto in ("http", "https") and proto != request.scheme:
        request = request.clone(scheme=proto)
    return await handler(request)


def make_app(faults: FaultInjector, *, client_max_size: int = 1 << 30) -> web.Application:
    """An Application with the fault middleware and the ``/_sim/`` control routes installed."""
    app = web.Application(middlewares=[forwarded_proto, faults.middleware], client_max_size=client_max_size)
    app[FAULTS_KEY] = faults
    faults.add_routes(app)
    return app


def load(name: str) -> ModuleType:
    """The simulator module called ``name``; raises KeyError with the known names."""
    if name not in SIMULATORS:
        raise KeyError(f"unknown simulator {name!r}; known: {', '.join(sorted(SIMULATORS))}")
    return importlib.import_module(SIMULATORS[name])


class SimServer:
    """An aiohttp app listening on 127.0.0.1 in the running loop: ``async with SimServer(app) as s: s.url``.

    With ``ssl_context`` it serves HTTPS (the URLs it hands out say https too: they come from the request).
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def faults(self) -> FaultInjector:
        return self.app[FAULTS_KEY]

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        addresses = self._runner.addresses  # (host, port, ...) of each bound socket
        if self.port == 0 and addresses:  # the port the OS chose when 0 was asked for
            self.port = int(addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class ThreadedSim:
    """A simulator in a thread with its own event loop, so the caller's loop stays free (demo, CLI tests).

    ``with ThreadedSim(lambda: build_app(...)) as sim: sim.url``
    """

    def __init__(self, factory: Callable[[], web.Application], port: int = 0) -> None:
        self._factory = factory
        self._port = port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: SimServer | None = None
        self._thread = threading.Thread(target=self._run, name="asyncdepo-sim", daemon=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                self.server = await SimServer(self._factory(), port=self._port).start()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the starting thread by __enter__
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.stop()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in the simulator's loop (e.g. to change faults)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn)

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--root", type=Path, help="directory holding the simulator's storage (required, but by "
                        "the proxy)")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="RULE",
        help="inject a fault: 'METHOD PATH KIND [key=value ...]', e.g. "
        "'PATCH /files/* drop after=1M first=2' or 'POST * status=429 retry-after=1' (repeatable)",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="serve HTTPS with this certificate (chain) in PEM; needs --tls-key. Clients trust a "
                        "self-signed one through SSL_CERT_FILE (asyncdepo, Python) or --cacert (curl)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert, in PEM")


def server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert``/``--tls-key``, or None for plain HTTP."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SystemExit("asyncdepo sim: --tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"asyncdepo sim: cannot load the TLS certificate {cert} and key {key}: {exc}") from None
    return ctx


def serve_forever(name: str, args: argparse.Namespace) -> int:
    """``asyncdepo sim NAME``: build the app from ``args`` and serve until interrupted."""
    module = load(name)
    if hasattr(module, "serve"):
        return int(module.serve(args))
    if args.root is None:
        raise SystemExit(f"asyncdepo sim {name}: --root DIR is required (where the simulator keeps its storage)")
    faults = FaultInjector([parse_rule(r) for r in args.fault])
    tls = server_tls(args)
    args.root.mkdir(parents=True, exist_ok=True)
    app = module.build_app(args.root, faults, args)

    async def main() -> None:
        server = SimServer(app, host=args.host, port=args.port, ssl_context=tls)
        await server.start()
        print(f"asyncdepo sim {name} listening on {server.url} (storage {args.root})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        with asyncio.Runner(loop_factory=_tls_loop() if tls is not None else None) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def _tls_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, for serving TLS: measured on 2 cores, 300 x 4 MiB to curl came out at about
    240 MB/s on uvloop against 77 MB/s on asyncio's own loop (whose TLS goes through sslproto in Python)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

