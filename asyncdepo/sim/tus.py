"""A tus 1.0.0 server (https://tus.io/protocols/resumable-upload) for tests, benchmarks and the demo.

Core protocol plus the extensions ``creation``, ``creation-with-upload``, ``creation-defer-length``,
``termination`` and ``checksum`` (``sha1``, ``md5``, ``sha256``, ``crc32`` as tusd offers it: the base64 of
the big-endian CRC-32, and ``crc32c`` the same way when the ``crc32c`` package is installed: a C library of
its own, so the simulator never checks a digest with the code the client computed it with), under
``/files/``::

    OPTIONS /files/ (or /files/{id})  204  Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm
    POST    /files/                   201  Location (absolute URL); creation-with-upload appends the body
    HEAD    /files/{id}               200  Upload-Offset, Upload-Length | Upload-Defer-Length, Upload-Metadata
    PATCH   /files/{id}               204  Upload-Offset (the new one)
    DELETE  /files/{id}               204  then HEAD/PATCH answer 410 Gone

Choices (the spec leaves them open, or a real server differs):

* ``Tus-Resumable: 1.0.0`` is sent on every response under ``/files/`` (OPTIONS too, as tusd does); a request
  other than OPTIONS whose ``Tus-Resumable`` is missing or not ``1.0.0`` gets 412 with ``Tus-Version``,
  before anything else is looked at.
* Order of PATCH checks, each answering before any byte is appended: 404/410, 415 (Content-Type is not
  ``application/offset+octet-stream``), 400 (``Upload-Offset`` missing/invalid), 409 (offset differs from the
  server's; no ``Upload-Offset`` in the answer, like tusd, so clients must HEAD), 400/413 for an invalid or
  too large ``Upload-Length`` (deferred uploads only; once set it may not change), 400 when
  ``Upload-Offset + Content-Length`` passes the length, 400 for an unsupported checksum algorithm.
* Bytes are written to the data file as they arrive (``os.pwrite`` on the loop: page-cache writes of at most
  1 MiB cost less than a thread hop on loopback; the simulator never fsyncs). Without a checksum the offset
  advances with every piece, so when the connection breaks mid-body the bytes received are kept and HEAD
  shows them (the spec's "SHOULD store as much as possible").
* With ``Upload-Checksum`` the chunk is written too but the offset only moves after the digest matched; on a
  mismatch (460) or a broken connection (the digest cannot be checked) the file is truncated back, so
  nothing of that chunk is appended. Memory stays bounded whatever the chunk size.
* A body longer than announced lengths when no Content-Length was sent (chunked encoding) is caught while
  reading: the chunk is truncated back and the answer is 400 (413 past ``--max-size`` for deferred lengths).
* Concurrency: one ``asyncio.Lock`` per upload serialises PATCHes. A second PATCH waits for the first
  (typically a request whose client has gone and whose handler is still draining), up to
  ``--lock-timeout`` seconds, then gets 423 Locked (as tusd). After the wait it sees the final offset, so a
  resuming client gets 204 or 409, never interleaved bytes. HEAD does not wait (it reports the bytes written
  so far); DELETE does not wait either: it marks the upload terminated and removes its file, and a PATCH
  still running then keeps nothing.
* Storage under ROOT (:mod:`asyncdepo.sim.tus_store`): ``uploads/<id>.bin`` (the bytes) and
  ``uploads/<id>.json`` (length, deferred flag, metadata decoded and raw, offset, terminated), rewritten
  atomically after every request that changed it; on a restart the JSON offset is the truth and the data
  file is truncated to it. Terminated uploads keep their JSON as a tombstone (HEAD 410).
* When an upload completes (offset == length) its data file is hard-linked (no copy) to
  ``ROOT/complete/<relpath>`` (``relpath`` metadata, else ``filename``, else the upload id), replacing an
  earlier file of that name atomically, so tests compare the tree on disk with the source. A ``relpath``
  or ``filename`` that is absolute or contains ``..`` is refused at creation with 400. A name that is not
  UTF-8 lands under its very bytes (Linux file names are bytes).
* Upload-Metadata: ``key base64value`` pairs separated by commas; keys unique, without spaces or commas;
  a value may be absent. Invalid base64 or a duplicate key is 400. Values that are not UTF-8 are kept only
  in the raw header (HEAD returns it as sent).
* ``X-HTTP-Method-Override`` on POST /files/{id} is honoured (PATCH, DELETE, HEAD), as the spec suggests.
* ``Upload-Defer-Length`` and ``Upload-Length`` together, or neither, on POST: 400. A zero-length upload is
  complete (and materialised) when created.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import os
import uuid
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path, PurePosixPath
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from asyncdepo.sim.faults import Dropped, FaultInjector
from asyncdepo.sim.server import make_app
from asyncdepo.sim.tus_store import TusState, Upload

TUS_VERSION = "1.0.0"
ALL_EXTENSIONS = ("creation", "creation-with-upload", "termination", "checksum", "creation-defer-length")
def _crc32c_available() -> bool:
    try:
        import crc32c  # noqa: F401  (optional: tests and benchmarks install it)
    except ImportError:
        return False
    return True


CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256", "crc32") + (("crc32c",) if _crc32c_available() else ())


class _Crc:
    """A CRC with hashlib's update/digest, for ``Upload-Checksum: crc32`` (zlib) and ``crc32c``."""

    def __init__(self, algo: str) -> None:
        self._fn: Callable[[bytes, int], int] = zlib.crc32
        if algo == "crc32c":
            import crc32c

            self._fn = crc32c.crc32c
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = self._fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _checksummer(algo: str) -> _Crc | hashlib._Hash:
    return _Crc(algo) if algo in ("crc32", "crc32c") else hashlib.new(algo)
