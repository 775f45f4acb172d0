"""The EMPIAR deposition API (``/empiar/deposition/api/``) for tests, the demo and the reference client.

Routes (each answers ``Content-Type: application/json`` exactly, as the reference client demands)::

    POST /empiar/deposition/api/deposit_entry/    deposition JSON -> {"deposition": true, "directory", "entry_id"}
    PUT  /empiar/deposition/api/redeposit_entry/  deposition JSON + "entry_id" -> the same shape
    POST /empiar/deposition/api/image_upload/     multipart entry_id + file (PNG >= 400 x 400) -> {"thumbnail_upload": true}
    POST /empiar/deposition/api/grant_rights/     {"u"|"e"|"o": {who: rights}, "entry_id"} -> {who: true, ...}
    POST /empiar/deposition/api/submit_entry/     {"entry_id": "42"} -> {"submission": true, "empiar_id": "EMPIAR-10042"}
    GET  /_sim/empiar                             entries (metadata summary, rights, submitted) and the request log

Behaviour and choices:

* Auth as Django REST framework does it: ``Authorization: Token <t>`` or HTTP basic; errors are
  ``{"detail": ...}``: 401 ``Authentication credentials were not provided.`` / ``Invalid token.`` /
  ``Invalid username/password.``; 403 ``You do not have permission to perform this action.`` when the
  user has no (sufficient) rights on the entry; 404 ``Not found.``; 405 ``Method "GET" not allowed.``;
  415 for a JSON call whose body is not ``application/json``.
* The deposition JSON is checked by the server's own rules (:mod:`asyncdepo.sim.empiar_rules`, written apart
  from the client's validator so that one bug cannot pass both sides); a bad one is 400 with ``detail``
  (the first problem, ``field: message``) and ``errors`` (``{field path: [messages]}``, DRF's wording).
* Creating an entry makes its upload area ``ROOT/<upload-prefix>/<DIR>/data`` (prefix ``upload`` as on the
  real server; the reference client's ``-dl`` mode writes to ``tmp/andrii``). The stand-in ascp, run with
  ``ASYNCDEPO_SIM_ASCP_ROOT=ROOT``, maps ``host:upload/<DIR>/data`` onto it; the Globus simulator, given the
  same root, writes there too.
* ``submit_entry`` refuses (400) an entry any of whose image-set directories (``data/...`` in the JSON) is
  missing or holds no file in the upload area; a second submit, or a re-deposit after submission, is 409.
* ``grant_rights`` answers a key only for grantees it knows (users given with ``--user``, found by
  username, e-mail or ORCID); a rights value outside 1-4, or two owners in one request, is 400. Granting 1
  makes that person the owner. Only the owner may grant; view+edit (3) may re-deposit and upload a
  thumbnail, 4 may also submit.
* State (entries, next id) is saved to ``ROOT/empiar-state.json`` after each change and loaded at start, so
  a restarted simulator still knows its entries. Thumbnails are kept as ``ROOT/thumbnails/<entry_id>.png``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import email.parser
import email.policy
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from asyncdepo.sim.empiar_rules import deposition_errors, inside_data, thumbnail_problem
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import make_app

API = "/empiar/deposition/api/"
STATE_KEY: web.AppKey[EmpiarState] = web.AppKey("empiar_state", object)  # type: ignore[arg-type]
OWNER, VIEW, EDIT, SUBMIT = 1, 2, 3, 4
NO_PERMISSION = "You do not have permission to perform this action."


@dataclasses.dataclass
class Person:
    """A registered EMPIAR user the simulator can authenticate and grant rights to."""

    username: str
    password: str
    email: str
    orcid: str | None = None


@dataclasses.dataclass
class Entry:
    """One deposition: its metadata, upload directory, rights and submission state."""

    entry_id: int
    directory: str
    owner: str
    metadata: dict[str, Any]
    rights: dict[str, int] = dataclasses.field(default_factory=dict)
    thumbnail: bool = False
    submitted: bool = False
    empiar_id: str | None = None
    redeposits: int = 0


class Reject(Exception):
    """Answer ``status`` with ``{"detail": detail, **extra}``."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extra = extra


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer whose Content-Type is ``application/json`` with no charset (the reference client
    compares the header for equality)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


