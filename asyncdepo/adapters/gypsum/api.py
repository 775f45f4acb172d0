"""The gypsum REST API as async calls: one request per call, statuses mapped into ``asyncdepo.errors``.

Used by the gypsum adapter (``adapters.gypsum``) and the ``asyncdepo gypsum ...`` commands. Contract:

* ``GypsumClient(server, token)`` is used as ``async with``; ``token`` is the GitHub token (user calls);
  session-token calls take the session token as an argument. Neither ever appears in a message.
* :meth:`GypsumClient.request` makes one attempt; :meth:`GypsumClient.call` retries transient failures
  (``retry_call``) and is used only for requests that are safe to repeat (reads, presign, admin updates).
  ``start`` is never repeated blindly: a lost answer may have taken the project lock.
* Errors: 401 -> AuthError; 403 -> AuthError, except "already been locked" -> ConflictError; 404 ->
  RemoteValidationError; 400 -> RemoteValidationError, except "quota" -> QuotaError and "already exists"
  -> ConflictError; 429/5xx/connection errors -> TransientError. The message is gypsum's ``reason``.
* Public reads (``/file/``, ``/list``) need no token; keys are sent percent-encoded ('/' as %2F).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import orjson

from asyncdepo.errors import (
    AuthError,
    ConflictError,
    QuotaError,
    TransferError,
    TransientError,
)
from asyncdepo.transport.failures import boundary, status_error
from asyncdepo.transport.httpbody import client_session, request_timeout
from asyncdepo.transport.pacer import Pacer

CONNECTIONS = 64  # concurrent connections to one server (the engine's --transfers bounds the PUTs in flight)
TOKEN_HINT = "set GITHUB_TOKEN (or ASYNCDEPO_GYPSUM_TOKEN) to a GitHub token with the read:user and read:org scopes"


def normalize_server(url: str) -> str:
    """``https://gypsum.artifactdb.com/`` -> ``https://gypsum.artifactdb.com`` (scheme required)."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url


def file_path(key: str) -> str:
    """``/file/<key>`` with the key fully percent-encoded."""
    return "/file/" + quote(key, safe="")


def _quirks(status: int, reason: str) -> type[TransferError] | None:
    """gypsum's answers that HTTP's classes miss: a project lock held by another upload (403), a full quota
    and a version that already exists (400)."""
    low = reason.lower()
    if status == 403 and "already been locked" in low:
        return ConflictError
    if status == 400 and "quota" in low:
        return QuotaError
    if status == 400 and "already exists" in low:
        return ConflictError
    return None


def map_status(status: int, reason: str, what: str, retry_after: str | None = None) -> TransferError:
    """An error for a non-2xx gypsum answer: the generic mapping, gypsum's quirks, the token hint."""
    return status_error(status, reason, what=what, retry_after=retry_after, refine=_quirks,
                        hints={AuthError: TOKEN_HINT} if status == 401 else None)