OFFSET_TYPE = "application/offset+octet-stream"

STATE_KEY: web.AppKey[TusState] = web.AppKey("tus_state", TusState)


# -- helpers -----------------------------------------------------------------------------------------------
def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, **extra}


def _error(status: int, text: str, **headers: str) -> web.Response:
    reason = {460: "Checksum Mismatch", 423: "Locked"}.get(status)
    return web.Response(status=status, reason=reason, text=text + "\n", headers=_tus_headers(**headers))


def _parse_int(value: str | None) -> int | None:
    """A non-negative decimal integer header, or None when absent/invalid."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def parse_metadata(header: str) -> dict[str, str]:
    """Decode ``Upload-Metadata``; values that are not UTF-8 are left out.

    :raises ValueError: malformed pair, duplicate key or invalid base64.
    """
    result: dict[str, str] = {}
    seen: set[str] = set()
    for pair in header.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, value = pair.partition(" ")
        value = value.strip()
        if not key or key in seen or " " in value:
            raise ValueError(f"malformed Upload-Metadata pair {key!r}")
        seen.add(key)
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"Upload-Metadata {key!r}: invalid base64") from exc
        try:
            result[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return result


def _safe_rel(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel and "\0" not in rel


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _tus(handler: Handler) -> Handler:
    """Check ``Tus-Resumable`` (412 on mismatch) before ``handler``."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Tus-Resumable") != TUS_VERSION:
            return _error(412, "unsupported or missing Tus-Resumable", **{"Tus-Version": TUS_VERSION})
        return await handler(request)

    return wrapped


# -- body writing ------------------------------------------------------------------------------------------
class _TooLong(Exception):
    """The body passed ``limit`` bytes."""


async def _append(
    faults: FaultInjector,
    request: web.Request,
    state: TusState,
    up: Upload,
    limit: int | None,
    checksum: tuple[str, bytes] | None,
) -> int | None:
    """Append the request body at ``up.offset``; see the module docstring for what is kept.

    Returns None when the chunk was accepted, 0 when the connection broke (nobody reads the answer), else
    the HTTP status to answer (400/413 overrun, 460 checksum mismatch) after the file was truncated back.
    """
    start = pos = up.offset
    hasher = _checksummer(checksum[0]) if checksum else None
    fd = os.open(state.data_path(up.id), os.O_WRONLY)
    status: int | None = None
    try:
        # faults.body is an async generator (annotated as an iterator): close it if we stop early
        async with aclosing(cast(AsyncGenerator[bytes, None], faults.body(request))) as body:
            async for piece in body:
                if up.terminated:
                    return 0
                if limit is not None and pos + len(piece) > limit:
                    raise _TooLong
                os.pwrite(fd, piece, pos)
                pos += len(piece)
                if hasher is not None:
                    hasher.update(piece)
                else:
                    up.offset = pos  # kept even if the connection breaks after this piece
    except _TooLong:
        status = 413 if up.length is None else 400
    except (Dropped, ConnectionError, asyncio.IncompleteReadError, HttpProcessingError):
        # the body ended early: a drop fault, a client that went away, a truncated chunked body
        if hasher is None:  # keep what arrived
            _finish(state, up, fd)
            return 0
        status = 0  # a checksummed chunk that did not fully arrive cannot be verified: discard it
    except BaseException:
        _finish(state, up, fd)
        raise
    if status is None and checksum is not None and hasher is not None:
        status = None if hasher.digest() == checksum[1] else 460
    if status is None:
        up.offset = pos
    else:
        up.offset = start
        os.ftruncate(fd, start)
    _finish(state, up, fd)
    return status