class EmpiarState:
    """Entries, users and the request log of one simulator; persisted under ``root``."""

    def __init__(self, root: Path, upload_prefix: str, tokens: dict[str, str], people: list[Person]) -> None:
        self.root = root
        self.upload_prefix = upload_prefix.strip("/")
        self.tokens = tokens
        self.people = {p.username: p for p in people}
        self.entries: dict[int, Entry] = {}
        self.next_id = 1
        self.log: list[dict[str, Any]] = []
        self._file = root / "empiar-state.json"
        self._load()

    # -- persistence -----------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self._file.exists():
            return
        data = orjson.loads(self._file.read_bytes())
        self.next_id = int(data["next_id"])
        self.entries = {int(e["entry_id"]): Entry(**e) for e in data["entries"]}

    def save(self) -> None:
        data = {"next_id": self.next_id, "entries": [dataclasses.asdict(e) for e in self.entries.values()]}
        tmp = self._file.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self._file)

    # -- lookups ---------------------------------------------------------------------------------------
    def upload_area(self, entry: Entry) -> Path:
        """``ROOT/<prefix>/<DIR>/data``: where the entry's files land."""
        return self.root / self.upload_prefix / entry.directory / "data"

    def find_person(self, kind: str, key: str) -> Person | None:
        for person in self.people.values():
            if (kind == "u" and person.username == key) or (kind == "e" and person.email.lower() == key.lower()):
                return person
            if kind == "o" and person.orcid == key:
                return person
        return None

    def entry_for(self, raw_id: Any, user: str, need: int) -> Entry:
        """The entry ``raw_id`` (int or digit string) if ``user`` holds rights ``need`` or better on it.

        :raises Reject: 400 bad id, 404 unknown, 403 not allowed.
        """
        if isinstance(raw_id, bool) or raw_id is None or not str(raw_id).strip().isdigit():
            raise Reject(400, "entry_id: a valid integer is required.")
        entry = self.entries.get(int(str(raw_id).strip()))
        if entry is None:
            raise Reject(404, "Not found.")
        held = OWNER if entry.owner == user else entry.rights.get(user, 0)
        # rights are ordered by power, except that the owner (1) may do everything
        if held != OWNER and held < need:
            raise Reject(403, NO_PERMISSION)
        return entry


# -- request helpers ----------------------------------------------------------------------------------
def _authenticate(request: web.Request, state: EmpiarState) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "token" and value.strip():
        user = state.tokens.get(value.strip())
        if user is None:
            raise Reject(401, "Invalid token.")
        return user
    if scheme.lower() == "basic" and value.strip():
        try:
            username, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Reject(401, "Invalid basic header. Credentials not correctly base64 encoded.") from None
        person = state.people.get(username)
        if person is None or not secrets.compare_digest(person.password, password):
            raise Reject(401, "Invalid username/password.")
        return username
    raise Reject(401, "Authentication credentials were not provided.")


async def _json_body(request: web.Request, faults: FaultInjector) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Reject(415, f'Unsupported media type "{request.content_type}" in request.')
    raw = await faults.read_all(request, limit=16 << 20)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Reject(400, f"JSON parse error - {exc}") from None
    if not isinstance(body, dict):
        raise Reject(400, "The body must be a JSON object.")
    return body


