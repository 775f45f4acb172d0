"""The Protein Diffraction Image Server (PDIS, proteindiffraction.org REST API v1) as a packed target.

One dataset directory is one job: the engine streams it as tar -> zstd (``Features(packed=True)``) through
``open_item`` + ``writer.write_stream(source)``; the writer sends it as the ``dataset_file`` field of a
``multipart/form-data`` ``POST upload/`` (the transport's ``form_file_payload``: no temp file, chunked
transfer encoding because the compressed size is not known in advance). ``writer.complete``
compares the server's ``md5hash``/``size`` (of the stored, decompressed archive) with the inner tar's md5 and
size that the engine computed while streaming; ``finish(ok)`` submits the metadata (``POST submit/``).
Waiting for a terminal status (``wait_for``) is separate from ``finish`` because the engine runs ``finish``
shielded from cancellation, and a wait may last hours; the CLI calls it after the push.

Idempotence and resume:

* a retried upload whose first answer was lost gets 409 (duplicate file hash): ``complete`` then looks the
  md5 up in ``GET submissions/`` and carries on with that submission (submitting only if it is still
  ``uploaded``); no match (another account holds that file) -> ConflictError;
* ``job_state()`` = ``{"upload": {token, md5, size, filename, pdbid}, "submitted": bool}`` (the upload
  token is not a credential: using it needs the API token). When the engine skips the packed item because
  its journal says it is done, ``finish`` submits from this restored state without re-uploading. When an
  earlier upload is restored but the item is sent again anyway, the new upload's 409 leads back to the
  same submission, and an older ``uploaded`` submission with a different md5 (the data changed) is deleted;
* an upload that landed while its client was killed is in no journal: after each upload ``complete`` lists
  the account's submissions (``GET submissions/``, the one way the API offers to find them) and deletes
  every other never-submitted (``uploaded``) one with the same file name and PDB id, i.e. an earlier upload
  of this dataset that would otherwise stay ``uploaded`` for ever. (Another never-submitted upload of a
  dataset with the same name and PDB id is taken for an earlier version of this one.)

Credentials: the API token is sent only as ``Authorization: Token ...`` to the server's own origin; it is
never in ``describe()``, ``job_state()``, messages or the journal. Errors: 401 -> AuthError (log in again;
at login: the email or password was refused), 403 -> AuthError (another account's submission), 400 ->
RemoteValidationError naming the field the server named, except a body damaged on the way (400 "corrupt zstd
stream", "truncated zstd stream") -> BodyDamagedError, an IntegrityError retried with a fresh read of the
dataset; 404 -> RemoteValidationError, 409 -> ConflictError, 5xx/429/network -> TransientError (through
``transport.failures.status_error``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import aiohttp
import anyio
import orjson

from asyncdepo.contract import Adapter, ByteSource, ChunkWriter, Features, Item
from asyncdepo.errors import (
    AuthError,
    BodyDamagedError,
    ConflictError,
    DepoError,
    IntegrityError,
    PermanentError,
    TransferError,
    TransientError,
    UsageError,
    ValidationError,
)
from asyncdepo.transport.failures import boundary, status_error
from asyncdepo.transport.httpbody import client_session, form_file_payload
from asyncdepo.transport.pacer import Pacer

T = TypeVar("T")

DEFAULT_SERVER = "https://proteindiffraction.org/api/v1/"
PDB_CODE = re.compile(r"^[0-9][A-Za-z0-9]{3}$")
STALL_SECONDS = 300.0  # a body write that makes no progress this long is a stalled upload

# status -> (meaning, what to do next, terminal, success)
STATUSES: dict[str, tuple[str, str, bool, bool]] = {
    "uploaded": ("file received, waiting for metadata", "submit it (asyncdepo push pdis again, or POST submit/)",
                 False, False),
    "submitted": ("metadata confirmed, queued for validation", "wait", False, False),
    "pending": ("validation in progress", "wait", False, False),
    "validated": ("archive structure OK, metadata harvesting in progress", "wait", False, False),
    "published": ("data publicly accessible", "nothing: done", True, True),
    "error_no_data": ("no diffraction images found in the archive",
                      "delete it (asyncdepo pdis delete TOKEN) and upload a corrected archive", True, False),
    "inconsistent_datasets": ("several non-matching datasets were found in the archive",
                              "contact PDIS support, or split the data and resubmit", True, False),
    "header_not_readable": ("image headers could not be parsed",
                            "check the image format; contact PDIS support", True, False),
}


def normalize_server(url: str) -> str:
    """``https://host`` -> ``https://host/api/v1/``; any other path is kept with a trailing slash.

    :raises UsageError: not an http(s) URL, or credentials embedded in it.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server {url!r}: expected an http(s) URL such as {DEFAULT_SERVER}")
    if parts.username or parts.password or parts.query:
        raise UsageError("--server must not carry credentials or a query; use `asyncdepo login pdis`")
    path = parts.path if parts.path not in ("", "/") else "/api/v1/"
    return f"{parts.scheme}://{parts.netloc}{path.rstrip('/')}/"


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What ``submit/`` receives besides the token. ``pdb_code="auto"`` uses the id the server detected."""

    pdb_code: str | None = None
    dataset_type: str = "pdb"
    project_title: str | None = None
    project_authors: str | None = None
    synchrotron_id: int | None = None
    beamline_id: int | None = None
    equipment_other: str | None = None

    def validate(self) -> None:
        """The spec's rules, checked before any byte is sent.

        :raises ValidationError: naming the first offending field.
        """
        if self.dataset_type not in ("pdb", "other"):
            raise ValidationError("dataset_type", "must be 'pdb' or 'other'")
        pdb = self.pdb_code
        if pdb and pdb != "auto" and not PDB_CODE.match(pdb):
            raise ValidationError("pdb_code", f"{pdb!r} is not a PDB ID (4 characters: a digit, then 3 "
                                  "letters or digits, e.g. 1ABC)", hint="use --pdb 1ABC, or --pdb auto")
        if not pdb and self.dataset_type != "other":
            raise ValidationError("pdb_code", "required unless the dataset type is 'other'",
                                  hint="give --pdb 1ABC (or --pdb auto), or --dataset-type other")
        if (self.synchrotron_id is None) != (self.beamline_id is None):
            missing = "beamline_id" if self.beamline_id is None else "synchrotron_id"
            raise ValidationError(missing, "synchrotron_id and beamline_id go together",
                                  hint="see `asyncdepo pdis equipment` for the ids")
        if not pdb:
            title = (self.project_title or "").strip()
            if len(title) < 10:
                raise ValidationError("project_title", f"at least 10 characters are required without a PDB "
                                      f"code (got {len(title)})", hint="give --title")
            if not (self.project_authors or "").strip():
                raise ValidationError("project_authors", "required without a PDB code", hint="give --authors")
            if self.synchrotron_id is None and not (self.equipment_other or "").strip():
                raise ValidationError("equipment_other", "without a PDB code, give --equipment-other or "
                                      "--synchrotron-id with --beamline-id")

    def check_equipment(self, equipment: list[dict[str, Any]]) -> None:
        """Check synchrotron/beamline ids against ``GET equipment/``; raises ValidationError."""
        if self.synchrotron_id is None:
            return
        sync = next((s for s in equipment if s.get("id") == self.synchrotron_id), None)
        if sync is None:
            raise ValidationError("synchrotron_id", f"no synchrotron {self.synchrotron_id} at PDIS",
                                  hint="see `asyncdepo pdis equipment`")
        if not any(b.get("id") == self.beamline_id for b in sync.get("beamlines", [])):
            raise ValidationError("beamline_id", f"beamline {self.beamline_id} is not at {sync.get('short')}",
                                  hint="see `asyncdepo pdis equipment`")

    def fields(self, detected: str | None) -> dict[str, Any]:
        """The ``submit/`` JSON fields (without the token).

        :raises ValidationError: ``--pdb auto`` and the server detected no PDB id.
        """
        pdb = self.pdb_code
        if pdb == "auto":
            if not detected:
                raise ValidationError("pdb_code", "--pdb auto: PDIS detected no PDB id in this dataset",
                                      hint="run the same command again with --pdb CODE to submit it")
            pdb = detected
        out: dict[str, Any] = {"dataset_type": self.dataset_type}
        for key, value in (("pdb_code", pdb.upper() if pdb else None), ("project_title", self.project_title),
                           ("project_authors", self.project_authors), ("synchrotron_id", self.synchrotron_id),
                           ("beamline_id", self.beamline_id), ("equipment_other", self.equipment_other)):
            if value not in (None, ""):
                out[key] = value
        return out


class PdisClient:
    """The API calls, with the token, timeouts and error mapping. ``async with PdisClient(...)``.

    :param server: the API base URL (see :func:`normalize_server`).
    :param token: the API token (None only for :meth:`login`).
    """

    def __init__(self, server: str, token: str | None, *, pacer: Pacer | None = None) -> None:
        self.base = normalize_server(server)
        self._token = token
        self.pacer = pacer or Pacer()
        self.session: aiohttp.ClientSession | None = None
        self._equipment: list[dict[str, Any]] | None = None

    async def __aenter__(self) -> Self:
        self.session = client_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(self, method: str, path: str, *, json: Any = None, data: Any = None,
                      ok: tuple[int, ...] = (200, 201, 204), timeout: aiohttp.ClientTimeout | None = None,
                      subject: str = "") -> tuple[int, Any]:
        """One request; returns (status, decoded JSON or None).

        :raises AuthError | RemoteValidationError | ConflictError | TransientError: mapped statuses.
        """
        assert self.session is not None, "use the client as 'async with client:'"
        what = f"pdis {method} {path}"
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Token {self._token}"
        with boundary(what):
            async with self.session.request(method, self.base + path, headers=headers, json=json, data=data,
                                            timeout=timeout, allow_redirects=False) as resp:
                raw = await resp.read()
                try:
                    body = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    body = None
                if resp.status in ok:
                    return resp.status, body
                message = str(body.get("error") or body) if isinstance(body, dict) else (resp.reason or "")
                raise _status_error(resp.status, message, resp.headers.get("Retry-After"), what, subject)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        """:meth:`request` with per-request retries of transient failures; returns the JSON body."""
        async def once() -> Any:
            return (await self.request(method, path, **kw))[1]

        return await self.pacer.call(once)

    async def login(self, email: str, password: str) -> str:
        """Exchange email and password for the API token.

        :raises AuthError: PDIS refused the email or the password (the message says so, not "the token").
        """
        try:
            body = await self.call("POST", "auth/token/", data={"username": email, "password": password})
        except AuthError as exc:
            raise AuthError(f"pdis POST auth/token/: PDIS refused the email or the password (HTTP {exc.status})",
                            status=exc.status, hint="check the email and the password") from None
        token = (body or {}).get("token")
        if not isinstance(token, str) or not token:
            raise TransientError("pdis POST auth/token/: no token in the answer")
        return token

    async def equipment(self) -> list[dict[str, Any]]:
        """``GET equipment/`` (cached); also proves the token is accepted."""
        if self._equipment is None:
            self._equipment = list(await self.call("GET", "equipment/") or [])
        return self._equipment

    async def submissions(self) -> list[dict[str, Any]]:
        return list(await self.call("GET", "submissions/") or [])

    async def submission(self, token: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"submissions/{token}/", subject=token) or {})

    async def delete(self, token: str) -> None:
        await self.call("DELETE", f"submissions/{token}/", subject=token)

    async def submit(self, token: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        return dict(await self.call("POST", "submit/", json={"token": token, **fields}, subject=token) or {})

    async def wait_for(self, token: str, *, interval: float = 5.0, cap: float = 60.0,
                       timeout: float | None = None,
                       on_status: Callable[[str, dict[str, Any]], None] | None = None,
                       sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> dict[str, Any]:
        """Poll ``submissions/<token>/`` until a terminal status (interval x1.5 per poll, up to ``cap``).

        :raises TransientError: ``timeout`` seconds passed without a terminal status.
        """
        waited, last = 0.0, None
        while True:
            sub = await self.submission(token)
            status = str(sub.get("status"))
            if status != last and on_status is not None:
                on_status(status, sub)
            last = status
            if STATUSES.get(status, ("", "", False, False))[2] or status == "uploaded":
                return sub
            if timeout is not None and waited >= timeout:
                raise TransientError(f"submission {token}: still {status} after {waited:.0f} s",
                                     hint=f"check later: asyncdepo pdis status {token} --wait")
            await sleep(interval)
            waited += interval
            interval = min(cap, interval * 1.5) if interval > 0 else 0.0


def _damaged(status: int, message: str) -> type[TransferError] | None:
    """PDIS's quirk: a body damaged on the way (a bit flipped in the zstd stream, a cut-off stream) is
    answered 400 like a bad request; it is an integrity failure, sent again with a fresh read."""
    text = message.lower()
    if status == 400 and ("corrupt" in text or "truncated" in text) and "zstd" in text:
        return BodyDamagedError
    return None


def _status_error(status: int, message: str, retry_after: str | None, what: str, subject: str) -> TransferError:
    """PDIS's answers in its own words: which token, which submission; the classes are the generic ones."""
    if status == 401:
        message = f"PDIS refused the API token ({message})"
    elif status == 403:
        message = f"submission {subject or '?'} belongs to another account ({message})"
    elif status == 400 and _damaged(status, message) is None:
        message = f"PDIS refused the request: {message}"
    hint = ("run `asyncdepo login pdis` again, or set ASYNCDEPO_PDIS_TOKEN" if status == 401 else
            "use the API token of the account that uploaded it" if status == 403 else None)
    return status_error(status, message, what=what, retry_after=retry_after, refine=_damaged,
                        hints={AuthError: hint} if hint else None)


