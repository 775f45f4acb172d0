"""A faithful local stand-in for ImmPort's shared-data download API (``asyncdepo sim immport``).

Storage is a directory of studies, ``ROOT/SDYnnn/...``; every regular file under it is a shared file whose
ImmPort path is ``/SDYnnn/...``. Names starting with ``.`` are hidden, and a sidecar ``NAME.sim-md5``
(holding 32 hex digits) overrides the ``generatedMD5`` the manifest publishes for ``NAME``, so a test can
simulate a corrupted file.

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
  then aborts the connection (the injector's request-body drop has nothing to cut on a GET).
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
import os
import random
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import orjson
from aiohttp import web

from asyncdepo.sim.faults import FAULT_KEY, FaultInjector
from asyncdepo.sim.server import make_app

MD5_SIDECAR = ".sim-md5"
BUCKET = "immport-shared"
CHUNK = 1 << 20
PERMISSIONS = [{"name": "view"}]
DEFAULT_USER = ("demo", "demo")


@dataclasses.dataclass
class _Token:
    user: str
    expires_at: float
    uses_left: int | None


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def _error(status: int, error: str, message: str, **extra: str) -> web.Response:
    return _json({"status": status, "error": error, "message": message}, status, extra or None)


def _norm(path: str) -> str | None:
    """An ImmPort path (``/SDY1/a/b``) as a relative POSIX path (``SDY1/a/b``); None when it escapes."""
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".") for p in parts):
        return None
    return "/".join(parts)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.endswith(MD5_SIDECAR)


def _iso(mtime: float) -> str:
    return _dt.datetime.fromtimestamp(mtime, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_uuid(rel: str) -> str:
    """The stable fileUUID of the shared file at ``rel`` (same across simulator restarts)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"immport-sim:{rel}"))


