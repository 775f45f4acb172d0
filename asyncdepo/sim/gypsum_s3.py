"""The simulator's stand-in for the S3 bucket behind gypsum: presigned PUT URLs and the PUT itself.

A presigned URL is ``{origin}/s3/{key}?X-Expires=<unix>&X-Signature=<sig>`` where the signature covers the
key, the expiry and the base64 md5 the URL was signed for (S3's ``ContentMD5`` signing parameter). The PUT
then behaves as S3 does for such a URL, in this order, always draining the body first so the client reads
the answer instead of a reset connection:

* no/invalid query -> 403 ``AccessDenied``; past the expiry -> 403 ``AccessDenied`` "Request has expired";
* ``Content-MD5`` missing or not the signed one -> 403 ``SignatureDoesNotMatch``;
* body md5 differs from ``Content-MD5`` -> 400 ``BadDigest``; nothing is stored;
* otherwise 200 with ``ETag: "<md5>"``; the object replaces any earlier one atomically.

Errors are S3's XML (``<Error><Code>..</Code><Message>..</Message></Error>``), not gypsum's JSON.
The body is read through ``faults.body(request)`` (counted per route, ``drop`` faults honoured); bytes go to
a temporary file with ``os.write`` on the loop (page-cache writes of <= 1 MiB are cheaper than a thread hop)
and are hashed in the same pass. A broken connection leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import cast
from urllib.parse import quote

from aiohttp import web

from asyncdepo.sim.faults import Dropped, FaultInjector
from asyncdepo.sim.gypsum_core import GypsumState, state_of
from asyncdepo.sim.server import FAULTS_KEY


def md5_hex_to_base64(md5hex: str) -> str:
    """``Content-MD5`` form of a hex md5 (raises ValueError when not hex)."""
    return base64.b64encode(bytes.fromhex(md5hex)).decode()


def presign(state: GypsumState, origin: str, key: str, md5b64: str) -> str:
    """A PUT URL for ``key`` valid for ``presign_lifetime`` seconds (already expired while ``expire_next``
    is positive: a test knob to exercise clients' re-presigning)."""
    now = int(state.now())
    if state.expire_next > 0:
        state.expire_next -= 1
        expires = now - 1
    else:
        expires = now + max(1, int(state.config.presign_lifetime))
    sig = state.sign(key, str(expires), md5b64)
    state.counters["presigned"] += 1
    return f"{origin}/s3/{quote(key, safe='/')}?X-Expires={expires}&X-Signature={sig}"


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return web.Response(status=status, text=body, content_type="application/xml")


async def _drain(faults: FaultInjector, request: web.Request) -> bool:
    """Read and discard the body; False when the connection broke."""
    try:
        async with aclosing(cast(AsyncGenerator[bytes, None], faults.body(request))) as body:
            async for _ in body:
                pass
    except (Dropped, ConnectionError, asyncio.IncompleteReadError):
        return False
    return True


async def put_object(request: web.Request) -> web.StreamResponse:
    """``PUT /s3/{key}``: see the module docstring for the checks and their order."""
    state = state_of(request)
    faults = request.app[FAULTS_KEY]
    key = request.match_info["key"]
    expires_text = request.query.get("X-Expires", "")
    sig = request.query.get("X-Signature", "")
    md5b64 = request.headers.get("Content-MD5", "")
    refusal: web.Response | None = None
    if not expires_text.isdigit() or not sig:
        refusal = _s3_error(403, "AccessDenied", "Query-string authentication requires the signature")
    elif int(expires_text) < state.now():
        state.counters["expired_puts"] += 1
        refusal = _s3_error(403, "AccessDenied", "Request has expired")
    elif not md5b64 or state.sign(key, expires_text, md5b64) != sig:
        refusal = _s3_error(
            403, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided"
        )
    else:
        try:
            expected = base64.b64decode(md5b64, validate=True)
        except (binascii.Error, ValueError):
            expected = b""
        if len(expected) != 16:
            refusal = _s3_error(400, "InvalidDigest", "The Content-MD5 you specified was invalid")
    if refusal is not None:
        await _drain(faults, request)
        return refusal

    tmp = state.bucket.temp_path()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    digest = hashlib.md5()
    size = 0
    complete = False
    try:
        async with aclosing(cast(AsyncGenerator[bytes, None], faults.body(request))) as body:
            async for piece in body:
                os.write(fd, piece)
                digest.update(piece)
                size += len(piece)
        complete = True
    except (Dropped, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        os.close(fd)
        if not complete:
            tmp.unlink(missing_ok=True)
    if not complete:
        state.counters["broken_puts"] += 1
        return web.Response(status=400)  # nobody reads it: the connection is gone
    if digest.digest() != expected:
        tmp.unlink(missing_ok=True)
        state.counters["bad_digest"] += 1
        return _s3_error(400, "BadDigest", "The Content-MD5 you specified did not match what we received.")
    state.bucket.commit_file(key, tmp, digest.hexdigest())
    state.counters["puts_ok"] += 1
    state.counters["put_bytes_ok"] += size
    return web.Response(status=200, headers={"ETag": f'"{digest.hexdigest()}"'})


def add_routes(app: web.Application) -> None:
    app.router.add_put("/s3/{key:[\\s\\S]+}", put_object)
