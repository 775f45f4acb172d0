"""Shared pieces of the gypsum simulator: configuration, state, errors and request helpers.

* :class:`GypsumError` is raised by handlers and turned by :func:`error_middleware` into the real server's
  error shape, ``{"status": "error", "reason": "..."}`` with the given HTTP status.
* :class:`SimConfig` holds what the command line configures: GitHub identities (token -> login and
  organisations; no network is ever used), administrators, the presigned-URL lifetime.
* :class:`GypsumState` is the app's state: the bucket, one ``asyncio.Lock`` per project serialising
  every handler that changes the project (the ``..LOCK`` object is the user-visible upload lock; the
  asyncio lock only makes each handler's read-check-write atomic), a clock the tests can move, and counters.
* Path parameters are taken from the raw path and decoded with ``unquote_plus``: gypsum-client quotes with
  ``quote_plus`` (a space becomes '+', a '+' becomes '%2B'), other clients with ``quote`` ('%20'); both
  decode correctly this way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web

from asyncdepo.sim.gypsum_store import Bucket
from asyncdepo.sim.server import FAULTS_KEY


class GypsumError(Exception):
    """An error answered as ``{"status": "error", "reason": reason}`` with HTTP ``status``."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclasses.dataclass(frozen=True)
class Identity:
    """What GitHub would say about a token: the user's login and organisations."""

    login: str
    orgs: tuple[str, ...] = ()

    def ids(self) -> set[str]:
        return {self.login, *self.orgs}


@dataclasses.dataclass
class SimConfig:
    """Simulator configuration (see ``gypsum.add_arguments`` for the flags)."""

    identities: dict[str, Identity] = dataclasses.field(default_factory=dict)
    admins: tuple[str, ...] = ()
    presign_lifetime: float = 3600.0
    expire_first: int = 0
    secret: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32))


def parse_identity(spec: str) -> tuple[str, Identity]:
    """``TOKEN=user[:org1,org2]`` -> (token, Identity).

    :raises ValueError: the spec has no '=' or no user.
    """
    token, sep, rest = spec.strip().partition("=")
    login, _, orgs = rest.partition(":")
    if not sep or not token or not login:
        raise ValueError(f"identity {spec!r}: expected TOKEN=user[:org1,org2]")
    return token, Identity(login, tuple(o for o in orgs.split(",") if o))


def parse_identities_text(text: str) -> dict[str, Identity]:
    """An identities file: a JSON object ``{token: {"login": ..., "orgs": [...]}}`` (or ``token: "login"``),
    or lines of ``TOKEN=user[:org1,org2]`` (blank lines and '#' comments ignored)."""
    text = text.strip()
    out: dict[str, Identity] = {}
    if text.startswith("{"):
        for token, value in orjson.loads(text).items():
            if isinstance(value, str):
                out[token] = Identity(value)
            else:
                out[token] = Identity(str(value["login"]), tuple(value.get("orgs", ())))
        return out
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            token, ident = parse_identity(line)
            out[token] = ident
    return out


class GypsumState:
    """Everything the handlers share; one per app."""

    def __init__(self, bucket: Bucket, config: SimConfig) -> None:
        self.bucket = bucket
        self.config = config
        self.clock_offset = 0.0
        self.expire_next = config.expire_first
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.counters: defaultdict[str, int] = defaultdict(int)

    def now(self) -> float:
        """The simulator's clock (wall time plus an offset tests may move with ``/_sim/gypsum/clock``)."""
        return time.time() + self.clock_offset

    def project_lock(self, project: str) -> asyncio.Lock:
        return self._locks[project]

    def identify(self, token: str) -> Identity:
        """The identity behind a GitHub token.

        :raises GypsumError: 401 when the token is unknown (as GitHub's 401 makes the real server answer).
        """
        ident = self.config.identities.get(token)
        if ident is None:
            raise GypsumError("failed to identify the GitHub user from the token", 401)
        return ident

    def is_admin(self, ident: Identity) -> bool:
        return bool(ident.ids() & set(self.config.admins))

    def sign(self, *parts: str) -> str:
        """An HMAC-like signature over ``parts`` with the simulator's secret (for presigned URLs)."""
        digest = hashlib.sha256(self.config.secret)
        for part in parts:
            digest.update(b"\x00" + part.encode())
        return digest.hexdigest()


STATE_KEY: web.AppKey[GypsumState] = web.AppKey("gypsum_state", GypsumState)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def state_of(request: web.Request) -> GypsumState:
    return request.app[STATE_KEY]


def error_response(reason: str, status: int) -> web.Response:
    return web.json_response({"status": "error", "reason": reason}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map GypsumError (and unexpected exceptions) to the server's JSON error shape."""
    try:
        return await handler(request)
    except GypsumError as exc:
        return error_response(exc.reason, exc.status)
    except web.HTTPException as exc:
        if exc.status >= 400 and not request.path.startswith("/_sim/"):
            return error_response(exc.reason, exc.status)
        raise


def bearer_token(request: web.Request) -> str:
    """The token of ``Authorization: Bearer <token>``.

    :raises GypsumError: 401 "no user identity supplied".
    """
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise GypsumError("no user identity supplied", 401)
    return auth[7:].strip()


def raw_params(request: web.Request, skip: int, count: int | None = None) -> list[str]:
    """Path segments after the first ``skip`` ones, each decoded with ``unquote_plus`` (see module doc)."""
    raw = request.raw_path.split("?", 1)[0]
    segments = raw.split("/")[1 + skip :]
    if count is not None and len(segments) != count:
        raise GypsumError("unexpected number of path components", 404)
    return [unquote_plus(s) for s in segments]


def check_names(**names: str) -> None:
    """Project/asset/version names: non-empty, no '/' or '\\', not starting with '..'.

    :raises GypsumError: 400 naming the offending field.
    """
    for field, value in names.items():
        if not value:
            raise GypsumError(f"{field} name cannot be empty", 400)
        if "/" in value or "\\" in value:
            raise GypsumError(f"{field} name cannot contain '/' or '\\'", 400)
        if value.startswith(".."):
            raise GypsumError(f"{field} name cannot start with the reserved '..'", 400)


async def json_body(request: web.Request) -> Any:
    """The request's JSON body, read through the fault injector so it is counted.

    :raises GypsumError: 400 when the body is not JSON.
    """
    data = await request.app[FAULTS_KEY].read_all(request, limit=256 << 20)
    if not data.strip():
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise GypsumError(f"failed to parse JSON body; {exc}", 400) from None


def ok(body: dict[str, Any] | list[Any] | None = None, status: int = 200) -> web.Response:
    if body is None:
        return web.Response(status=status)
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())
