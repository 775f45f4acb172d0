"""Simulator of the Protein Diffraction Image Server REST API v1 (``asyncdepo sim pdis --port P --root DIR``).

Serves ``/api/v1/`` as described in ``shared/archives/pdis.md``: ``auth/token/``, ``upload/``, ``submit/``,
``submissions/``, ``submissions/<token>/`` (GET, DELETE) and ``equipment/``, with the fault injector's
middleware and ``/_sim/`` control routes. Errors are ``{"error": "..."}`` with the spec's statuses.

**Users** come from ``--user EMAIL:PASSWORD`` (repeatable; default ``demo@example.org:demo``).
``POST auth/token/`` (form or JSON ``username``/``password``) answers the user's API token: 40 hex digits,
created on first login and kept (tokens do not expire). Wrong credentials -> 401, missing fields -> 400.

**Upload** (``pdis_store``): the multipart body is parsed from ``FaultInjector.body`` (counted, droppable);
``dataset_file`` is zstd-decompressed on the fly when it starts with the zstd magic, the inner archive must be
tar, tar.gz, tar.bz2 or zip by its magic bytes (else 400, nothing stored), its md5 and size are computed
while it is written. A file whose inner md5 equals any stored submission's -> 409 (duplicate file hash),
nothing stored. The archive is then scanned (``pdis_scan``: which members are diffraction images, the PDB
id rule, the verdict) and an unreadable archive -> 400.

**Storage** under ROOT::

    ROOT/tokens.json                       {token: email}, API tokens (0600)
    ROOT/incoming/<random>.part            uploads being received (removed on any failure)
    ROOT/submissions/<token>/<filename>    the stored inner archive (``original_filename``, zstd removed)
    ROOT/submissions/<token>/meta.json     the submission's fields, reloaded when the simulator restarts

**Status progression.** Upload -> ``uploaded``; ``submit/`` -> ``submitted``; then one step per
``--status-delay`` seconds: ``pending``, ``validated``, ``published`` — or, when the scan's verdict is an error,
``pending`` then that error (``error_no_data``, ``inconsistent_datasets``, ``header_not_readable``).
``--status-delay 0``: time does not move it, each ``GET submissions/<token>/`` advances one step before it
answers (so tests poll to the end at once); a negative delay: only ``POST /_sim/pdis/advance`` moves it.
``DELETE`` is allowed in ``uploaded``, ``validated`` and ``error_no_data`` (else 409). ``submit/`` on a
submission that is not ``uploaded`` -> 409 (already processed). Another user's token -> 403, unknown -> 404.

**Test controls** (not faults, so not in the fault middleware): ``POST /_sim/pdis/advance`` ``{"token"?, "steps"?}``;
``POST /_sim/pdis/lose-upload-responses`` ``{"count": N}``: the next N uploads are stored and then the connection
is aborted instead of answering (a lost response); ``GET /_sim/pdis/state``: every submission with its status
(all users). In-process tests reach the same through ``app[PDIS_STATE]`` (:class:`PdisState`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from asyncdepo.sim import pdis_scan
from asyncdepo.sim.faults import Dropped, FaultInjector, Handler
from asyncdepo.sim.pdis_state import PdisState, Submission, parse_user
from asyncdepo.sim.pdis_store import (
    ArchiveReceiver,
    MultipartError,
    MultipartParser,
    PartEnd,
    PartStart,
    UploadRefused,
    boundary_of,
)
from asyncdepo.sim.server import make_app

__all__ = ["PDIS_STATE", "PdisState", "Submission", "add_arguments", "build_app"]

PDIS_STATE: web.AppKey[PdisState] = web.AppKey("pdis_state", PdisState)
API = "/api/v1"
_BATCH = 1 << 20  # bytes handed to the receiver thread at a time
_FIELD_LIMIT = 64 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's own flags (besides --port/--root/--fault)."""
    parser.add_argument(
        "--status-delay",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds per status step after submit (0: each status GET advances a step; <0: only "
        "POST /_sim/pdis/advance); default 2",
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        type=_user_arg,
        metavar="EMAIL:PASSWORD",
        help="an account (repeatable); default demo@example.org:demo",
    )


def _user_arg(spec: str) -> str:
    try:
        parse_user(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class PdisApi:
    """The route handlers; state lives in :class:`PdisState`."""

    def __init__(self, state: PdisState, faults: FaultInjector) -> None:
        self.state = state
        self.faults = faults

    # -- helpers ---------------------------------------------------------------------------------------
    async def _drain(self, request: web.Request) -> None:
        """Read (and count) an unwanted body so the client sees our answer, not a reset."""
        try:
            async for _ in self.faults.body(request):
                pass
        except Dropped:
            pass

    def _user(self, request: web.Request) -> str | web.Response:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return _error(401, "Authentication credentials were not provided.")
        email = self.state.tokens.get(token.strip()) if scheme.lower() == "token" else None
        if email is None:
            return _error(401, "Invalid token.")
        return email

    def _owned(self, request: web.Request, email: str) -> Submission | web.Response:
        sub = self.state.submissions.get(request.match_info["token"])
        if sub is None:
            return _error(404, "Submission not found.")
        if sub.owner != email:
            return _error(403, "You do not have permission to access this submission.")
        return sub

    def _caller_owns(self, request: web.Request) -> Submission | web.Response:
        """The submission in the URL if the caller's token is valid and it is theirs, else the error to send."""
        user = self._user(request)
        if isinstance(user, web.Response):
            return user
        return self._owned(request, user)

    async def _form(self, request: web.Request) -> dict[str, Any]:
        """A small JSON or urlencoded body as a dict; raises web.HTTPBadRequest (as JSON) on junk."""
        raw = await self.faults.read_all(request, limit=_FIELD_LIMIT)
        if request.content_type == "application/json":
            try:
                data = orjson.loads(raw or b"{}")
            except orjson.JSONDecodeError:
                raise web.HTTPBadRequest(
                    text='{"error": "malformed JSON body"}', content_type="application/json"
                )
            if not isinstance(data, dict):
                raise web.HTTPBadRequest(
                    text='{"error": "expected a JSON object"}', content_type="application/json"
                )
            return data
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))

    # -- routes ----------------------------------------------------------------------------------------
    async def auth_token(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        email, password = str(form.get("username") or ""), str(form.get("password") or "")
        if not email or not password:
            missing = "username" if not email else "password"
            return _error(400, f"{missing}: this field is required.")
        if self.state.users.get(email) != password:
            return _error(401, "Unable to log in with provided credentials.")
        token = self.state.token_for(email)
        return _json({"token": token, "user_id": self.state.user_id(email), "email": email})

    async def upload(self, request: web.Request) -> web.StreamResponse:
        user = self._user(request)
        if isinstance(user, web.Response):
            await self._drain(request)
            return user
        try:
            boundary = boundary_of(request.headers.get("Content-Type", ""))
        except MultipartError as exc:
            await self._drain(request)
            return _error(400, f"dataset_file: {exc}")
        receiver = ArchiveReceiver(self.state.incoming / f"{secrets.token_hex(8)}.part")
        fields: dict[str, str] = {}
        try:
            try:
                filename = await self._receive(request, boundary, receiver, fields)
            except Dropped:
                return web.Response(status=400)  # the connection is gone; nothing is sent
            except MultipartError as exc:
                return _error(400, f"dataset_file: {exc}")
            except UploadRefused as exc:
                await self._drain(request)
                return _error(400, str(exc))
            return await self._store(request, user, receiver, filename, fields)
        finally:
            if receiver.tmp_path.exists():  # not moved into place: refused, failed or dropped
                receiver.discard()

    async def _receive(
        self, request: web.Request, boundary: str, receiver: ArchiveReceiver, fields: dict[str, str]
    ) -> str:
        """Parse the body, stream ``dataset_file`` into ``receiver`` (in a thread, one batch in flight) and
        collect the other fields; returns the file part's filename.

        :raises MultipartError | UploadRefused | Dropped: see the caller.
        """
        parser = MultipartParser(boundary)
        filename: str | None = None
        current: str | None = None
        value = bytearray()
        batch = bytearray()
        inflight: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()

        async def flush(final: bool) -> None:
            nonlocal inflight, batch
            if inflight is not None:
                await inflight
                inflight = None
            if batch:
                data, batch = bytes(batch), bytearray()
                inflight = loop.run_in_executor(None, receiver.feed, data)
            if final and inflight is not None:
                await inflight
                inflight = None

        try:
            async for data in self.faults.body(request):
                for event in parser.feed(data):
                    if isinstance(event, PartStart):
                        current = event.name
                        if current == "dataset_file":
                            if filename is not None:
                                raise MultipartError("more than one dataset_file part")
                            filename = event.filename or ""
                    elif isinstance(event, PartEnd):
                        if current == "dataset_file":
                            await flush(final=True)
                            await loop.run_in_executor(None, receiver.finish)
                        elif current:
                            fields[current] = value.decode("utf-8", "replace")
                        current, value = None, bytearray()
                    elif current == "dataset_file":
                        batch += event
                        if len(batch) >= _BATCH:
                            await flush(final=False)
                    elif len(value) + len(event) <= _FIELD_LIMIT:
                        value += event
                if parser.done:
                    break
            parser.close()
        finally:
            if inflight is not None:  # let the thread finish before the file is discarded
                await asyncio.wait([inflight])
        if filename is None:
            raise MultipartError("this field is required")
        return filename

    async def _store(
        self,
        request: web.Request,
        user: str,
        receiver: ArchiveReceiver,
        filename: str,
        fields: dict[str, str],
    ) -> web.StreamResponse:
        dataset_type = fields.get("dataset_type") or "pdb"
        if dataset_type not in ("pdb", "other"):
            return _error(400, "dataset_type: must be 'pdb' or 'other'.")
        assert receiver.kind is not None
        try:
            scan = await asyncio.to_thread(pdis_scan.scan_archive, receiver.tmp_path, receiver.kind)
        except pdis_scan.ArchiveUnreadable as exc:
            return _error(400, f"dataset_file: not a readable {receiver.kind} archive ({exc})")
        # check and insert with no await in between, so two concurrent identical uploads cannot both win
        if self.state.by_md5(receiver.md5) is not None:
            return _error(409, "Duplicate file hash: this archive was already uploaded.")
        name = _stored_name(filename, receiver)
        sub = self.state.add_upload(user, receiver.tmp_path, name, receiver.md5, receiver.size, dataset_type, scan)
        body = {
            "token": sub.token,
            "md5hash": sub.md5hash,
            "filename": sub.original_filename,
            "size": sub.size,
            "pdbid": sub.detected_pdbid,
            "is_pdb_exists": self.state.pdb_exists(sub),
        }
        if self.state.lose_upload_responses > 0:
            self.state.lose_upload_responses -= 1
            if request.transport is not None:
                request.transport.abort()
        return _json(body, status=201)

    async def submit(self, request: web.Request) -> web.Response:
        user = self._user(request)
        if isinstance(user, web.Response):
            await self._drain(request)
            return user
        form = await self._form(request)
        token = str(form.get("token") or "")
        if not token:
            return _error(400, "token: this field is required.")
        sub = self.state.submissions.get(token)
        if sub is None:
            return _error(404, "Submission not found.")
        if sub.owner != user:
            return _error(403, "You do not have permission to access this submission.")
        status = self.state.status(sub)
        if status != "uploaded":
            return _error(409, f"Submission already processed (status: {status}).")
        problem = self.state.validate_metadata(form)
        if problem is not None:
            return _error(400, problem)
        self.state.submit(sub, form)
        return _json({"status": "submitted", "token": sub.token})

    async def submissions(self, request: web.Request) -> web.Response:
        user = self._user(request)
        if isinstance(user, web.Response):
            return user
        subs = sorted(self.state.owned_by(user), key=lambda s: s.seq, reverse=True)
        return _json([self.state.to_json(s) for s in subs])

    async def submission(self, request: web.Request) -> web.Response:
        sub = self._caller_owns(request)
        if isinstance(sub, web.Response):
            return sub
        self.state.on_poll(sub)
        return _json(self.state.to_json(sub))

    async def delete(self, request: web.Request) -> web.Response:
        sub = self._caller_owns(request)
        if isinstance(sub, web.Response):
            return sub
        status = self.state.status(sub)
        if status not in ("uploaded", "validated", "error_no_data"):
            return _error(409, f"Submission cannot be deleted in status {status}.")
        await asyncio.to_thread(self.state.delete, sub)
        return web.Response(status=204)

    async def equipment(self, request: web.Request) -> web.Response:
        user = self._user(request)
        if isinstance(user, web.Response):
            return user
        return _json(self.state.equipment)

    # -- test controls ---------------------------------------------------------------------------------
    async def sim_advance(self, request: web.Request) -> web.Response:
        data = await request.json() if request.can_read_body else {}
        steps = int(data.get("steps", 1))
        token = data.get("token")
        targets = [self.state.submissions[token]] if token else list(self.state.submissions.values())
        for sub in targets:
            self.state.advance(sub, steps)
        return _json({s.token: self.state.status(s) for s in targets})

    async def sim_lose(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.state.lose_upload_responses = int(data.get("count", 1))
        return _json({"count": self.state.lose_upload_responses})

    async def sim_state(self, request: web.Request) -> web.Response:
        return _json(
            [dict(self.state.to_json(s), owner=s.owner, size=s.size) for s in self.state.submissions.values()]
        )


@web.middleware
async def _quiet_disconnects(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A client that went away mid-body (killed, timed out) is normal here, not a server error to log."""
    try:
        return await handler(request)
    except ConnectionResetError:
        return web.Response(status=400)  # nobody is listening; nothing is sent


def _stored_name(filename: str, receiver: ArchiveReceiver) -> str:
    """The stored archive's name: the upload's base name, without ``.zst`` when zstd was removed."""
    base = os.path.basename(filename.replace("\\", "/")).strip() or f"dataset.{receiver.kind}"
    if receiver.compressed and base.lower().endswith(".zst"):
        base = base[:-4] or f"dataset.{receiver.kind}"
    base = "".join(c if c.isalnum() or c in "._-+" else "_" for c in base)
    return "dataset.json" if base in ("meta.json", ".", "..") else base


def build_app(
    root: Path,
    faults: FaultInjector,
    args: argparse.Namespace | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The PDIS simulator app storing under ``root`` (see the module docstring)."""
    delay = getattr(args, "status_delay", 2.0) if args is not None else 2.0
    users = [parse_user(u) for u in (getattr(args, "user", None) or [])] or [("demo@example.org", "demo")]
    state = PdisState(root, users, status_delay=delay, clock=clock)
    api = PdisApi(state, faults)
    app = make_app(faults)
    app.middlewares.append(_quiet_disconnects)
    app[PDIS_STATE] = state
    r = app.router
    r.add_post(f"{API}/auth/token/", api.auth_token)
    r.add_post(f"{API}/upload/", api.upload)
    r.add_post(f"{API}/submit/", api.submit)
    r.add_get(f"{API}/submissions/", api.submissions)
    r.add_get(f"{API}/submissions/{{token}}/", api.submission)
    r.add_delete(f"{API}/submissions/{{token}}/", api.delete)
    r.add_get(f"{API}/equipment/", api.equipment)
    r.add_post("/_sim/pdis/advance", api.sim_advance)
    r.add_post("/_sim/pdis/lose-upload-responses", api.sim_lose)
    r.add_get("/_sim/pdis/state", api.sim_state)
    return app
