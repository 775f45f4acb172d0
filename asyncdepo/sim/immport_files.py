"""The ImmPort simulator's file responses (:mod:`asyncdepo.sim.immport`): the bytes behind a signed URL.

HTTP Range (206 + Content-Range; 416 + ``Content-Range: bytes */size`` past the end), the body sent by the
kernel (``sendfile``) when nothing has to watch it, else in chunks that count toward ``bytes_out``, stop
at a ``drop`` fault rule (``after`` bytes of the *response*, then the connection is aborted) or pause
while the simulator holds responses.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from asyncdepo.sim.faults import FAULT_KEY, FaultInjector


class FileHost(Protocol):
    """What the file responses need of the simulator: its files, counters, faults and the hold switch."""

    root: Path
    faults: FaultInjector
    file_gets: int
    hold_after: int | None
    bytes_out: defaultdict[str, int]
    events: defaultdict[str, int]

    async def maybe_hold(self) -> None: ...

CHUNK = 1 << 20


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response (orjson)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=headers)


def error_response(status: int, error: str, message: str, **extra: str) -> web.Response:
    """The error body the real API sends: ``{"status", "error", "message"}``; ``extra`` are headers."""
    return json_response({"status": status, "error": error, "message": message}, status, extra or None)


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
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


async def serve_file(request: web.Request, sim: FileHost, rel: str) -> web.StreamResponse:
    """Stream ``rel`` honouring Range, counting the bytes written; a ``drop`` fault cuts the response."""
    local = sim.root / rel
    sim.file_gets += 1
    try:
        fd = os.open(local, os.O_RDONLY)
    except FileNotFoundError:
        return error_response(404, "NoSuchKey", "The specified key does not exist.")
    try:
        size = os.fstat(fd).st_size
        start, end, status = 0, size, 200
        header = request.headers.get("Range")
        if header:
            rng = parse_range(header, size)
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
        # a drop rule cuts the body short; one that would cut at or past its end does nothing; a corrupt rule
        # flips the lowest bit of body byte ``after`` (damage in transit, for the client's digest to catch)
        cut = rule.after if rule is not None and rule.kind == "drop" and rule.after < end - start else None
        flip = rule.after if rule is not None and rule.kind == "corrupt" and rule.after < end - start else None
        try:
            await _send_body(request, resp, sim, fd, start, end, cut, flip)
        except ConnectionError:
            pass  # the client went away (killed, or gave up): nothing more to count
        return resp
    finally:
        os.close(fd)


async def _send_body(request: web.Request, resp: web.StreamResponse, sim: FileHost, fd: int, start: int,
                     end: int, cut: int | None, flip: int | None = None) -> None:
    """Write ``[start, end)`` of ``fd``; count what was handed to the transport; cut after ``cut`` bytes;
    flip the lowest bit of the byte at ``flip`` (offsets from ``start``)."""
    route = sim.faults.route_name(request)
    loop = asyncio.get_running_loop()
    transport = request.transport
    if cut is None and flip is None and sim.hold_after is None and transport is not None and end > start:
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
        if flip is not None and pos - start <= flip < pos - start + len(data):
            damaged = bytearray(data)
            damaged[flip - (pos - start)] ^= 0x01
            data = bytes(damaged)
            sim.events["responses_corrupted"] += 1
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
