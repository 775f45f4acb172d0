"""Public reads of the gypsum simulator, and its test-control routes.

* ``GET|HEAD /file/{key}`` (the key URL-encoded, '/' as ``%2F``): the object with ``ETag`` (its md5, quoted),
  ``Last-Modified``, ``Content-Length``, ``Accept-Ranges: bytes``; 404 ``{"status": "error", "reason":
  "object not found"}``. Unlike the real worker (which streams the whole object), a single
  ``Range: bytes=a-b`` / ``a-`` / ``-n`` is honoured with 206 and ``Content-Range`` (416 when it cannot be
  satisfied; several ranges get the whole object) so clients can resume downloads.
  A ``drop`` fault matching a GET cuts the response after ``after`` body bytes (the connection is aborted).
* ``GET /list?prefix=<p>&recursive=true|false``: a JSON array of keys starting with ``p``; non-recursive
  listings fold deeper keys into ``dir/`` entries (full keys, as the real server returns them).
* ``/_sim/gypsum/stats`` (GET): counters (presigned, puts_ok, put_bytes_ok, expired_puts, bad_digest,
  broken_puts, starts, completes, aborts, file_gets, range_requests, bytes_out).
  ``/_sim/gypsum/expire-next`` (POST ``{"count": N}``): the next N presigned URLs are issued already expired.
  ``/_sim/gypsum/clock`` (POST ``{"advance": seconds}``): move the simulator's clock (expiry, ``until``).
"""

from __future__ import annotations

import os
import re
from email.utils import formatdate
from urllib.parse import unquote_plus

from aiohttp import web

from asyncdepo.sim.faults import FAULT_KEY
from asyncdepo.sim.gypsum_core import GypsumError, ok, state_of
from asyncdepo.sim.gypsum_store import BadKey

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``(start, end_exclusive)``, None for the whole object, or "unsatisfiable"."""
    if not header or "," in header:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # malformed ranges are ignored, as HTTP says
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(m.group(1))
    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


async def get_file(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    key = unquote_plus(request.raw_path.split("?", 1)[0][len("/file/"):])
    try:
        path = state.bucket.path(key)
        st = os.stat(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(key)
    except (BadKey, OSError):
        raise GypsumError("object not found", 404) from None
    size = st.st_size
    headers = {
        "ETag": f'"{state.bucket.etag(key)}"',
        "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/json" if key.rsplit("/", 1)[-1].startswith("..") or key.endswith(".json")
        else "application/octet-stream",
    }
    wanted = _parse_range(request.headers.get("Range"), size)
    if wanted == "unsatisfiable":
        return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
    status = 200
    start, end = 0, size
    if isinstance(wanted, tuple):
        start, end = wanted
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        state.counters["range_requests"] += 1
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = end - start
    if request.method == "HEAD":
        await response.prepare(request)
        return response
    state.counters["file_gets"] += 1
    rule = request.get(FAULT_KEY)
    cut = rule.after if rule is not None and rule.kind == "drop" else None
    await response.prepare(request)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            n = min(1 << 20, end - pos)
            if cut is not None:
                n = min(n, start + cut - pos)
                if n <= 0:
                    if request.transport is not None:
                        request.transport.abort()
                    return response
            data = os.pread(fd, n, pos)
            if not data:
                break
            await response.write(data)
            pos += len(data)
            state.counters["bytes_out"] += len(data)
    finally:
        os.close(fd)
    await response.write_eof()
    return response


async def list_keys(request: web.Request) -> web.Response:
    state = state_of(request)
    prefix = request.query.get("prefix")
    recursive = request.query.get("recursive", "false") == "true"
    return ok(state.bucket.list(prefix, recursive))


async def sim_stats(request: web.Request) -> web.Response:
    return ok(dict(state_of(request).counters))


async def sim_expire_next(request: web.Request) -> web.Response:
    body = await request.json()
    state = state_of(request)
    state.expire_next = int(body.get("count", 1))
    return ok({"expire_next": state.expire_next})


async def sim_clock(request: web.Request) -> web.Response:
    body = await request.json()
    state = state_of(request)
    state.clock_offset += float(body.get("advance", 0))
    return ok({"offset": state.clock_offset})


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/file/{key:[\\s\\S]+}", get_file)
    app.router.add_route("HEAD", "/file/{key:[\\s\\S]+}", get_file)
    app.router.add_get("/list", list_keys, allow_head=False)
    app.router.add_get("/_sim/gypsum/stats", sim_stats, allow_head=False)
    app.router.add_post("/_sim/gypsum/expire-next", sim_expire_next)
    app.router.add_post("/_sim/gypsum/clock", sim_clock)