class PdisWriter(ChunkWriter):
    """The upload of one packed dataset; see the module docstring."""

    def __init__(self, adapter: PdisAdapter, item: Item) -> None:
        super().__init__()
        self._adapter = adapter
        self.item = item
        self._answer: dict[str, Any] | None = None
        self._conflict = False

    async def write_stream(self, source: ByteSource) -> None:
        """POST upload/ with the stream as ``dataset_file``; a 409 (duplicate hash) is resolved in complete.

        :raises TransientError | PermanentError: from the server or the network (the engine retries
            transient ones with a new source).
        """
        self._answer, self._conflict = None, False
        client = self._adapter.client
        # each write must make progress within STALL_SECONDS: with no total timeout on an upload of unknown
        # size, that is what catches a stalled peer
        body = form_file_payload(source, field="dataset_file", filename=self.item.rel,
                                 fields={"dataset_type": self._adapter.metadata.dataset_type},
                                 stall=STALL_SECONDS, what="pdis POST upload/")
        # no total timeout (the size is unknown); the body's stall guard and sock_read cover hangs
        timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=900)
        try:
            _, self._answer = await client.request("POST", "upload/", data=body, ok=(201, 200), timeout=timeout)
        except ConflictError:
            self._conflict = True

    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """Check the stored archive's md5/size against the tar we built (or resolve a 409 by md5).

        :raises IntegrityError: the server stored something else (that upload is deleted first).
        :raises ConflictError: 409 and no submission of ours has this md5.
        """
        adapter, md5 = self._adapter, digests.get("md5", "")
        state = adapter.state
        listed: list[dict[str, Any]] | None = None
        if self._conflict:
            listed = await adapter.client.submissions()
            found = next((s for s in listed if s.get("md5hash") == md5), None)
            if found is None:
                raise ConflictError(f"{self.item.rel}: PDIS already holds an archive with md5 {md5}, but not "
                                    "in this account's submissions", hint="ask PDIS support about the duplicate")
            upload = {"token": found["token"], "md5": md5, "size": size,
                      "filename": found.get("original_filename"), "pdbid": found.get("pdbid")}
            submitted = found.get("status") != "uploaded"
            adapter.reporter_message(f"{self.item.rel}: PDIS already had this archive (submission "
                                     f"{found['token']}, {found.get('status')}); carrying on with it")
        else:
            answer = self._answer or {}
            token = str(answer.get("token") or "")
            if answer.get("md5hash") != md5 or answer.get("size") != size:
                if token:
                    await _quietly(adapter.client.delete(token))
                raise IntegrityError(f"{self.item.rel}: PDIS stored md5 {answer.get('md5hash')} size "
                                     f"{answer.get('size')}, but the tar sent has md5 {md5} size {size}")
            upload = {"token": token, "md5": md5, "size": size, "filename": answer.get("filename"),
                      "pdbid": answer.get("pdbid")}
            submitted = False
            if answer.get("is_pdb_exists"):
                adapter.reporter_message(f"{self.item.rel}: note: PDB {answer.get('pdbid')} already has a "
                                         "dataset in PDIS")
        old = state.get("upload") or {}
        stale = {old["token"]} if old.get("token") and not state.get("submitted") else set()
        if listed is None:
            listed = await _quietly(adapter.client.submissions()) or []
        # earlier uploads of this dataset that were never submitted: a changed dataset's (journaled), or one
        # that landed while its client was killed (never journaled: found by its name and PDB id)
        stale |= {str(s["token"]) for s in listed
                  if s.get("token") and s.get("status") == "uploaded"
                  and s.get("original_filename") == upload["filename"] and s.get("pdbid") == upload["pdbid"]}
        for token in sorted(stale - {upload["token"]}):
            await _quietly(adapter.client.delete(token))
        adapter.state = {"upload": upload, "submitted": submitted}
        self.confirmed = size
        return dict(upload)