class GypsumClient:
    """Calls to one gypsum server. ``async with GypsumClient(server, token) as c:``."""

    def __init__(self, server: str, token: str | None = None, *, pacer: Pacer | None = None) -> None:
        self.base = normalize_server(server)
        self._token = token
        self.pacer = pacer or Pacer()
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        if self.session is None:
            self.session = client_session(limit=CONNECTIONS)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- plumbing ------------------------------------------------------------------------------------
    def _headers(self, auth: str | None) -> dict[str, str]:
        if auth == "user":
            if not self._token:
                raise AuthError("no GitHub token given", hint=TOKEN_HINT)
            return {"Authorization": f"Bearer {self._token}"}
        if auth:
            return {"Authorization": f"Bearer {auth}"}
        return {}

    async def request(self, method: str, path: str, *, auth: str | None = None, json: Any = None,
                      params: Mapping[str, str] | None = None, ok: tuple[int, ...] = (200,),
                      what: str | None = None) -> tuple[int, Any]:
        """One attempt; returns (status, decoded JSON or None). ``auth``: None, "user" or a session token.

        :raises TransferError: mapped from the status or the connection failure.
        """
        assert self.session is not None, "use the client as 'async with client:'"
        what = what or f"gypsum {method} {path.split('?')[0]}"
        with boundary(what):
            async with self.session.request(method, self.base + path, headers=self._headers(auth), json=json,
                                            params=params, timeout=request_timeout()) as resp:
                raw = await resp.read()
                body: Any = None
                if raw:
                    try:
                        body = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        body = None
                if resp.status in ok:
                    return resp.status, body
                reason = body.get("reason") if isinstance(body, dict) else None
                raise map_status(resp.status, str(reason or resp.reason or ""), what,
                                 resp.headers.get("Retry-After"))

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """:meth:`request` with retries of transient failures (for requests safe to repeat)."""
        async def once() -> Any:
            return (await self.request(method, path, **kw))[1]

        return await self.pacer.call(once)

    # -- public reads --------------------------------------------------------------------------------
    async def fetch_json(self, key: str) -> Any:
        """The JSON object at ``key``, or None when it does not exist."""
        status, body = await self.pacer.call(lambda: self.request("GET", file_path(key), ok=(200, 404)))
        return body if status == 200 else None

    async def list_keys(self, prefix: str | None, recursive: bool = False) -> list[str]:
        params = {"recursive": "true" if recursive else "false"}
        if prefix is not None:
            params["prefix"] = prefix
        return list(await self.call("GET", "/list", params=params) or [])

    async def open_file(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The object's bytes from ``offset`` (a ranged GET); one attempt, errors mapped."""
        assert self.session is not None
        what = f"gypsum GET /file/{key}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with boundary(what):
            async with self.session.get(self.base + file_path(key), headers=headers,
                                        timeout=request_timeout(None, base=300.0)) as resp:
                if resp.status == 416:
                    return
                if resp.status not in (200, 206):
                    raw = await resp.read()
                    try:
                        reason = str(orjson.loads(raw).get("reason", ""))
                    except (orjson.JSONDecodeError, AttributeError):
                        reason = resp.reason or ""
                    raise map_status(resp.status, reason, what, resp.headers.get("Retry-After"))
                skip = offset if (offset and resp.status == 200) else 0  # the server ignored the range
                async for block in resp.content.iter_chunked(1 << 20):
                    if skip:
                        cut = min(skip, len(block))
                        block, skip = block[cut:], skip - cut
                        if not block:
                            continue
                    yield block

    # -- uploads -------------------------------------------------------------------------------------
    async def start(self, project: str, asset: str, version: str, files: list[dict[str, Any]],
                    probation: bool) -> dict[str, Any]:
        """``POST /upload/start`` — one attempt only (see the module docstring)."""
        path = f"/upload/start/{quote(project, safe='')}/{quote(asset, safe='')}/{quote(version, safe='')}"
        _, body = await self.request("POST", path, auth="user", json={"files": files, "on_probation": probation},
                                     what=f"gypsum upload start {project}/{asset}/{version}")
        if not isinstance(body, dict) or "session_token" not in body:
            raise TransientError(f"gypsum upload start {project}/{asset}/{version}: malformed answer")
        return body

    async def presign(self, url_path: str, session_token: str, rel: str) -> tuple[str, str]:
        """``POST /upload/presigned-file/...`` -> (PUT URL, base64 md5)."""
        body = await self.call("POST", url_path, auth=session_token, what=f"gypsum presign {rel}")
        if not isinstance(body, dict) or "url" not in body or "md5sum_base64" not in body:
            raise TransientError(f"gypsum presign {rel}: malformed answer")
        return str(body["url"]), str(body["md5sum_base64"])

    async def finish_upload(self, url_path: str, session_token: str, what: str) -> None:
        """``POST`` the complete or abort URL with the session token (one attempt)."""
        await self.request("POST", url_path, auth=session_token, what=what)

    # -- administration ------------------------------------------------------------------------------
    async def create_project(self, project: str, owners: list[str], uploaders: list[dict[str, Any]],
                             quota: Mapping[str, float] | None = None) -> None:
        body: dict[str, Any] = {"permissions": {"owners": owners, "uploaders": uploaders}}
        if quota:
            body["quota"] = dict(quota)
        await self.call("POST", f"/create/{quote(project, safe='')}", auth="user", json=body)

    async def set_permissions(self, project: str, perms: Mapping[str, Any]) -> None:
        await self.call("PUT", f"/permissions/{quote(project, safe='')}", auth="user", json=dict(perms))

    async def set_quota(self, project: str, quota: Mapping[str, float]) -> None:
        await self.call("PUT", f"/quota/{quote(project, safe='')}", auth="user", json=dict(quota))

    async def probation(self, action: str, project: str, asset: str, version: str) -> None:
        key = "/".join(quote(x, safe="") for x in (project, asset, version))
        await self.call("POST", f"/probation/{action}/{key}", auth="user")

    async def unlock(self, project: str) -> None:
        await self.call("DELETE", f"/unlock/{quote(project, safe='')}", auth="user")
