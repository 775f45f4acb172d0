"""Fault injection and byte accounting shared by every simulator.

A :class:`FaultInjector` is installed as an aiohttp middleware (``injector.middleware``) and holds a list of
:class:`FaultRule`. For each request it finds the first matching rule that is due and applies it:

* ``status`` — answer ``status`` (default 503) with a JSON error body, optionally with ``Retry-After``;
* ``drop`` — accept ``after`` bytes of the request body, then abort the connection (the handler keeps
  what it got: it reads through :meth:`FaultInjector.body`);
* ``delay`` — wait ``delay`` seconds, then handle the request normally;
* ``stall`` — hold the request until :meth:`FaultInjector.release_stalls` is called (or the client gives up).

Which requests a rule hits: ``skip`` matching requests pass first, then the next ``first`` ones are hit
(``first=0``: all of them), or, with ``every=N``, every N-th one.

Rules come from tests (``injector.add(FaultRule(...))``), from the simulator's command line
(``--fault 'PATCH /files/* drop after=1M first=2'``, see :func:`parse_rule`) and at run time from
``POST /_sim/faults`` (JSON list of rules; ``DELETE`` clears). ``GET /_sim/stats`` returns the counters:
requests and body bytes received per route (``"METHOD /path-pattern"`` as registered), so a test can
assert how much was re-sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

FAULT_KEY: web.RequestKey[FaultRule | None] = web.RequestKey("asyncdepo_fault", object)  # type: ignore[arg-type]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
KINDS = ("status", "drop", "delay", "stall")


class Dropped(Exception):
    """Raised inside a handler's body read when a ``drop`` rule cut the connection."""


@dataclasses.dataclass
class FaultRule:
    """One fault; see the module docstring for the fields' meaning."""

    kind: str
    method: str = "*"
    path: str = "*"
    status: int = 503
    retry_after: float | None = None
    after: int = 0
    delay: float = 0.0
    skip: int = 0
    first: int = 1
    every: int = 0
    seen: int = 0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def matches(self, method: str, path: str) -> bool:
        return fnmatch.fnmatchcase(method, self.method.upper()) and fnmatch.fnmatchcase(path, self.path)

    def due(self) -> bool:
        """Count one matching request and say whether this rule hits it."""
        self.seen += 1
        n = self.seen - self.skip
        if n <= 0:
            return False
        if self.every:
            hit = n % self.every == 0
        else:
            hit = self.first == 0 or n <= self.first
        if hit:
            self.hits += 1
        return hit

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SIZE = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in "KMG" else ""
    return int(float(text[: len(text) - len(unit)]) * _SIZE[unit])


def parse_rule(spec: str) -> FaultRule:
    """Parse ``'METHOD PATH KIND [key=value ...]'``, e.g. ``'PATCH /files/* drop after=1M first=2'``,
    ``'POST * status=429 retry-after=1'``, ``'* /upload/* delay=0.5 first=0'``.

    A bare ``status=N`` implies kind ``status`` and ``delay=S`` implies ``delay``.
    """
    words = spec.split()
    if len(words) < 3:
        raise ValueError(f"fault {spec!r}: expected 'METHOD PATH KIND [key=value ...]'")
    method, path, *rest = words
    fields: dict[str, Any] = {"method": method, "path": path}
    kind = None
    for word in rest:
        key, _, value = word.partition("=")
        key = key.replace("-", "_")
        if not value:
            kind = key
        elif key in ("after",):
            fields[key] = _size(value)
        elif key in ("status", "skip", "first", "every"):
            fields[key] = int(value)
            kind = kind or ("status" if key == "status" else None)
        elif key in ("delay", "retry_after"):
            fields[key] = float(value)
            kind = kind or ("delay" if key == "delay" else None)
        else:
            raise ValueError(f"fault {spec!r}: unknown field {key!r}")
    if kind is None:
        raise ValueError(f"fault {spec!r}: no kind given ({', '.join(KINDS)})")
    return FaultRule(kind=kind, **fields)


