"""EMPIAR deposition: the API client and the orchestration create -> thumbnail -> transfer -> rights -> submit.

EMPIAR is not a per-file upload target: an entry is created over its JSON API, its files go by ascp (one
session per image set, several at once) or Globus into the entry's upload folder, and the entry is then
submitted. So this adapter is an orchestrator rather than an :class:`~asyncdepo.contract.Adapter`; it uses
only the contract and the transport (the pacer, HTTP timeouts, the ascp runner).

Resume: :class:`DepositState` (entry id and directory, the phase reached, the image sets already sent with a
fingerprint of their files) is handed to ``save_state`` after every step; given back, a run re-deposits the
entry (PUT ``redeposit_entry``) instead of creating a new one, skips image sets whose files have not changed,
and lets ascp ``-k3`` / Globus checksum sync send only what is missing of the others.

Retries: each request is retried on transient failures (5xx, 429, network) with backoff — except the
creation of an entry on a network error, where the request may have reached the server: retrying could
create a second entry, so that failure ends the run and the message says to rerun (nothing was sent yet).
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson

from asyncdepo import errors
from asyncdepo.adapters.empiar.schema import Layout
from asyncdepo.adapters.globus import GlobusClient, TaskProgress, TransferItem
from asyncdepo.events import ItemDone, ItemFailed, ItemRetrying, ItemSkipped, ItemStarted, Reporter
from asyncdepo.transport.ascp import runner as ascp
from asyncdepo.transport.ascp.runner import AscpOptions, AscpProgress, AscpSecrets
from asyncdepo.transport.failures import boundary, status_error
from asyncdepo.transport.httpbody import request_timeout
from asyncdepo.transport.pacer import Pacer, RetryEvent

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


# -- the deposition ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class DepositState:
    """What a later run needs to continue (journaled; never a secret).

    ``phase``: ``new`` -> ``created`` -> ``uploaded`` -> ``granted`` -> ``submitted``; ``sent`` maps each
    transfer unit (an image set's remote folder, or ``+extra:<folder>``) to the fingerprint of the files
    it held when it was sent; ``via`` says how (``ascp`` or ``globus``).
    """

    entry_id: int | None = None
    directory: str | None = None
    phase: str = "new"
    sent: dict[str, str] = dataclasses.field(default_factory=dict)
    via: dict[str, str] = dataclasses.field(default_factory=dict)
    empiar_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DepositState:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Unit:
    """One transfer: ``sources`` go into the entry's ``data/<dest>`` folder (one ascp session)."""

    key: str
    label: str
    sources: tuple[Path, ...]
    dest: str
    files: int
    size: int
    fingerprint: str


def _scan(sources: tuple[Path, ...]) -> tuple[int, int, str]:
    """Files, bytes and a fingerprint (paths, sizes, mtimes) of ``sources``; walks in sorted order so the
    fingerprint is stable, keeping one directory listing in memory at a time."""
    import hashlib

    h = hashlib.sha256()
    files = size = 0
    for src in sources:
        walker = os.walk(src) if src.is_dir() else [(str(src.parent), [], [src.name])]
        for folder, dirs, names in walker:
            dirs.sort()
            for name in sorted(names):
                path = Path(folder) / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                files += 1
                size += st.st_size
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return files, size, h.hexdigest()[:32]


async def plan_units(layout: Layout) -> list[Unit]:
    """The transfer units of a :class:`~asyncdepo.adapters.empiar.schema.Layout`: one per image set, one per
    folder of extra files; scanned in a thread."""
    specs: list[tuple[str, str, tuple[Path, ...], str]] = []
    for s in layout.imagesets:
        parent = s.remote.rpartition("/")[0]
        specs.append((s.remote, s.remote, (s.local,), parent))
    for remote, paths in layout.extras:
        specs.append((f"+extra:{remote}", f"{remote or '.'} (other files)", tuple(paths), remote))
    units = []
    for key, label, sources, dest in specs:
        files, size, fp = await anyio.to_thread.run_sync(_scan, sources)
        units.append(Unit(key, label, sources, dest, files, size, fp))
    return units


@dataclasses.dataclass(frozen=True)
class GlobusRoute:
    """How to reach the entry's upload area by Globus: the client, the user's endpoint holding DATA
    (its paths are the local paths, as with Globus Connect Personal) and EMPIAR's endpoint."""

    client: GlobusClient
    source_endpoint: str
    destination_endpoint: str = EMPIAR_GLOBUS_ENDPOINT


@dataclasses.dataclass(frozen=True)
class DepositJob:
    """Everything checked before the first request (see ``asyncdepo.cli.empiar``)."""

    doc: Mapping[str, Any]
    units: tuple[Unit, ...]
    thumbnail: Path | None = None
    rights: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    submit: bool = True
    ascp: AscpOptions | None = None
    ascp_secrets: AscpSecrets = dataclasses.field(default_factory=AscpSecrets)
    ascp_host: str = ASCP_HOST
    ascp_attempts: int = 5
    upload_prefix: str = "upload"
    globus: GlobusRoute | None = None
    transfers: int = 4


SaveState = Callable[[DepositState], Awaitable[None]]


class Depositor:
    """Runs one deposition: create (or re-deposit) -> thumbnail -> transfer -> grant rights -> submit.

    :param state: from an earlier run (resume) or fresh; updated in place and handed to ``save`` after
        every step.
    :raises DepoError: the first failure that could not be retried or routed around (a unit whose ascp
        session failed goes by Globus when a route is given).
    """

    def __init__(self, api: EmpiarApi, job: DepositJob, state: DepositState, reporter: Reporter,
                 save: SaveState) -> None:
        self.api = api
        self.job = job
        self.state = state
        self.reporter = reporter
        self._save = save

    async def save(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._save(self.state)

    async def run(self) -> DepositState:
        st, job, say = self.state, self.job, self.reporter.message
        if st.phase == "submitted":
            raise errors.ConflictError(f"entry {st.entry_id} was already submitted as {st.empiar_id}")
        if st.entry_id is None:
            entry = await self.api.create(job.doc)
            say(f"EMPIAR entry {entry.entry_id} created; its data directory is {entry.directory}")
        else:
            entry = await self.api.redeposit(job.doc, st.entry_id)
            say(f"EMPIAR entry {entry.entry_id} re-deposited (directory {entry.directory}); continuing")
        if st.directory not in (None, entry.directory):
            st.sent.clear()  # another directory: nothing of it was sent
        st.entry_id, st.directory = entry.entry_id, entry.directory
        st.phase = "created" if st.phase == "new" else st.phase
        await self.save()

        if job.thumbnail is not None:
            await self.api.upload_thumbnail(entry.entry_id, job.thumbnail)
            say(f"thumbnail {job.thumbnail.name} uploaded")

        await self.transfer_all()
        if st.phase == "created":
            st.phase = "uploaded"
            await self.save()

        if job.rights:  # granting again is harmless, and a rerun may name new grantees
            for kind, grants in job.rights.items():
                if grants:
                    await self.api.grant_rights(entry.entry_id, kind, grants)
                    say(f"rights granted to {', '.join(grants)}")
            st.phase = "granted"
            await self.save()

        if job.submit:
            accession = await self.api.submit(entry.entry_id)
            st.empiar_id = accession or st.empiar_id
            st.phase = "submitted"
            await self.save()
            say(f"entry {entry.entry_id} submitted" + (f": accession {accession}" if accession else
                                                        " (EMPIAR says it already was)"))
        else:
            say(f"data uploaded; entry {entry.entry_id} (directory {entry.directory}) not submitted (-s)")
        return st

    # -- transfer -----------------------------------------------------------------------------------------
    def _remote(self, dest: str) -> str:
        assert self.state.directory is not None
        return "/".join(p for p in (self.job.upload_prefix, self.state.directory, "data", dest) if p)

    async def transfer_all(self) -> None:
        st, job, stats = self.state, self.job, self.reporter.stats
        todo = [u for u in job.units if st.sent.get(u.key) != u.fingerprint]
        for u in job.units:
            if u not in todo:
                self.reporter.emit(ItemSkipped(u.label, u.size, "sent by an earlier run, unchanged"))
                stats.skipped(u.size, files=u.files)
        for u in job.units:
            stats.found(u.size, files=u.files)
        failed: list[tuple[Unit, errors.DepoError]] = []
        if job.ascp is not None and todo:
            limiter = anyio.CapacityLimiter(max(1, job.transfers))

            async def one(unit: Unit) -> None:
                async with limiter:
                    try:
                        await self._ascp(unit)
                    except errors.DepoError as exc:
                        if not isinstance(exc, errors.AuthError):
                            # a refused password is the same failure for every unit: said once, below
                            self.reporter.emit(ItemFailed(unit.label, str(exc), errors.is_transient(exc)))
                        failed.append((unit, exc))

            async with anyio.create_task_group() as tg:
                for unit in todo:
                    tg.start_soon(one, unit)
        else:
            failed = [(u, errors.PermanentError("ascp not available")) for u in todo]
        if not failed:
            return
        if job.globus is None:
            first = failed[0][1]
            same = [u.label for u, e in failed if str(e) == str(first)]
            other = [(u, e) for u, e in failed if str(e) != str(first)]
            notes = [first.hint] if first.hint else []
            if len(same) > 1:  # one message for a failure every unit met (a wrong password), naming them
                notes.append("this failed for " + ", ".join(same))
            if other:
                notes.append("also failed: " + ", ".join(f"{u.label} ({e})" for u, e in other[:3]))
            first.hint = "; ".join(notes) or None
            raise first
        if job.ascp is not None:
            self.reporter.warning(f"ascp failed for {len(failed)} transfer(s); sending them with Globus instead")
        await self._globus([u for u, _ in failed], job.globus)

    async def _done(self, unit: Unit, via: str, sent: int) -> None:
        self.state.sent[unit.key] = unit.fingerprint
        self.state.via[unit.key] = via
        await self.save()
        stats = self.reporter.stats
        stats.item_out(unit.label)
        stats.done(unit.size, files=unit.files)
        self.reporter.emit(ItemDone(unit.label, unit.size, sent, {}))

    async def _ascp(self, unit: Unit) -> None:
        job, rep = self.job, self.reporter
        assert job.ascp is not None
        rep.stats.item_in(unit.label, unit.size)
        rep.emit(ItemStarted(unit.label, unit.size, 0))

        def progress(p: AscpProgress) -> None:
            rep.progress(unit.label, p.delta)

        def retrying(event: RetryEvent) -> None:
            rep.stats.retried(event.reason)
            rep.emit(ItemRetrying(unit.label, event.attempt, str(event.error), event.delay, event.reason))

        dest = f"{job.ascp_host}:{self._remote(unit.dest)}"
        try:
            result = await ascp.transfer(job.ascp, [str(s) for s in unit.sources], dest, secrets=job.ascp_secrets,
                                         on_progress=progress, on_retry=retrying, attempts=job.ascp_attempts)
        except BaseException:
            rep.stats.item_out(unit.label)
            raise
        if result.partial:
            rep.stats.item_out(unit.label)
            raise errors.TransientError(f"ascp reported a partial completion for {unit.label}")
        await self._done(unit, "ascp", result.bytes)

    async def _globus(self, units: list[Unit], route: GlobusRoute) -> None:
        items = []
        for unit in units:
            for src in unit.sources:
                dest = "/" + self._remote(f"{unit.dest}/{src.name}".strip("/"))
                items.append(TransferItem(str(src.resolve()), dest + ("/" if src.is_dir() else ""), src.is_dir()))
        label = f"EMPIAR entry {self.state.entry_id}"
        for unit in units:
            self.reporter.stats.item_in(unit.label, unit.size)
        task_id = await route.client.submit(route.source_endpoint, route.destination_endpoint, items, label=label)
        self.reporter.message(f"Globus task {task_id} submitted ({len(items)} item(s), checksum sync)")
        seen = 0

        def progress(p: TaskProgress) -> None:
            nonlocal seen
            if p.bytes_transferred > seen:
                self.reporter.progress(units[0].label, p.bytes_transferred - seen)
                seen = p.bytes_transferred

        task = await route.client.wait(task_id, progress)
        self.reporter.message(f"Globus task {task_id} succeeded: {task.get('files_transferred', 0)} file(s) sent, "
                              f"{task.get('files_skipped', 0)} already there")
        for unit in units:
            await self._done(unit, "globus", 0)