def _finish(state: TusState, up: Upload, fd: int) -> None:
    """Close the data file, persist the offset and materialise a completed upload."""
    os.close(fd)
    if up.terminated:
        return
    state.save(up)
    if up.complete and not up.materialised:
        state.materialise(up)


def _checksum_header(request: web.Request, state: TusState) -> tuple[str, bytes] | None | web.Response:
    """The parsed ``Upload-Checksum`` (None when absent or the extension is off), or a 400 response."""
    header = request.headers.get("Upload-Checksum")
    if header is None or "checksum" not in state.extensions:
        return None
    algo, _, value = header.strip().partition(" ")
    if algo not in CHECKSUM_ALGORITHMS:
        return _error(400, f"unsupported checksum algorithm {algo!r}")
    try:
        return algo, base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        return _error(400, "Upload-Checksum: invalid base64")


def _upload_limit(up: Upload, state: TusState) -> int | None:
    return up.length if up.length is not None else state.max_size


# -- handlers ----------------------------------------------------------------------------------------------
def _routes(app: web.Application, state: TusState, faults: FaultInjector) -> None:
    async def options(request: web.Request) -> web.Response:
        headers = _tus_headers(**{"Tus-Version": TUS_VERSION, "Tus-Extension": ",".join(state.extensions)})
        if state.max_size is not None:
            headers["Tus-Max-Size"] = str(state.max_size)
        if "checksum" in state.extensions:
            headers["Tus-Checksum-Algorithm"] = ",".join(CHECKSUM_ALGORITHMS)
        return web.Response(status=204, headers=headers)

    async def create(request: web.Request) -> web.Response:
        if "creation" not in state.extensions:
            return _error(405, "creation extension disabled")
        length = _parse_int(request.headers.get("Upload-Length"))
        defer = request.headers.get("Upload-Defer-Length")
        if defer is not None:
            if (
                defer != "1"
                or "creation-defer-length" not in state.extensions
                or "Upload-Length" in request.headers
            ):
                return _error(400, "invalid Upload-Defer-Length")
        elif length is None:
            return _error(400, "Upload-Length (a non-negative integer) or Upload-Defer-Length: 1 required")
        if length is not None and state.max_size is not None and length > state.max_size:
            return _error(413, f"Upload-Length exceeds Tus-Max-Size {state.max_size}")
        raw = request.headers.get("Upload-Metadata", "")
        try:
            metadata = parse_metadata(raw)
        except ValueError as exc:
            return _error(400, str(exc))
        for key in ("relpath", "filename"):
            if key in metadata and not _safe_rel(metadata[key]):
                return _error(400, f"Upload-Metadata {key} must be a relative path without '..'")
        with_body = request.content_type == OFFSET_TYPE and "creation-with-upload" in state.extensions
        checksum = _checksum_header(request, state) if with_body else None
        if isinstance(checksum, web.Response):
            return checksum
        uid = uuid.uuid4().hex
        up = Upload(uid, length, metadata, raw)
        state.data_path(uid).touch()
        state.uploads[uid] = up
        state.save(up)
        location = str(request.url.with_path(f"/files/{uid}").with_query(None))
        headers = _tus_headers(Location=location)
        if with_body:
            async with up.lock:
                status = await _append(faults, request, state, up, _upload_limit(up, state), checksum)
            headers["Upload-Offset"] = str(up.offset)
            if status:  # the upload exists; the initial chunk was refused
                return _error(status, "initial chunk refused", **headers)
        elif up.complete:  # a zero-length upload is complete when created
            state.materialise(up)
        return web.Response(status=201, headers=headers)

    def lookup(request: web.Request) -> Upload | web.Response:
        up = state.get(request.match_info["upload_id"])
        if up is None:
            return _error(404, "no such upload")
        if up.terminated:
            return _error(410, "upload terminated")
        return up

    async def head(request: web.Request) -> web.Response:
        up = lookup(request)
        if isinstance(up, web.Response):
            return web.Response(status=up.status, headers=_tus_headers(**{"Cache-Control": "no-store"}))
        headers = _tus_headers(**{"Upload-Offset": str(up.offset), "Cache-Control": "no-store"})
        if up.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(up.length)
        if up.raw_metadata:
            headers["Upload-Metadata"] = up.raw_metadata
        return web.Response(status=200, headers=headers)

    async def patch(request: web.Request) -> web.Response:
        up = lookup(request)
        if isinstance(up, web.Response):
            return up
        if request.content_type != OFFSET_TYPE:
            return _error(415, f"Content-Type must be {OFFSET_TYPE}")
        offset = _parse_int(request.headers.get("Upload-Offset"))
        if offset is None:
            return _error(400, "Upload-Offset (a non-negative integer) required")
        checksum = _checksum_header(request, state)
        if isinstance(checksum, web.Response):
            return checksum
        try:
            async with asyncio.timeout(state.lock_timeout):
                await up.lock.acquire()
        except TimeoutError:
            return _error(423, "upload is locked by another request")
        try:
            if up.terminated:
                return _error(410, "upload terminated")
            if offset != up.offset:
                return _error(409, f"Upload-Offset {offset} does not match the upload's offset")
            new_length = request.headers.get("Upload-Length")
            if new_length is not None:
                value = _parse_int(new_length)
                if value is None or value < up.offset or (up.length is not None and value != up.length):
                    return _error(400, "invalid Upload-Length (it cannot change once set)")
                if state.max_size is not None and value > state.max_size:
                    return _error(413, f"Upload-Length exceeds Tus-Max-Size {state.max_size}")
                if up.length is None:
                    up.length = value
                    state.save(up)
            limit = _upload_limit(up, state)
            if (
                limit is not None
                and request.content_length is not None
                and offset + request.content_length > limit
            ):
                return _error(413 if up.length is None else 400, "chunk goes past the upload's length")
            status = await _append(faults, request, state, up, limit, checksum)
            if status == 460:
                return _error(460, "checksum mismatch: chunk discarded")
            if status == 0:  # the client is gone; nobody reads this
                return _error(400, "connection broken during the body")
            if status is not None:
                return _error(status, "chunk goes past the upload's length")
            return web.Response(status=204, headers=_tus_headers(**{"Upload-Offset": str(up.offset)}))
        finally:
            up.lock.release()

    async def delete(request: web.Request) -> web.Response:
        if "termination" not in state.extensions:
            return _error(405, "termination extension disabled")
        up = lookup(request)
        if isinstance(up, web.Response):
            return up
        up.terminated = True  # a PATCH still running sees this and keeps nothing
        state.data_path(up.id).unlink(missing_ok=True)
        state.save(up)
        return web.Response(status=204, headers=_tus_headers())

    async def override(request: web.Request) -> web.StreamResponse:
        method = request.headers.get("X-HTTP-Method-Override", "").upper()
        target = {"PATCH": patch, "DELETE": delete, "HEAD": head}.get(method)
        if target is None:
            return _error(405, "POST on an upload needs X-HTTP-Method-Override")
        return await target(request)

    app.router.add_route("OPTIONS", "/files/", options)
    app.router.add_route("OPTIONS", "/files/{upload_id}", options)
    app.router.add_route("POST", "/files/", _tus(create))
    app.router.add_route("POST", "/files", _tus(create))  # the same endpoint without its slash (curl -T)
    app.router.add_route("HEAD", "/files/{upload_id}", _tus(head))
    app.router.add_route("PATCH", "/files/{upload_id}", _tus(patch))
    app.router.add_route("DELETE", "/files/{upload_id}", _tus(delete))
    app.router.add_route("POST", "/files/{upload_id}", _tus(override))

    async def tag(request: web.Request, response: web.StreamResponse) -> None:
        # error pages from the router (405) and injected faults carry the version too
        if request.path.startswith("/files"):
            response.headers.setdefault("Tus-Resumable", TUS_VERSION)

    app.on_response_prepare.append(tag)