async def _form(request: web.Request, faults: FaultInjector) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as ``{name: (filename, bytes)}`` (small bodies only: thumbnails)."""
    if request.content_type != "multipart/form-data":
        raise Reject(415, f'Unsupported media type "{request.content_type}" in request.')
    raw = await faults.read_all(request, limit=32 << 20)
    head = f"Content-Type: {request.headers['Content-Type']}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _entry_answer(entry: Entry) -> dict[str, Any]:
    return {"deposition": True, "directory": entry.directory, "entry_id": entry.entry_id}


def _check_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in doc.items() if k != "entry_id"}
    found = deposition_errors(meta)
    if found:
        errors: dict[str, list[str]] = {}
        for field, message in found:
            errors.setdefault(field, []).append(message)
        raise Reject(400, f"{found[0][0]}: {found[0][1]}", errors=errors)
    return meta


def _empty_imagesets(state: EmpiarState, entry: Entry) -> list[str]:
    area = state.upload_area(entry)
    empty = []
    for imageset in entry.metadata.get("imagesets", []):
        rel = inside_data(str(imageset.get("directory", "")))
        folder = area / rel if rel else None
        if folder is None or not folder.is_dir() or not any(p.is_file() for p in folder.rglob("*")):
            empty.append(str(imageset.get("directory")))
    return empty


# -- handlers -----------------------------------------------------------------------------------------
Handler = Callable[[web.Request, str], Awaitable[web.Response]]


def _routes(app: web.Application, state: EmpiarState, faults: FaultInjector) -> None:
    async def deposit(request: web.Request, user: str) -> web.Response:
        meta = _check_metadata(await _json_body(request, faults))
        entry = Entry(state.next_id, secrets.token_hex(6).upper(), user, meta)
        state.next_id += 1
        state.upload_area(entry).mkdir(parents=True, exist_ok=True)
        state.entries[entry.entry_id] = entry
        state.save()
        return json_response(_entry_answer(entry))

    async def redeposit(request: web.Request, user: str) -> web.Response:
        body = await _json_body(request, faults)
        entry = state.entry_for(body.get("entry_id"), user, EDIT)
        meta = _check_metadata(body)
        if entry.submitted:
            raise Reject(409, "The entry has already been submitted and cannot be changed.")
        entry.metadata = meta
        entry.redeposits += 1
        state.upload_area(entry).mkdir(parents=True, exist_ok=True)
        state.save()
        return json_response(_entry_answer(entry))

    async def image_upload(request: web.Request, user: str) -> web.Response:
        fields = await _form(request, faults)
        entry = state.entry_for(fields.get("entry_id", (None, b""))[1].decode("utf-8", "replace"), user, EDIT)
        if "file" not in fields:
            raise Reject(400, "file: No file was submitted.")
        problem = thumbnail_problem(fields["file"][1])
        if problem is not None:
            raise Reject(400, f"file: {problem}")
        folder = state.root / "thumbnails"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{entry.entry_id}.png").write_bytes(fields["file"][1])
        entry.thumbnail = True
        state.save()
        return json_response({"thumbnail_upload": True})

    async def grant_rights(request: web.Request, user: str) -> web.Response:
        body = await _json_body(request, faults)
        entry = state.entry_for(body.get("entry_id"), user, OWNER)
        if entry.owner != user:
            raise Reject(403, NO_PERMISSION)
        wanted: list[tuple[str, str, int]] = []
        for kind in ("u", "e", "o"):
            given = body.get(kind) or {}
            if not isinstance(given, dict):
                raise Reject(400, f"{kind}: expected an object of {{grantee: rights}}.")
            for key, value in given.items():
                text = str(value).strip()
                if isinstance(value, bool) or text not in ("1", "2", "3", "4"):
                    raise Reject(400, f"{kind}: rights for {key!r} must be 1, 2, 3 or 4, not {value!r}.")
                wanted.append((kind, str(key), int(text)))
        if not wanted:
            raise Reject(400, "Nothing to grant: give u, e or o.")
        if sum(1 for w in wanted if w[2] == OWNER) > 1:
            raise Reject(400, "There can be only one deposition owner.")
        answer: dict[str, bool] = {}
        for kind, key, rights in wanted:
            person = state.find_person(kind, key)
            if person is None:
                continue  # unknown grantees get no key: that is how the client learns of them
            if rights == OWNER and person.username != entry.owner:
                entry.rights[entry.owner] = SUBMIT
                entry.owner = person.username
                entry.rights.pop(person.username, None)
            elif person.username != entry.owner:
                entry.rights[person.username] = rights
            answer[key] = True
        state.save()
        return json_response(answer)

    async def submit(request: web.Request, user: str) -> web.Response:
        body = await _json_body(request, faults)
        entry = state.entry_for(body.get("entry_id"), user, SUBMIT)
        if entry.submitted:
            raise Reject(409, f"The entry has already been submitted as {entry.empiar_id}.")
        empty = _empty_imagesets(state, entry)
        if empty:
            raise Reject(400, f"Image set directories are empty or missing in the upload area: {', '.join(empty)}.")
        entry.submitted = True
        entry.empiar_id = f"EMPIAR-{10000 + entry.entry_id}"
        state.save()
        return json_response({"submission": True, "empiar_id": entry.empiar_id})

    table: dict[str, tuple[str, Handler]] = {
        "deposit_entry/": ("POST", deposit),
        "redeposit_entry/": ("PUT", redeposit),
        "image_upload/": ("POST", image_upload),
        "grant_rights/": ("POST", grant_rights),
        "submit_entry/": ("POST", submit),
    }

    def endpoint(method: str, fn: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            record: dict[str, Any] = {
                "method": request.method,
                "path": request.path,
                "content_type": request.content_type,
                "auth": request.headers.get("Authorization", "").partition(" ")[0],
            }
            try:
                if request.method != method:
                    raise Reject(405, f'Method "{request.method}" not allowed.')
                user = _authenticate(request, state)
                response = await fn(request, user)
            except Reject as rej:
                headers = {"WWW-Authenticate": 'Token realm="api"'} if rej.status == 401 else None
                response = json_response({"detail": rej.detail, **rej.extra}, rej.status, headers)
            record["status"] = response.status
            state.log.append(record)
            del state.log[:-1000]  # bounded: the log is for tests and debugging
            return response

        return handle

    for name, (method, fn) in table.items():
        app.router.add_route("*", API + name, endpoint(method, fn))

    async def not_found(request: web.Request) -> web.Response:
        return json_response({"detail": "Not found."}, 404)

    async def inspect(_: web.Request) -> web.Response:
        entries = []
        for e in state.entries.values():
            entries.append(
                {
                    **dataclasses.asdict(e),
                    "metadata": {"title": e.metadata.get("title"), "imagesets": e.metadata.get("imagesets", [])},
                    "upload_area": str(state.upload_area(e)),
                }
            )
        return json_response({"entries": entries, "log": state.log})

    app.router.add_route("*", API + "{rest:.*}", not_found)
    app.router.add_get("/_sim/empiar", inspect)


# -- module contract ----------------------------------------------------------------------------------
DEFAULT_TOKEN = "sim-token"
DEFAULT_USERS = (
    "depositor:sim-password:depositor@example.org:0000-0002-1825-0097",
    "alice:alice-password:alice@example.org:0000-0001-2345-6789",
    "bob:bob-password:bob@example.org:0000-0003-1415-9265",
)


def parse_user(text: str) -> Person:
    """``USER:PASSWORD[:EMAIL[:ORCID]]`` -> Person (e-mail defaults to USER@example.org)."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"user {text!r}: expected USER:PASSWORD[:EMAIL[:ORCID]]")
    email_address = parts[2] if len(parts) > 2 and parts[2] else f"{parts[0]}@example.org"
    return Person(parts[0], parts[1], email_address, parts[3] if len(parts) > 3 and parts[3] else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The EMPIAR simulator's own flags."""
    parser.add_argument(
        "--token", action="append", default=[], metavar="TOKEN[=USER]",
        help=f"an API token and the user it belongs to (default {DEFAULT_TOKEN}=depositor; repeatable)",
    )
    parser.add_argument(
        "--user", action="append", default=[], metavar="USER:PASSWORD[:EMAIL[:ORCID]]",
        help="a registered user for basic auth and grant_rights (default: depositor, alice, bob; repeatable)",
    )
    parser.add_argument(
        "--upload-prefix", default="upload",
        help="folder under --root holding the entries' upload areas (default upload; the reference "
        "client's -dl mode uses tmp/andrii)",
    )


def build_app(root: Path, faults: FaultInjector, args: argparse.Namespace | None) -> web.Application:
    """The EMPIAR deposition API storing under ``root`` (see the module docstring)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    people = [parse_user(u) for u in (getattr(args, "user", None) or DEFAULT_USERS)]
    tokens: dict[str, str] = {}
    for spec in getattr(args, "token", None) or [f"{DEFAULT_TOKEN}=depositor"]:
        token, _, user = spec.partition("=")
        tokens[token] = user or people[0].username
    state = EmpiarState(root, getattr(args, "upload_prefix", None) or "upload", tokens, people)
    app = make_app(faults)
    app[STATE_KEY] = state
    _routes(app, state, faults)
    return app


def state_of(app: web.Application) -> EmpiarState:
    """The simulator's state, for in-process tests."""
    return app[STATE_KEY]
