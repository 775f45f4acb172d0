"""EMPIAR's deposition API (create, re-deposit, thumbnail, rights, submit) and the job state a deposition
journals (:class:`DepositState`). The files themselves go through the engine in sessions: see
:mod:`asyncdepo.adapters.empiar.adapter`.

Retries: each request is retried on transient failures (5xx, 429, network) with backoff — except the
creation of an entry on a network error, where the request may have reached the server: retrying could
create a second entry, so that failure ends the run and the message says to rerun (nothing was sent yet).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson

from asyncdepo import errors
from asyncdepo.transport.failures import boundary, status_error
from asyncdepo.transport.httpbody import request_timeout
from asyncdepo.transport.pacer import Pacer

DEFAULT_SERVER = "https://www.ebi.ac.uk"
ASCP_HOST = "emp_dep@hx-fasp-1.ebi.ac.uk"
# EMPIAR's Globus endpoint (the reference client still names the older d50a0618-6d04-11e5-ba46-22000b92c6ec)
EMPIAR_GLOBUS_ENDPOINT = "138b5c78-adef-4c12-89e6-2cd170bf63ed"
API_PATH = "/empiar/deposition/api/"
RIGHTS_KINDS = {"u": "usernames", "e": "emails", "o": "ORCIDs"}


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A token, or a username and password (HTTP basic). ``repr`` never shows the secret."""

    token: str | None = dataclasses.field(default=None, repr=False)
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def header(self) -> str:
        if self.token:
            return f"Token {self.token}"
        if self.username is not None and self.password is not None:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        raise errors.UsageError("no EMPIAR credentials: give an API token, or a username with -p")


@dataclasses.dataclass(frozen=True)
class Entry:
    entry_id: int
    directory: str


class EmpiarApi:
    """The deposition API at ``server`` (``https://www.ebi.ac.uk`` or a simulator's URL).

    :param session: an aiohttp session (the caller's; it decides TLS verification).
    """

    def __init__(self, session: aiohttp.ClientSession, server: str, credentials: Credentials, *,
                 pacer: Pacer | None = None) -> None:
        self._session = session
        self._credentials = credentials
        self.base = server.rstrip("/") + API_PATH
        self.pacer = pacer or Pacer()

    def __repr__(self) -> str:
        return f"EmpiarApi({self.base!r})"

    async def _call(self, method: str, name: str, *, body: Any = None, form: Callable[[], aiohttp.FormData] | None = None,
                    retry_network: bool = True) -> dict[str, Any]:
        what = f"EMPIAR {method} {name}"
        headers = {"Authorization": self._credentials.header(), "Accept": "application/json",
                   "Accept-Encoding": "identity"}

        async def once() -> dict[str, Any]:
            data: Any = form() if form is not None else None
            if body is not None:
                data = orjson.dumps(body)
                headers["Content-Type"] = "application/json"
            try:
                with boundary(what):
                    async with self._session.request(method, self.base + name, data=data, headers=headers,
                                                     timeout=request_timeout(0)) as resp:
                        raw = await resp.read()
                        status, ctype = resp.status, resp.content_type
                        retry_after = resp.headers.get("Retry-After")
            except errors.TransientError as err:
                if not retry_network:
                    raise errors.PermanentError(
                        f"{err}; the entry may or may not have been created",
                        hint="rerun the same command: nothing was transferred yet") from None
                raise err from None
            try:
                answer = orjson.loads(raw) if ctype == "application/json" else None
            except orjson.JSONDecodeError:
                answer = None
            if status >= 400:
                detail = answer.get("detail") if isinstance(answer, dict) else None
                text = str(detail) if detail else (raw[:200].decode("utf-8", "replace").strip() or "no detail")
                raise status_error(status, text, what=what, retry_after=retry_after, hints={
                    errors.AuthError: "check the EMPIAR API token (or the username and password given with -p)"}
                    if status == 401 else None)
            if not isinstance(answer, dict):
                raise errors.TransientError(f"{what}: HTTP {status} answered {ctype or 'no content type'}, "
                                            "not a JSON object", status=status)
            return answer

        return await self.pacer.call(once)

    @staticmethod
    def _entry(answer: Mapping[str, Any], what: str) -> Entry:
        entry_id, directory = answer.get("entry_id"), answer.get("directory")
        if answer.get("deposition") is not True or not isinstance(entry_id, int) or not directory:
            raise errors.RemoteValidationError(f"EMPIAR {what} was not successful: {dict(answer)}")
        return Entry(entry_id, str(directory))

    async def create(self, doc: Mapping[str, Any]) -> Entry:
        """POST ``deposit_entry/``: a new entry with its upload directory."""
        return self._entry(await self._call("POST", "deposit_entry/", body=doc, retry_network=False), "deposition")

    async def redeposit(self, doc: Mapping[str, Any], entry_id: int) -> Entry:
        """PUT ``redeposit_entry/``: replace an entry's metadata; the entry keeps its directory."""
        body = {**doc, "entry_id": str(entry_id)}
        return self._entry(await self._call("PUT", "redeposit_entry/", body=body), "re-deposition")

    async def upload_thumbnail(self, entry_id: int, path: Path) -> None:
        """POST ``image_upload/`` (multipart ``entry_id`` + ``file``)."""
        content = await anyio.Path(path).read_bytes()  # a thumbnail is small (checked before)

        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            f.add_field("entry_id", str(entry_id))
            f.add_field("file", content, filename=path.name, content_type="image/png")
            return f

        answer = await self._call("POST", "image_upload/", form=form)
        if answer.get("thumbnail_upload") is not True:
            raise errors.RemoteValidationError(f"EMPIAR thumbnail upload was not successful: {answer}")

    async def grant_rights(self, entry_id: int, kind: str, grants: Mapping[str, str]) -> None:
        """POST ``grant_rights/`` for one kind (``u`` usernames, ``e`` e-mails, ``o`` ORCIDs).

        :raises RemoteValidationError: naming the grantees EMPIAR did not confirm.
        """
        answer = await self._call("POST", "grant_rights/", body={kind: dict(grants), "entry_id": entry_id})
        missing = [who for who in grants if not answer.get(who)]
        if missing:
            raise errors.RemoteValidationError(
                f"EMPIAR did not grant rights to {', '.join(missing)} ({RIGHTS_KINDS[kind]} unknown to EMPIAR?)")

    async def submit(self, entry_id: int) -> str | None:
        """POST ``submit_entry/``; returns the EMPIAR accession, or None when the entry was already submitted."""
        try:
            answer = await self._call("POST", "submit_entry/", body={"entry_id": str(entry_id)})
        except errors.ConflictError:
            return None
        if answer.get("submission") is not True or not answer.get("empiar_id"):
            raise errors.RemoteValidationError(f"EMPIAR submission was not successful: {answer}")
        return str(answer["empiar_id"])


# -- the deposition's state ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class DepositState:
    """What a later run needs to continue (journaled; never a secret).

    ``phase``: ``new`` -> ``created`` -> ``uploaded`` -> ``granted`` -> ``submitted``; ``via`` maps each
    session group (an image set's remote folder, or ``+extra:<folder>`` for the files outside the image sets)
    to how its files went (``ascp``, ``globus``, or ``ascp+globus`` when its sessions went different ways).
    Which files were sent is in the journal, per file.
    """

    entry_id: int | None = None
    directory: str | None = None
    phase: str = "new"
    via: dict[str, str] = dataclasses.field(default_factory=dict)
    empiar_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DepositState:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
