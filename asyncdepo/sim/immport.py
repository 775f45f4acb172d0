"""A faithful local stand-in for ImmPort's shared-data download API (``asyncdepo sim immport``).

Storage (:mod:`asyncdepo.sim.immport_store`) is a directory of studies, ``ROOT/SDYnnn/...``; every regular
file under it is a shared file whose ImmPort path is ``/SDYnnn/...``. Names starting with ``.`` are hidden,
and a sidecar ``NAME.sim-md5`` (holding 32 hex digits) overrides the ``generatedMD5`` the manifest publishes
for ``NAME``, so a test can simulate a corrupted file. File bodies are sent by
:mod:`asyncdepo.sim.immport_files`.

Routes (one server plays both ``auth.immport.org`` and ``api.immport.org``):

* ``POST /auth/token`` form ``username``, ``password`` -> ``{"status", "token", "access_token",
  "token_type", "expires_in"}``; 401 ``{"error", "message"}`` for bad credentials. A token expires
  ``--token-lifetime`` seconds after it was issued (clock: ``ImmportSim.clock``, injectable) or after
  ``--token-uses`` authenticated requests, whichever comes first; an expired token gets 401
  ``{"error": "invalid_token", "message": "Access token expired"}``.
* ``POST /data/download/token`` (Bearer) ``{"paths": [...]}`` -> ``{"token": <aspera token>}``, valid only for
  those paths (a directory covers what is under it); 404 ``{"error", "message"}`` for a missing path.
* ``POST /data/list`` (Bearer) ``{"path": "/SDY1/ResultFiles"}`` -> ``{"self", "items", "item_count",
  "total_count", "parameters"}`` as the real API (items: path, basename, type, size, mtime, permissions,
  fileCount for directories).
* ``GET /data/query/api/study/manifest/{SDY}`` (Bearer) -> ``[{fileUUID, path, fileName, generatedMD5,
  filesizeBytes}]`` (``path`` is the file's full ImmPort path).
* ``GET /data/query/drs/download/{s3|stream}/{uuid}`` (Bearer) -> ``{"message", "url", "status"}``; the url is
  signed in its query (no Authorization header is needed, nor wanted, to fetch it).
* ``GET /_s3/immport-shared/{path}`` and ``GET /data/query/drs/stream/{uuid}``: the signed file URLs, with
  HTTP Range (206 + Content-Range; 416 + ``Content-Range: bytes */size`` past the end). Response body bytes
  actually written are counted per route in ``bytes_out``, exposed in ``GET /_sim/stats`` beside the fault
  injector's own counters. A ``drop`` fault rule on these routes sends ``after`` bytes of the *response*,
  then aborts the connection (the injector's request-body drop has nothing to cut on a GET); a ``corrupt``
  rule flips the lowest bit of response byte ``after``.
* ``POST /_sim/aspera/check`` ``{"token", "paths"}``: 200 when the Aspera token covers every path, 401
  otherwise; the stand-in ascp calls it (``ASYNCDEPO_SIM_ASCP_TOKEN_URL``) before moving any byte.
* ``POST /_sim/immport/expire``: expire every bearer token now (a cross-process way to force renewal).
* ``POST /_sim/immport/hold`` ``{"after": N, "requests": K}``: every file response pauses mid-body once N
  response bytes went out in all and K file GETs arrived (``DELETE`` releases them) — a test kills its
  client there, holding complete and partial files.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import orjson
from aiohttp import web

from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport_files import error_response as _error
from asyncdepo.sim.immport_files import json_response as _json
from asyncdepo.sim.immport_files import serve_file
from asyncdepo.sim.immport_store import MD5_SIDECAR, StudyStore, file_uuid, is_hidden, norm_path, write_study
from asyncdepo.sim.server import make_app

BUCKET = "immport-shared"
PERMISSIONS = [{"name": "view"}]
DEFAULT_USER = ("demo", "demo")

# the storage half (studies, manifests, write_study) lives in immport_store, file bodies in immport_files
__all__ = ("BUCKET", "DEFAULT_USER", "IMMPORT_KEY", "MD5_SIDECAR", "ImmportSim", "add_arguments", "build_app",
           "file_uuid", "write_study")


@dataclasses.dataclass
class _Token:
    user: str
    expires_at: float
    uses_left: int | None


def _iso(mtime: float) -> str:
    return _dt.datetime.fromtimestamp(mtime, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ImmportSim(StudyStore):
    """The simulator's state: users, tokens, md5 cache and byte counters. ``app[IMMPORT_KEY]`` in tests."""

    def __init__(self, root: Path, faults: FaultInjector, *, users: dict[str, str] | None = None,
                 token_lifetime: float = 60.0, token_uses: int | None = None, url_lifetime: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(root)
        self.faults = faults
        self.users = dict(users or {DEFAULT_USER[0]: DEFAULT_USER[1]})
        self.token_lifetime = token_lifetime
        self.token_uses = token_uses
        self.url_lifetime = url_lifetime
        self.clock = clock  # tests replace it to expire tokens without sleeping
        self.tokens: dict[str, _Token] = {}
        self.aspera_tokens: dict[str, tuple[str, ...]] = {}
        self.bytes_out: defaultdict[str, int] = defaultdict(int)
        self.events: defaultdict[str, int] = defaultdict(int)  # tokens_issued, auth_failed, token_expired...
        self._secret = secrets.token_bytes(16)
        # hold(): file responses pause mid-body once this many bytes went out, so a test can kill a
        # client at a point where it holds partial files; ``held`` is a threading.Event (ThreadedSim).
        self.hold_after: int | None = None
        self.hold_requests = 0
        self.file_gets = 0
        self.held = threading.Event()
        # called in the simulator's loop when a response pauses at the hold point (in-process tests wait on it)
        self.on_hold: list[Callable[[], None]] = []
        self._resume = asyncio.Event()

    # -- tokens --------------------------------------------------------------------------------------
    def issue(self, user: str) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = _Token(user, self.clock() + self.token_lifetime, self.token_uses)
        self.events["tokens_issued"] += 1
        return token

    def expire_all(self) -> None:
        """Expire every bearer token now."""
        for tok in self.tokens.values():
            tok.expires_at = float("-inf")

    def authorize(self, request: web.Request) -> web.Response | None:
        """None when the request carries a live bearer token (one use is counted), else the 401 to send."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            self.events["auth_missing"] += 1
            return _error(401, "unauthorized", "Full authentication is required to access this resource")
        tok = self.tokens.get(token.strip())
        if tok is None:
            self.events["auth_invalid"] += 1
            return _error(401, "invalid_token", "Invalid access token",
                          **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if self.clock() >= tok.expires_at or tok.uses_left == 0:
            self.events["token_expired"] += 1
            return _error(401, "invalid_token", "Access token expired",
                          **{"WWW-Authenticate": 'Bearer error="invalid_token", '
                             'error_description="The access token expired"'})
        if tok.uses_left is not None:
            tok.uses_left -= 1
        return None

    # -- signed URLs ---------------------------------------------------------------------------------
    def sign(self, what: str, expires: int) -> str:
        return hmac.new(self._secret, f"{what}|{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_ok(self, what: str, request: web.Request) -> bool:
        try:
            expires = int(request.query.get("X-Amz-Expires-At", ""))
        except ValueError:
            return False
        sig = request.query.get("X-Amz-Signature", "")
        return expires > self.clock() and hmac.compare_digest(sig, self.sign(what, expires))

    def hold(self, after: int | None, requests: int = 0) -> None:
        """Pause every file response (mid-body) once ``after`` response bytes were sent in all and at least
        ``requests`` file GETs arrived; None releases them. A client with N workers that fetch one file at
        a time has finished (and renamed) ``requests - N`` files when the ``requests``-th GET arrives."""
        self.hold_after, self.hold_requests = after, requests
        if after is None:
            self._resume.set()
        else:
            self.held.clear()
            self._resume = asyncio.Event()

    async def maybe_hold(self) -> None:
        if (self.hold_after is not None and self.file_gets >= self.hold_requests
                and sum(self.bytes_out.values()) >= self.hold_after):
            self.events["held"] += 1
            self.held.set()
            for hook in self.on_hold:
                hook()
            await self._resume.wait()

    def snapshot(self) -> dict[str, Any]:
        return {"bytes_out": dict(self.bytes_out), "immport": dict(self.events),
                "live_tokens": sum(1 for t in self.tokens.values() if t.expires_at > self.clock())}

    def reset(self) -> None:
        self.file_gets = 0
        self.bytes_out.clear()
        self.events.clear()


IMMPORT_KEY: web.AppKey[ImmportSim] = web.AppKey("immport_sim", ImmportSim)


async def _json_body(request: web.Request, sim: ImmportSim) -> Any:
    raw = await sim.faults.read_all(request)
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(body=orjson.dumps({"error": "Bad Request", "message": "body is not JSON"}),
                                 content_type="application/json") from None


def _routes(app: web.Application, sim: ImmportSim) -> None:
    async def auth_token(request: web.Request) -> web.Response:
        form = parse_qs((await sim.faults.read_all(request)).decode("utf-8", "replace"))
        user = (form.get("username") or [""])[0]
        password = (form.get("password") or [""])[0]
        sim.events["auth_requests"] += 1
        if not user or sim.users.get(user) is None or not hmac.compare_digest(sim.users[user], password):
            sim.events["auth_failed"] += 1
            return _error(401, "invalid_grant", "Bad credentials: invalid username or password")
        token = sim.issue(user)
        return _json({"status": 200, "token": token, "access_token": token, "token_type": "bearer",
                      "expires_in": int(sim.token_lifetime)})

    async def aspera_token(request: web.Request) -> web.Response:
        body = await _json_body(request, sim)
        if (denied := sim.authorize(request)) is not None:
            return denied
        paths = body.get("paths") if isinstance(body, dict) else None
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            return _error(400, "Bad Request", 'expected {"paths": ["/SDY.../file", ...]}')
        norm = []
        for p in paths:
            if sim.resolve(p) is None:
                return _error(404, "Not Found", f"Path not found: {p}")
            norm.append(norm_path(p) or "")
        token = "ATV3_" + secrets.token_urlsafe(32)
        sim.aspera_tokens[token] = tuple(norm)
        sim.events["aspera_tokens_issued"] += 1
        return _json({"token": token})

    async def data_list(request: web.Request) -> web.Response:
        body = await _json_body(request, sim)
        if (denied := sim.authorize(request)) is not None:
            return denied
        path = body.get("path") if isinstance(body, dict) else None
        local = sim.resolve(path) if isinstance(path, str) else None
        if local is None or not isinstance(path, str):
            return _error(404, "Not Found", f"Path not found: {path}")

        def entry(p: Path) -> dict[str, Any]:
            st = p.stat()
            rel = p.relative_to(sim.root).as_posix()
            out: dict[str, Any] = {"path": "/" + rel if rel != "." else "/", "basename": p.name,
                                   "type": "directory" if p.is_dir() else "file",
                                   "size": st.st_size if p.is_file() else 0,
                                   "mtime": _iso(st.st_mtime), "permissions": PERMISSIONS}
            if p.is_dir():
                files = list(sim.walk(rel if rel != "." else ""))
                out["size"] = sum(s.st_size for _, s in files)
                out["fileCount"] = len(files)
            return out

        items = [] if local.is_file() else [
            entry(c) for c in sorted(local.iterdir())
            if not is_hidden(c.name) and (c.is_file() or c.is_dir())]
        return _json({"self": entry(local), "items": items, "item_count": len(items),
                      "total_count": len(items), "parameters": {"path": path}})

    async def manifest(request: web.Request) -> web.Response:
        if (denied := sim.authorize(request)) is not None:
            return denied
        study = request.match_info["study"]
        if norm_path(study) != study or not (sim.root / study).is_dir():
            return _error(404, "Not Found", f"Study {study} not found")
        rows = await asyncio.get_running_loop().run_in_executor(None, sim.manifest, study)
        return _json(rows)

    async def drs(request: web.Request) -> web.Response:
        if (denied := sim.authorize(request)) is not None:
            return denied
        kind, uid = request.match_info["kind"], request.match_info["uuid"]
        if kind not in ("s3", "stream"):
            return _json({"message": f"Unknown access method {kind}", "url": None, "status": 400}, 400)
        rel = sim.by_uuid(uid)
        if rel is None:
            return _json({"message": f"File not found for {uid}", "url": None, "status": 404}, 404)
        expires = int(sim.clock() + sim.url_lifetime)
        what = rel if kind == "s3" else uid
        path = f"/_s3/{BUCKET}/{quote(rel)}" if kind == "s3" else f"/data/query/drs/stream/{uid}"
        url = (f"{request.url.origin()}{path}?X-Amz-Expires-At={expires}"
               f"&X-Amz-Signature={sim.sign(what, expires)}")
        return _json({"message": "success", "url": url, "status": 200})

    async def s3_object(request: web.Request) -> web.StreamResponse:
        rel = norm_path(request.match_info["key"])
        if rel is None or not sim.signed_ok(rel, request):
            return _error(403, "AccessDenied", "Request has expired or the signature does not match")
        return await serve_file(request, sim, rel)

    async def stream(request: web.Request) -> web.StreamResponse:
        uid = request.match_info["uuid"]
        rel = sim.by_uuid(uid)
        if rel is None or not sim.signed_ok(uid, request):
            return _error(403, "AccessDenied", "Request has expired or the signature does not match")
        return await serve_file(request, sim, rel)

    async def aspera_check(request: web.Request) -> web.Response:
        body = await request.json()
        allowed = sim.aspera_tokens.get(str(body.get("token", "")))
        paths = [norm_path(str(p)) for p in body.get("paths", [])]
        if allowed is None:
            return _error(401, "unauthorized", "failed to authenticate: unknown token")
        for p in paths:
            if p is None or not any(a == "" or p == a or p.startswith(a + "/") for a in allowed):
                return _error(401, "unauthorized", f"token not valid for {p}")
        sim.events["aspera_sessions"] += 1
        return _json({"ok": True})

    async def expire(_: web.Request) -> web.Response:
        sim.expire_all()
        return _json({"expired": len(sim.tokens)})

    async def hold(request: web.Request) -> web.Response:
        body = await request.json() if request.method == "POST" else {}
        after = body.get("after", 0) if request.method == "POST" else None
        sim.hold(None if after is None else int(after), int(body.get("requests", 0)))
        return _json({"after": after, "requests": sim.hold_requests})

    app.router.add_post("/auth/token", auth_token)
    app.router.add_post("/data/download/token", aspera_token)
    app.router.add_post("/data/list", data_list)
    app.router.add_get("/data/query/api/study/manifest/{study}", manifest)
    app.router.add_get("/data/query/drs/download/{kind}/{uuid}", drs)
    app.router.add_get("/data/query/drs/stream/{uuid}", stream)
    app.router.add_get("/_s3/" + BUCKET + "/{key:[\\s\\S]+}", s3_object)
    app.router.add_post("/_sim/aspera/check", aspera_check)
    app.router.add_post("/_sim/immport/expire", expire)
    app.router.add_post("/_sim/immport/hold", hold)
    app.router.add_delete("/_sim/immport/hold", hold)


def _parse_user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
    return name, password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's own flags (besides --port/--root/--fault)."""
    parser.add_argument("--user", action="append", type=_parse_user, default=[], metavar="NAME:PASSWORD",
                        help="an account that may log in (repeatable; default demo:demo)")
    parser.add_argument("--token-lifetime", type=float, default=60.0, metavar="SECONDS",
                        help="bearer tokens expire this long after they were issued (default 60)")
    parser.add_argument("--token-uses", type=int, default=None, metavar="N",
                        help="bearer tokens also expire after N authenticated requests (default: no limit)")
    parser.add_argument("--url-lifetime", type=float, default=7 * 86400.0, metavar="SECONDS",
                        help="signed DRS URLs expire after this long (default 7 days, as ImmPort's S3 URLs)")


def build_app(root: Path, faults: FaultInjector, args: argparse.Namespace | None) -> web.Application:
    """The ImmPort simulator serving the studies under ``root``; its state is ``app[IMMPORT_KEY]``."""
    users = dict(getattr(args, "user", None) or []) or None
    sim = ImmportSim(root, faults, users=users, token_lifetime=getattr(args, "token_lifetime", 60.0),
                     token_uses=getattr(args, "token_uses", None),
                     url_lifetime=getattr(args, "url_lifetime", 7 * 86400.0))
    app = make_app(faults)
    app[IMMPORT_KEY] = sim
    # /_sim/stats and /_sim/reset belong to the injector; extend what they report and reset with our
    # response-byte counters (the injector counts request bodies only) without touching faults.py.
    base_snapshot, base_reset = faults.snapshot, faults.reset_counters

    def snapshot() -> dict[str, Any]:
        return {**base_snapshot(), **sim.snapshot()}

    def reset_counters() -> None:
        base_reset()
        sim.reset()

    faults.snapshot = snapshot  # type: ignore[method-assign]
    faults.reset_counters = reset_counters  # type: ignore[method-assign]
    _routes(app, sim)
    return app
