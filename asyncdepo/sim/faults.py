"""Fault injection and byte accounting shared by every simulator.

A :class:`FaultInjector` is installed as an aiohttp middleware (``injector.middleware``) and holds a list of
:class:`FaultRule`. For each request it finds the first matching rule that is due and applies it:

* ``status`` — answer ``status`` (default 503) with a JSON error body, optionally with ``Retry-After``;
* ``drop`` — accept ``after`` bytes of the request body, then abort the connection (the handler keeps
  what it got: it reads through :meth:`FaultInjector.body`);
* ``delay`` — wait ``delay`` seconds, then handle the request normally;
* ``stall`` — hold the request until :meth:`FaultInjector.release_stalls` is called (or the client gives up);
* ``corrupt`` — flip one bit (the lowest) of body byte ``after``: damage in transit that TCP's checksum missed;
* ``slow`` — read the body in odd-sized pieces (1, 7, 127, 1021, 4093 ... bytes), waiting ``delay`` seconds
  (default: one turn of the loop) between them, so the client's socket buffers fill and its writes return
  while its bytes are still queued (the case that catches a buffer reused too early);
* ``digest`` — handle the request, then falsify the digests in the answer: every header named like a digest
  (``ETag``, ``x-amz-checksum-*``, ``Content-MD5`` ...), ``<ETag>``/``<Checksum...>`` in an XML body and every JSON
  field named like a digest (``md5``, ``md5hash``, ``etag``, ``sha256``,
  ``checksum`` ...) get one hex digit changed (:func:`falsify`): a server that stored something else;
* ``lose`` — handle the request (the server did the work), then reset the connection instead of answering:
  the lost response a client must resync after;
* ``norange`` — drop the request's ``Range`` header before the handler sees it: a server that ignores Range
  and answers 200 with the whole body.

Which requests a rule hits: ``skip`` matching requests pass first, then the next ``first`` ones are hit
(``first=0``: all of them), or, with ``every=N``, every N-th one.

Rules come from tests (``injector.add(FaultRule(...))``), from the simulator's command line
(``--fault 'PATCH /files/* drop after=1M first=2'``, see :func:`parse_rule`) and at run time from
``POST /_sim/faults`` (JSON list of rules; ``DELETE`` clears). ``GET /_sim/stats`` returns the counters:
requests and body bytes received per route (``"METHOD /path-pattern"`` as registered), so a test can
assert how much was re-sent.

A **pause point** (:meth:`FaultInjector.pause_at`) holds every request body once ``n`` body bytes arrived in
all (across requests; exactly ``n``: a read that crosses the point is split), and calls the ``on_pause``
hooks: a test kills its client there, at a byte offset it chose, instead of sleeping and hoping. The same
rules and counters drive :mod:`asyncdepo.sim.proxy`, which applies them on the wire in front of any server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import itertools
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiohttp import web

FAULT_KEY: web.RequestKey[FaultRule | None] = web.RequestKey("asyncdepo_fault", object)  # type: ignore[arg-type]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
KINDS = ("status", "drop", "delay", "stall", "corrupt", "slow", "digest", "lose", "norange")
#: piece sizes of a ``slow`` read, in turn: odd, mostly prime, never a power of two
PIECES = (1, 7, 127, 1021, 4093, 8191, 16381, 3, 65521, 509)


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
        # the pause point (see pause_at); on_pause hooks get the byte count, in the server's loop
        self._pause: int | None = None
        self._resumed = asyncio.Event()
        self._total = 0
        self.paused = False
        self.on_pause: list[Callable[[int], None]] = []

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

    def injected(self) -> int:
        """How many faults the rules have injected so far."""
        return sum(r.hits for r in self.rules)

    def reset_counters(self) -> None:
        self._total = 0
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
            "total_in": self._total,
            "paused": self.paused,
        }

    # -- request handling ----------------------------------------------------------------------------
    @staticmethod
    def route_name(request: web.Request) -> str:
        info = request.match_info.route.resource
        pattern = info.canonical if info is not None else request.path
        return f"{request.method} {pattern}"

    async def stall(self) -> None:
        """Hold the caller until :meth:`release_stalls` (the ``stall`` fault; the proxy holds through it too)."""
        self.stalled += 1
        for fn in self.on_stall:
            fn(self.stalled)
        try:
            await self._release.wait()
        finally:
            self.stalled -= 1

    def rule_for(self, method: str, path: str) -> FaultRule | None:
        """The first rule that matches ``method path`` and is due (each matching rule counts the request)."""
        for rule in self.rules:
            if rule.matches(method, path) and rule.due():
                return rule
        return None

    # -- the pause point -----------------------------------------------------------------------------
    def pause_at(self, n: int | None) -> None:
        """Hold every request body once ``n`` body bytes arrived in all (None: let them go on)."""
        self._pause = n
        if n is None:
            self._resumed.set()
        else:
            self._resumed = asyncio.Event()
            self.paused = False

    def total_in(self) -> int:
        return self._total

    def _room(self) -> int | None:
        """Bytes that may still arrive before the pause point (None: no pause point)."""
        return None if self._pause is None else max(0, self._pause - self._total)

    async def _hold(self) -> None:
        if not self.paused:
            self.paused = True
            for hook in self.on_pause:
                hook(self._total)
        await self._resumed.wait()

    def count(self, route: str, n: int) -> None:
        """Count ``n`` body bytes received on ``route`` (the proxy counts through this too)."""
        self.bytes_in[route] += n
        self._total += n

    async def admit(self, route: str, data: bytes) -> AsyncIterator[bytes]:
        """``data`` counted and let through, held at the pause point (the rest after :meth:`pause_at` None)."""
        while data:
            room = self._room()
            if room == 0:
                await self._hold()
                continue
            head, data = (data, b"") if room is None or room >= len(data) else (data[:room], data[room:])
            self.count(route, len(head))
            yield head

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return await handler(request)
        route = self.route_name(request)
        self.requests[route] += 1
        for hook in self.on_request:
            hook(route, self.requests[route])
        rule = self.rule_for(request.method, request.path)
        if rule is not None and rule.kind == "norange" and "Range" in request.headers:
            without = request.headers.copy()
            del without["Range"]
            request = request.clone(headers=without)
        request[FAULT_KEY] = rule
        if rule is not None:
            if rule.kind == "delay":
                await asyncio.sleep(rule.delay)
            elif rule.kind == "stall":
                await self.stall()
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
        if rule is not None and rule.kind == "lose":
            if request.transport is not None:
                request.transport.abort()  # the work is done; the answer never leaves
            raise ConnectionResetError("injected: the response was lost")
        if rule is not None and rule.kind == "digest" and isinstance(response, web.Response):
            body = response.body if isinstance(response.body, bytes) else b""
            for name in [h for h in response.headers if DIGEST_HEADER.search(h)]:
                response.headers[name] = falsify_text(response.headers[name])
            if body:
                response.body = falsify(body, response.content_type)
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
        kind = rule.kind if rule is not None else None
        limit = rule.after if rule is not None and kind == "drop" else None
        flip = rule.after if rule is not None and kind == "corrupt" else None
        pieces: Iterator[int] = itertools.cycle(PIECES) if kind == "slow" else itertools.repeat(chunk)
        got = 0
        while True:
            want = next(pieces)
            if rule is not None and kind == "slow":
                await asyncio.sleep(rule.delay)
            data = await request.content.read(want if limit is None else max(1, min(want, limit - got)))
            if not data:
                break
            if limit is not None and got + len(data) > limit:
                data = data[: limit - got]
            if flip is not None and got <= flip < got + len(data):
                damaged = bytearray(data)
                damaged[flip - got] ^= 0x01
                data = bytes(damaged)
            got += len(data)
            async for piece in self.admit(route, data):
                yield piece
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


# -- wrong digests --------------------------------------------------------------------------------------------
_HEX = re.compile(r"[0-9a-fA-F]")
# a JSON member named like a digest whose string value starts (maybe after an escaped quote) with a hex digit
_JSON_DIGEST = re.compile(
    rb'("[^"]*(?:md5|etag|sha\d*|crc|checksum|digest|hash)[^"]*"\s*:\s*"(?:\\")?)([0-9a-fA-F])', re.IGNORECASE)
_XML_ETAG = re.compile(rb"(<(?:ETag|Checksum[A-Za-z0-9]+|ContentMD5)>(?:&quot;|\")?)([0-9a-fA-F])")
#: response headers that carry a digest (ETag, Content-MD5, x-amz-checksum-*, Digest, Upload-Checksum ...)
DIGEST_HEADER = re.compile(r"^(?!.*algorithm).*(etag|md5|checksum|digest)", re.IGNORECASE)  # not the lists of algorithms


def falsify_text(value: str) -> str:
    """``value`` with its first hex digit changed (an ETag, a hex digest): still well-formed, now wrong."""
    m = _HEX.search(value)
    if m is None:
        return value + "0"
    digit = m.group(0)
    return value[: m.start()] + ("1" if digit == "0" else "0") + value[m.end():]


def _other(m: re.Match[bytes]) -> bytes:
    return m.group(1) + (b"1" if m.group(2) == b"0" else b"0")


def falsify(body: bytes, content_type: str) -> bytes:
    """An answer's body with its digests falsified: the first hex digit of every JSON member named like a
    digest (``md5``, ``md5hash``, ``etag``, ``sha256``, ``checksum`` ...) and of every XML ``<ETag>`` is
    changed. The length is unchanged, so a Content-Length stays right; other bodies come back as they were."""
    if "json" in content_type:
        return _JSON_DIGEST.sub(_other, body)
    if "xml" in content_type or body.lstrip().startswith(b"<?xml"):
        return _XML_ETAG.sub(_other, body)
    return body