class FaultInjector:
    """Holds rules and counters; ``middleware`` applies them. One per simulator app."""

    STATS_KEY: web.AppKey[FaultInjector] = web.AppKey("faults", object)  # type: ignore[arg-type]

    def __init__(self, rules: list[FaultRule] | None = None) -> None:
        self.rules: list[FaultRule] = list(rules or [])
        self.bytes_in: defaultdict[str, int] = defaultdict(int)
        self.requests: defaultdict[str, int] = defaultdict(int)
        self.statuses: defaultdict[str, int] = defaultdict(int)
        self._release = asyncio.Event()
        self.stalled = 0
        # called (in the server's loop) each time a request starts stalling, with the stalled count;
        # tests use it to wake a waiter instead of polling
        self.on_stall: list[Callable[[int], None]] = []
        # called (in the server's loop) as each request is counted, with its route and the route's count,
        # before the handler runs; tests wait on it instead of polling the counters
        self.on_request: list[Callable[[str, int], None]] = []

    # -- configuration -------------------------------------------------------------------------------
    def add(self, rule: FaultRule | str) -> FaultRule:
        rule = parse_rule(rule) if isinstance(rule, str) else rule
        if rule.kind == "stall":
            self._release.clear()
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def release_stalls(self) -> None:
        """Let every stalled request go on (and stop stalling new ones until a new stall rule)."""
        self._release.set()

    def reset_counters(self) -> None:
        self.bytes_in.clear()
        self.requests.clear()
        self.statuses.clear()

    def total_bytes(self, prefix: str = "") -> int:
        """Body bytes received on routes whose name starts with ``prefix`` (e.g. ``"PATCH"``)."""
        return sum(v for k, v in self.bytes_in.items() if k.startswith(prefix))

    def snapshot(self) -> dict[str, Any]:
        return {
            "bytes_in": dict(self.bytes_in),
            "requests": dict(self.requests),
            "statuses": dict(self.statuses),
            "rules": [r.to_json() for r in self.rules],
            "stalled": self.stalled,
        }

    # -- request handling ----------------------------------------------------------------------------
    @staticmethod
    def route_name(request: web.Request) -> str:
        info = request.match_info.route.resource
        pattern = info.canonical if info is not None else request.path
        return f"{request.method} {pattern}"

    def _rule_for(self, request: web.Request) -> FaultRule | None:
        for rule in self.rules:
            if rule.matches(request.method, request.path) and rule.due():
                return rule
        return None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        route = self.route_name(request)
        self.requests[route] += 1
        for hook in self.on_request:
            hook(route, self.requests[route])
        rule = self._rule_for(request)
        request[FAULT_KEY] = rule
        if rule is not None:
            if rule.kind == "delay":
                await asyncio.sleep(rule.delay)
            elif rule.kind == "stall":
                self.stalled += 1
                for fn in self.on_stall:
                    fn(self.stalled)
                try:
                    await self._release.wait()
                finally:
                    self.stalled -= 1
            elif rule.kind == "status":
                await self._drain(request, route)
                headers = {}
                if rule.retry_after is not None:
                    headers["Retry-After"] = f"{rule.retry_after:g}"
                self.statuses[route] += 1
                return web.json_response(
                    {"error": f"injected fault: HTTP {rule.status}"}, status=rule.status, headers=headers
                )
        response = await handler(request)
        return response

    async def _drain(self, request: web.Request, route: str) -> None:
        """Read and count the body of a request we answer with an injected status."""
        async for _ in self.body(request):
            pass

    async def body(self, request: web.Request, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
        """The request body, counted per route; a ``drop`` rule cuts it after ``after`` bytes.

        :raises Dropped: after the connection was aborted by a drop rule (the bytes before it were yielded).
        """
        route = self.route_name(request)
        rule: FaultRule | None = request.get(FAULT_KEY)
        limit = rule.after if rule is not None and rule.kind == "drop" else None
        got = 0
        while True:
            data = await request.content.read(chunk if limit is None else max(1, min(chunk, limit - got)))
            if not data:
                break
            if limit is not None and got + len(data) > limit:
                data = data[: limit - got]
            got += len(data)
            self.bytes_in[route] += len(data)
            if data:
                yield data
            if limit is not None and got >= limit:
                transport = request.transport
                if transport is not None:
                    transport.abort()
                raise Dropped(f"injected drop after {got} bytes")

    async def read_all(self, request: web.Request, limit: int = 64 << 20) -> bytes:
        """The whole (small) body, counted; for JSON and form requests."""
        parts = []
        size = 0
        async for data in self.body(request):
            size += len(data)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            parts.append(data)
        return b"".join(parts)

    # -- control routes ------------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        """Mount ``/_sim/stats`` and ``/_sim/faults`` on ``app``."""

        async def stats(_: web.Request) -> web.Response:
            return web.json_response(self.snapshot(), dumps=lambda o: orjson.dumps(o).decode())

        async def set_faults(request: web.Request) -> web.Response:
            rules = await request.json()
            for r in rules:
                self.add(r if isinstance(r, str) else FaultRule(**r))
            return web.json_response({"rules": len(self.rules)})

        async def clear_faults(_: web.Request) -> web.Response:
            self.clear()
            self.release_stalls()
            return web.json_response({"rules": 0})

        async def reset(_: web.Request) -> web.Response:
            self.reset_counters()
            return web.json_response({})

        app.router.add_get("/_sim/stats", stats)
        app.router.add_post("/_sim/faults", set_faults)
        app.router.add_delete("/_sim/faults", clear_faults)
        app.router.add_post("/_sim/reset", reset)