# -- module contract ---------------------------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tus simulator's own flags."""
    parser.add_argument(
        "--max-size", type=_size, default=None, help="Tus-Max-Size in bytes (e.g. 10G); default none"
    )
    parser.add_argument(
        "--extensions",
        default=",".join(ALL_EXTENSIONS),
        help=f"comma-separated tus extensions to offer (default {','.join(ALL_EXTENSIONS)})",
    )
    parser.add_argument(
        "--lock-timeout", type=float, default=10.0, help="seconds a PATCH waits for a busy upload before 423"
    )


def build_app(root: Path, faults: FaultInjector, args: argparse.Namespace | None) -> web.Application:
    """The tus server storing under ``root`` (see the module docstring for the layout)."""
    max_size = getattr(args, "max_size", None)
    ext_text = getattr(args, "extensions", None) or ",".join(ALL_EXTENSIONS)
    extensions = tuple(e.strip() for e in ext_text.split(",") if e.strip())
    unknown = set(extensions) - set(ALL_EXTENSIONS)
    if unknown:
        raise ValueError(f"unknown tus extension(s): {', '.join(sorted(unknown))}")
    lock_timeout = float(getattr(args, "lock_timeout", 10.0))
    state = TusState(Path(root), max_size, extensions, lock_timeout)
    app = make_app(faults)
    app[STATE_KEY] = state
    _routes(app, state, faults)
    return app