async def _quietly(aw: Awaitable[T]) -> T | None:
    """Best-effort cleanup: a failure must not hide the error being reported (None then)."""
    with contextlib.suppress(Exception):
        return await aw
    return None


class PdisAdapter(Adapter):
    """One dataset pushed to PDIS through a shared :class:`PdisClient`.

    :param client: an entered client (shared by the datasets of one command).
    :param metadata: validated with :meth:`Metadata.validate` by the caller or in ``__aenter__``.
    """

    name = "pdis"
    features = Features(packed=True, item_digests=("md5",), server_digest="md5", max_concurrency=1)

    def __init__(self, client: PdisClient, metadata: Metadata, *,
                 on_message: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.metadata = metadata
        self.state: dict[str, Any] = {}
        self.result: dict[str, Any] = {}
        self.error: DepoError | None = None  # why finish failed, for the caller's message and exit status
        self._on_message = on_message

    def reporter_message(self, text: str) -> None:
        if self._on_message is not None:
            self._on_message(text)

    def describe(self) -> str:
        return f"pdis {self.client.base}"

    async def __aenter__(self) -> Self:
        """Validate the metadata and the token (``GET equipment/``) before any byte moves."""
        self.metadata.validate()
        self.metadata.check_equipment(await self.client.equipment())
        return self

    def job_state(self) -> dict[str, Any]:
        return dict(self.state)

    def restore_job_state(self, state: Mapping[str, Any]) -> None:
        if isinstance(state.get("upload"), dict) and state["upload"].get("token"):
            self.state = {"upload": dict(state["upload"]), "submitted": bool(state.get("submitted"))}

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        return PdisWriter(self, item)

    async def finish(self, ok: bool) -> dict[str, Any]:
        """Submit the metadata for the upload (unless already submitted); returns the summary.

        :raises ValidationError: ``--pdb auto`` and no PDB id was detected (the upload stays; re-run).
        :raises PermanentError | TransientError: from ``submit/``.
        """
        upload = self.state.get("upload")
        if not ok:
            return dict(self.result)
        if not upload:
            # the engine skipped the upload as done in an earlier run, but no upload token was journaled
            raise PermanentError("pdis: this dataset was uploaded by an earlier run, but its upload token "
                                 "was not kept in the journal, so it cannot be submitted from here",
                                 hint="find it with `asyncdepo pdis submissions` (status uploaded), or push "
                                 "again with a fresh --journal")
        self.result = {"token": upload["token"], "md5": upload["md5"], "size": upload["size"],
                       "pdbid": upload.get("pdbid"), "status": "uploaded"}
        if not self.state.get("submitted"):
            try:
                fields = self.metadata.fields(upload.get("pdbid"))
                await self.client.submit(upload["token"], fields)
            except ConflictError:
                fields = {}  # already processed: an earlier submit whose answer was lost
            except DepoError as exc:
                self.error = exc
                raise
            self.state["submitted"] = True
            if fields.get("pdb_code"):
                self.result["pdbid"] = fields["pdb_code"]
        self.result["status"] = "submitted"
        return dict(self.result)
