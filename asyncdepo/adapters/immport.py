"""ImmPort shared data: pull a study or some paths, over HTTPS (DRS + ranged GETs) or through ascp.

Pull only. ``list_remote`` resolves what to fetch: ``study`` through the study file manifest
(``GET /data/query/api/study/manifest/{SDY}``, which publishes fileUUID, generatedMD5 and size), each
path through the manifest of the study it belongs to (a file, or everything under a directory), and paths
outside any manifest through ``POST /data/list`` (those have no DRS id and no md5: only the ascp route
can fetch them, checked by size). ``rel`` is the ImmPort path without its leading ``/``
(``SDY1/ResultFiles/x.fcs``), so OUTDIR mirrors the archive's layout.

HTTPS route (the generic engine drives it): ``read(item, offset)`` asks DRS for a signed URL
(``/data/query/drs/download/{s3|stream}/{uuid}``) and streams a ranged GET of it. ascp route (``ascp=``
options given): the adapter declares ``Features(pull_sessions=True)`` and the engine fetches the files in
sessions of ``session_files`` files, each an ascp receive over a ``--file-pair-list`` with an Aspera token
valid for exactly those paths (:meth:`ImmportAdapter.aspera_token`; :mod:`asyncdepo.adapters.immport_ascp`).

Authentication: ``POST <auth>/auth/token`` with the username and password; the bearer token lives about a
minute. Any 401 on an API call renews it once (single-flight: concurrent workers that meet the same stale
token log in once) and repeats the call; a second 401, or a refused login, is an AuthError. The password
is held in a :class:`Secret` and never appears in a message, ``describe()`` or the journal.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

import anyio
import orjson

from asyncdepo.contract import (
    Adapter,
    ChunkWriter,
    Features,
    FetchPlan,
    Item,
    PlainGet,
    RemoteItem,
    SessionReader,
)
from asyncdepo.errors import (
    AuthError,
    PermanentError,
    RemoteValidationError,
    TransientError,
    UsageError,
)
from asyncdepo.transport import httpbody
from asyncdepo.transport.failures import connection_error, is_transport_failure, message_of, status_error
from asyncdepo.transport.httpapi import ApiClient, Reply
from asyncdepo.transport.pacer import Pacer

if TYPE_CHECKING:
    import aiohttp

    from asyncdepo.transport.ascp.options import AscpOptions

ASPERA_HOST = "aspera-immport.niaid.nih.gov"  # ImmPort's Aspera server (user databrowser, port 33001)
ASCP_SESSIONS = 4  # ascp sessions at once on the ascp route (at most; --transfers may lower it)
STUDY = re.compile(r"^SDY\d+$")
MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
READ_BLOCK = 128 << 10  # measured: larger blocks cost more in joins (fresh pages) than they save in hops
LOGIN_HINT = "check --user and ASYNCDEPO_IMMPORT_PASSWORD (the password of your ImmPort account)"


class Secret:
    """A string that does not print itself (repr, str and f-strings show ``***``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where ImmPort's services live. ``single(url)`` points all three at one server (the simulator)."""

    auth: str = "https://www.immport.org"
    api: str = "https://api.immport.org"  # data/list, data/download/token
    query: str = "https://www.immport.org"  # data/query/... (manifest, DRS)

    @classmethod
    def single(cls, url: str) -> Endpoints:
        url = url.rstrip("/")
        return cls(auth=url, api=url, query=url)


def immport_path(rel: str) -> str:
    """The ImmPort path of an item's ``rel``."""
    return "/" + rel


def safe_rel(path: str) -> str:
    """``/SDY1/a/b`` -> ``SDY1/a/b``; refuses paths that could escape OUTDIR (the server names the files).

    :raises RemoteValidationError: an empty path, or a ``..``, backslash or NUL in a component.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." or "\\" in p or "\0" in p for p in parts):
        raise RemoteValidationError(f"ImmPort returned an unsafe path {path!r}")
    return "/".join(parts)


def _json(reply: Reply, what: str) -> Any:
    try:
        return reply.json()
    except orjson.JSONDecodeError:
        raise RemoteValidationError(f"{what}: the answer is not JSON ({message_of(reply.body)[:100]!r})") from None


class ImmportAdapter(Adapter):
    """Pull from ImmPort. Use as ``async with ImmportAdapter(...) as a:``.

    :param user: ImmPort user name; :param password: its password (kept in a :class:`Secret`).
    :param paths: ImmPort paths (``/SDY1/ResultFiles/x.fcs``, a directory, or ``/SDY1``).
    :param study: a study accession whose whole manifest is fetched.
    :param drs: DRS access method, ``s3`` (signed S3 URL) or ``stream``.
    """

    name = "immport"
    features = Features(pull=True, resumable=True, server_digest="md5")

    def __init__(
        self,
        *,
        user: str,
        password: str | Secret,
        paths: Sequence[str] = (),
        study: str | None = None,
        endpoints: Endpoints = Endpoints(),
        drs: str = "s3",
        pacer: Pacer | None = None,
        ascp: AscpOptions | None = None,
        session_files: int = 1000,
    ) -> None:
        if study is not None and not STUDY.match(study):
            raise UsageError(f"--study {study!r}: expected an accession like SDY1")
        if drs not in ("s3", "stream"):
            raise UsageError(f"DRS access method {drs!r}: expected s3 or stream")
        if not paths and study is None:
            raise UsageError("nothing to pull: give ImmPort paths and/or --study SDYnnn")
        self.user = user
        self._password = password if isinstance(password, Secret) else Secret(password)
        try:
            self.paths = tuple("/" + safe_rel(p) for p in paths)
        except RemoteValidationError:
            raise UsageError(f"not an ImmPort path among {list(paths)!r}: expected e.g. /SDY1/ResultFiles") from None
        self.study = study
        self.endpoints = endpoints
        self.drs = drs
        self.pacer = pacer or Pacer()
        self._api: ApiClient | None = None
        self._http: aiohttp.ClientSession | None = None  # only for read(); pulls use plain_get
        self._token: str | None = None
        self._lock = anyio.Lock()
        self._manifests: dict[str, list[dict[str, Any]]] = {}
        self.logins = 0  # how many times we authenticated (1 + renewals); for reports and tests
        self.ascp = ascp
        if ascp is not None:
            if session_files < 1:
                raise UsageError("--batch-files must be at least 1")
            # a few sessions at once: each fills the path it is given (ascp's own rate control)
            self.features = dataclasses.replace(self.features, pull_sessions=True, session_items=session_files,
                                                max_concurrency=ASCP_SESSIONS)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._api is None:
            self._api = ApiClient(timeout=60.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> ApiClient:
        if self._api is None:
            raise RuntimeError("use the adapter as 'async with ImmportAdapter(...)'")
        return self._api

    def describe(self) -> str:
        what = ([f"study={self.study}"] if self.study else []) + list(self.paths)
        return f"immport:{self.endpoints.query} " + " ".join(what)

    async def finish(self, ok: bool) -> dict[str, Any]:
        """Nothing to commit on a pull; says how often we had to log in (1 + token renewals) and the route."""
        return {"logins": self.logins, "route": "ascp" if self.ascp is not None else "https"}

    async def open_fetch_session(self, plan: FetchPlan) -> SessionReader:
        """An ascp session over ``plan`` with a token for exactly its paths (the ascp route).

        :raises AuthError: ImmPort refused the token.
        """
        from asyncdepo.adapters.immport_ascp import AscpFetch

        if self.ascp is None:
            raise UsageError("this ImmPort adapter has no ascp options (use the https route)")
        path_of = {f.item.rel: immport_path(f.item.rel) for f in plan.fetches}
        return AscpFetch(self.ascp, plan, await self.aspera_token(list(path_of.values())), path_of)

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        raise UsageError("ImmPort shared data is read-only here: use 'asyncdepo pull immport'")

    # -- authentication -----------------------------------------------------------------------------
    async def login(self) -> str:
        """Get a fresh bearer token.

        :raises AuthError: the credentials were refused (the message says so plainly).
        :raises TransientError: the auth service could not be reached or failed (5xx).
        """
        url = f"{self.endpoints.auth}/auth/token"
        form = {"username": self.user, "password": self._password.get()}
        r = await self.http.request("POST", url, form=form)  # network failures arrive mapped (ApiClient)
        if r.status in (400, 401, 403):
            detail = message_of(r.body)
            raise AuthError(f"ImmPort login refused for user {self.user!r}: {detail or r.status}",
                            status=r.status, hint=LOGIN_HINT)
        if r.status >= 400:
            raise status_error(r.status, message_of(r.body), what="ImmPort login",
                             retry_after=r.headers.get("retry-after"))
        body = _json(r, "ImmPort login")
        token = body.get("access_token") or body.get("token") if isinstance(body, dict) else None
        if not token:
            raise AuthError("ImmPort login answered without a token", hint=LOGIN_HINT)
        self.logins += 1
        return str(token)

    async def authenticate(self) -> None:
        """Log in now (a wrong password then fails before anything else happens).

        :raises AuthError: the credentials were refused.
        """
        await self._current_token()

    async def _current_token(self) -> str:
        if self._token is None:
            async with self._lock:
                if self._token is None:
                    self._token = await self.pacer.call(self.login)
        return self._token

    async def _renew(self, stale: str) -> None:
        """Replace ``stale`` with a new token, once however many workers saw it expire."""
        async with self._lock:
            if self._token == stale:
                self._token = None
                self._token = await self.pacer.call(self.login)

    async def call(self, method: str, path: str, *, base: str | None = None, json: Any = None,
                   what: str | None = None) -> Any:
        """An authenticated JSON API call, retried when transient, with one token renewal on a 401.

        :raises AuthError: still 401/403 after a renewal, or the login was refused.
        :raises RemoteValidationError: 400/404 (the message is the archive's).
        :raises TransientError: after the pacer's attempts ran out.
        """
        url = f"{base or self.endpoints.api}{path}"
        what = what or f"{method} {path}"

        async def send() -> Any:
            token = await self._current_token()
            return token, await self.http.request(method, url, json=json,
                                                  headers={"Authorization": f"bearer {token}"})

        async def once() -> Any:
            token, r = await send()
            if r.status == 401:  # expired (or revoked): not a retry but a new token, then the same request
                await self._renew(token)
                _, r = await send()
            if r.status >= 400:
                raise status_error(r.status, message_of(r.body), what=what,
                                   retry_after=r.headers.get("retry-after"))
            return _json(r, what)

        return await self.pacer.call(once)

    # -- listing ------------------------------------------------------------------------------------
    async def manifest(self, study: str) -> list[dict[str, Any]]:
        """The study's file manifest (fetched once per adapter)."""
        if study not in self._manifests:
            rows = await self.call("GET", f"/data/query/api/study/manifest/{study}", base=self.endpoints.query,
                                   what=f"manifest of {study}")
            if not isinstance(rows, list):
                raise RemoteValidationError(f"manifest of {study}: expected a list of files")
            self._manifests[study] = rows
        return self._manifests[study]

    @staticmethod
    def item_of(row: Mapping[str, Any]) -> RemoteItem:
        """A RemoteItem from a manifest row (``path`` may be the file's path or its directory)."""
        path, name = str(row.get("path") or ""), str(row.get("fileName") or "")
        if name and path.rstrip("/").rsplit("/", 1)[-1] != name:
            path = path.rstrip("/") + "/" + name
        md5 = str(row.get("generatedMD5") or "")
        size = row.get("filesizeBytes")
        return RemoteItem(rel=safe_rel(path), size=int(size) if size is not None else None,
                          digests={"md5": md5.lower()} if MD5.match(md5) else {},
                          ref=str(row.get("fileUUID") or ""))

    async def _listed(self, path: str) -> AsyncIterator[RemoteItem]:
        """Files under ``path`` by ``data/list`` (no md5, no DRS id), depth first."""
        body = await self.call("POST", "/data/list", json={"path": path}, what=f"list {path}")
        me = body.get("self") or {}
        if me.get("type") == "file":
            yield RemoteItem(rel=safe_rel(str(me.get("path") or path)), size=me.get("size"), digests={})
            return
        for entry in body.get("items") or []:
            sub = str(entry.get("path") or "")
            if entry.get("type") == "directory":
                async for item in self._listed(sub):
                    yield item
            elif entry.get("type") == "file":
                yield RemoteItem(rel=safe_rel(sub), size=entry.get("size"), digests={})

    async def resolve(self, path: str) -> AsyncIterator[RemoteItem]:
        """The files at or under one ImmPort path: from its study's manifest, else from ``data/list``."""
        rel = safe_rel(path)
        study = rel.split("/", 1)[0]
        found = False
        if STUDY.match(study):
            try:
                rows = await self.manifest(study)
            except RemoteValidationError:
                rows = []  # not a study the manifest knows: data/list decides whether the path exists
            for row in rows:
                item = self.item_of(row)
                if item.rel == rel or item.rel.startswith(rel + "/"):
                    found = True
                    yield item
        if not found:
            async for item in self._listed("/" + rel):
                yield item

    async def list_remote(self) -> AsyncIterator[RemoteItem]:
        """Every file to fetch, each once: the study's manifest first, then each path."""
        seen: set[str] = set()
        if self.study:
            for row in await self.manifest(self.study):
                item = self.item_of(row)
                if item.rel not in seen:
                    seen.add(item.rel)
                    yield item
        for path in self.paths:
            async for item in self.resolve(path):
                if item.rel not in seen:
                    seen.add(item.rel)
                    yield item

    async def aspera_token(self, paths: Sequence[str]) -> str:
        """A transfer token that lets ascp fetch exactly ``paths`` (ImmPort paths)."""
        body = await self.call("POST", "/data/download/token", json={"paths": list(paths)},
                               what=f"Aspera token for {len(paths)} path(s)")
        token = body.get("token") if isinstance(body, dict) else None
        if not token:
            raise AuthError("ImmPort gave no Aspera token", hint="check that your account may download")
        return str(token)

    # -- reading ------------------------------------------------------------------------------------
    async def signed_url(self, item: RemoteItem) -> str:
        """The DRS access URL of ``item`` (signed: it carries its own credentials, never logged)."""
        if not item.ref:
            raise PermanentError(f"{item.rel}: not in a study manifest, so it has no DRS id; "
                                 "fetch it with --via ascp")
        body = await self.call("GET", f"/data/query/drs/download/{self.drs}/{item.ref}",
                               base=self.endpoints.query, what=f"DRS lookup of {item.rel}")
        url = body.get("url") if isinstance(body, dict) else None
        if not url:
            raise RemoteValidationError(f"DRS lookup of {item.rel}: {body.get('message') or 'no url'}")
        return str(url)

    async def plain_get(self, item: RemoteItem) -> PlainGet:
        """The signed DRS URL as a plain GET: the engine receives, hashes and writes it in a thread."""
        return PlainGet(url=await self.signed_url(item), what=f"GET {item.rel}")

    async def read(self, item: RemoteItem, offset: int) -> AsyncIterator[bytes]:
        """``item``'s bytes from ``offset`` to the end: a DRS lookup, then one ranged GET.

        :raises TransientError: network failure or 5xx, also mid-body (the engine resumes from the bytes
            it kept); :raises PermanentError: no DRS id, 403/404 on the URL.
        """
        if item.size is not None and offset >= item.size:
            return
        url = await self.signed_url(item)
        what = f"GET {item.rel}"  # never the URL: its query is a credential
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        left = None if item.size is None else item.size - offset
        pending: list[bytes] = []
        held = 0

        if self._http is None:
            self._http = httpbody.client_session()
        try:
            async with self._http.get(url, headers=headers, timeout=httpbody.request_timeout(left)) as r:
                if r.status >= 400:
                    raise status_error(r.status, message_of(await r.read()), what=what,
                                       retry_after=r.headers.get("Retry-After"))
                skip = 0
                if offset:
                    got = r.headers.get("Content-Range", "")
                    m = re.match(r"bytes (\d+)-", got)
                    if r.status == 200:
                        skip = offset  # the server ignored Range: drop the prefix we already hold
                    elif not m or int(m.group(1)) != offset:
                        raise TransientError(f"{what}: asked for bytes from {offset}, got {got!r}")
                # coalesce the socket's small pieces into blocks of READ_BLOCK or more (the engine spends
                # two thread hops per block); a piece that is large enough on its own goes as it is
                async for data in r.content.iter_any():
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    pending.append(data)
                    held += len(data)
                    if held >= READ_BLOCK:
                        yield pending[0] if len(pending) == 1 else b"".join(pending)
                        pending, held = [], 0
                if held:
                    yield b"".join(pending)
                    pending, held = [], 0
        except Exception as exc:
            if not is_transport_failure(exc):
                raise
            if held:  # keep what did arrive: the engine writes it and resumes after it
                yield b"".join(pending)
            raise connection_error(exc, what) from None