class ImmportSim:
    """The simulator's state: users, tokens, md5 cache and byte counters. ``app[IMMPORT_KEY]`` in tests."""

    def __init__(self, root: Path, faults: FaultInjector, *, users: dict[str, str] | None = None,
                 token_lifetime: float = 60.0, token_uses: int | None = None, url_lifetime: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
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
        self._md5: dict[str, tuple[int, int, str]] = {}
        self._uuids: dict[str, str] = {}
        # hold(): file responses pause mid-body once this many bytes went out, so a test can kill a
        # client at a point where it holds partial files; ``held`` is a threading.Event (ThreadedSim).
        self.hold_after: int | None = None
        self.hold_requests = 0
        self.file_gets = 0
        self.held = threading.Event()
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

    # -- storage -------------------------------------------------------------------------------------
    def resolve(self, path: str) -> Path | None:
        """The local path of an ImmPort path, or None when it does not exist (or is hidden)."""
        rel = _norm(path)
        if rel is None or not rel:
            return None if rel is None else self.root
        local = self.root / rel
        return local if local.exists() and not _hidden(local.name) else None

    def walk(self, rel: str) -> Iterator[tuple[str, os.stat_result]]:
        """(rel, stat) of every visible regular file under ``rel`` (sorted, recursive)."""
        base = self.root / rel if rel else self.root
        if base.is_file():
            yield rel, base.stat()
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
            for full in (Path(dirpath) / n for n in sorted(filenames) if not _hidden(n)):
                yield full.relative_to(self.root).as_posix(), full.stat()

    def published_md5(self, rel: str, st: os.stat_result) -> str:
        """generatedMD5 of ``rel``: the sidecar override, else the cached or computed md5 (blocking)."""
        local = self.root / rel
        sidecar = local.with_name(local.name + MD5_SIDECAR)
        if sidecar.exists():
            return sidecar.read_text().strip()
        cached = self._md5.get(rel)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        with open(local, "rb") as f:
            digest = hashlib.file_digest(f, "md5").hexdigest()
        self._md5[rel] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def manifest(self, study: str) -> list[dict[str, Any]]:
        """The study's file manifest (blocking: hashes new files)."""
        rows = []
        for rel, st in self.walk(study):
            uid = file_uuid(rel)
            self._uuids[uid] = rel
            rows.append({"fileUUID": uid, "path": "/" + rel, "fileName": rel.rsplit("/", 1)[-1],
                         "generatedMD5": self.published_md5(rel, st), "filesizeBytes": st.st_size,
                         "studyAccession": study})
        return rows

    def by_uuid(self, uid: str) -> str | None:
        rel = self._uuids.get(uid)
        if rel is None:  # not seen in a manifest yet: index everything once
            for r, _ in self.walk(""):
                self._uuids[file_uuid(r)] = r
            rel = self._uuids.get(uid)
        return rel if rel is not None and (self.root / rel).is_file() else None

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


def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(start, end_exclusive) for a single ``bytes=`` range; None to send everything; "416" if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unsupported forms may be ignored (RFC 9110 14.2)
    first, _, last = spec.strip().partition("-")
    try:
        if not first:  # suffix range: the last N bytes
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else "416"
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return "416"
    return start, end


async def _serve_file(request: web.Request, sim: ImmportSim, rel: str) -> web.StreamResponse:
    """Stream ``rel`` honouring Range, counting the bytes written; a ``drop`` fault cuts the response."""
    local = sim.root / rel
    sim.file_gets += 1
    try:
        fd = os.open(local, os.O_RDONLY)
    except FileNotFoundError:
        return _error(404, "NoSuchKey", "The specified key does not exist.")
    try:
        size = os.fstat(fd).st_size
        start, end, status = 0, size, 200
        header = request.headers.get("Range")
        if header:
            rng = _parse_range(header, size)
            if rng == "416":
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            if isinstance(rng, tuple):
                (start, end), status = rng, 206
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        await resp.prepare(request)
        rule = request.get(FAULT_KEY)
        # a drop rule cuts the body short; one that would cut at or past its end does nothing
        cut = rule.after if rule is not None and rule.kind == "drop" and rule.after < end - start else None
        try:
            await _send_body(request, resp, sim, fd, start, end, cut)
        except ConnectionError:
            pass  # the client went away (killed, or gave up): nothing more to count
        return resp
    finally:
        os.close(fd)


async def _send_body(request: web.Request, resp: web.StreamResponse, sim: ImmportSim, fd: int, start: int,
                     end: int, cut: int | None) -> None:
    """Write ``[start, end)`` of ``fd``; count what was handed to the transport; cut after ``cut`` bytes."""
    route = sim.faults.route_name(request)
    loop = asyncio.get_running_loop()
    transport = request.transport
    if cut is None and sim.hold_after is None and transport is not None and end > start:
        # the kernel copies file -> socket (as nginx would): the simulator's CPU stays out of benchmarks
        with os.fdopen(os.dup(fd), "rb") as fobj:
            try:
                await loop.sendfile(transport, fobj, start, end - start)
            except NotImplementedError:  # uvloop: write it ourselves below
                pass
            except BaseException:
                # asyncio leaves the file position just past what the kernel did send
                sim.bytes_out[route] += max(0, fobj.tell() - start)
                raise
            else:
                sim.bytes_out[route] += end - start
                await resp.write_eof()
                return
    pos = start
    while pos < end:
        data = await loop.run_in_executor(None, os.pread, fd, min(CHUNK, end - pos), pos)
        if not data:
            break  # the file shrank under us; the client sees a short body
        if cut is not None and pos - start + len(data) >= cut:
            data = data[: max(0, cut - (pos - start))]
            await resp.write(data)
            sim.bytes_out[route] += len(data)
            sim.events["responses_cut"] += 1
            if request.transport is not None:
                request.transport.abort()  # the injected drop: the client sees a truncated body
            return
        await sim.maybe_hold()
        await resp.write(data)
        sim.bytes_out[route] += len(data)
        pos += len(data)
    await resp.write_eof()


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
            norm.append(_norm(p) or "")
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
            entry(c) for c in sorted(local.iterdir()) if not _hidden(c.name) and (c.is_file() or c.is_dir())]
        return _json({"self": entry(local), "items": items, "item_count": len(items),
                      "total_count": len(items), "parameters": {"path": path}})

    async def manifest(request: web.Request) -> web.Response:
        if (denied := sim.authorize(request)) is not None:
            return denied
        study = request.match_info["study"]
        if _norm(study) != study or not (sim.root / study).is_dir():
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
        rel = _norm(request.match_info["key"])
        if rel is None or not sim.signed_ok(rel, request):
            return _error(403, "AccessDenied", "Request has expired or the signature does not match")
        return await _serve_file(request, sim, rel)

    async def stream(request: web.Request) -> web.StreamResponse:
        uid = request.match_info["uuid"]
        rel = sim.by_uuid(uid)
        if rel is None or not sim.signed_ok(uid, request):
            return _error(403, "AccessDenied", "Request has expired or the signature does not match")
        return await _serve_file(request, sim, rel)

    async def aspera_check(request: web.Request) -> web.Response:
        body = await request.json()
        allowed = sim.aspera_tokens.get(str(body.get("token", "")))
        paths = [_norm(str(p)) for p in body.get("paths", [])]
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
    app.router.add_get("/_s3/" + BUCKET + "/{key:.+}", s3_object)
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


def write_study(root: Path, study: str, count: int, size: int, *, per_dir: int = 100, seed: int = 1,
                prefix: str = "ResultFiles") -> list[str]:
    """Create ``count`` files of ``size`` pseudo-random bytes under ``root/study/prefix/dNN/``; returns
    their ImmPort paths. For tests, benchmarks and the demo."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        rel = f"{study}/{prefix}/d{i // per_dir:02d}/file{i:05d}.bin"
        local = root / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(rng.randbytes(size))
        paths.append("/" + rel)
    return paths
