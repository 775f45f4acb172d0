"""EMPIAR as an engine target: the deposition's steps around the engine's sessions.

EMPIAR takes no file over HTTP: an entry is created over its JSON API, the files go by ascp (or Globus) into
the entry's upload folder, and the entry is then submitted. So :class:`EmpiarAdapter` declares
``Features(sessions=True)`` and the engine drives the transfer like any other push — walk, journal per file,
progress, ``--bwlimit``, retries through the pacer, ``asyncdepo jobs/status/resume``:

* ``prepare([])`` creates the entry (or re-deposits the one journaled, or the one ``-r`` names) and uploads
  the thumbnail; the engine journals :class:`~asyncdepo.adapters.empiar.depositor.DepositState` right after,
  so a kill never leaves an entry the next run does not know.
* ``session_group`` keeps one image set per session (``features.session_items`` files at most), and the files
  outside every image set together per folder, as the reference client sends them.
* ``open_session`` -> :class:`_Session`: one ascp run over a ``--file-pair-list`` (``-k 3``: a partial file
  resumes where it stopped; ``-l`` the lower of ``--rate`` and the session's share of ``--bwlimit``), each file
  reported done as ascp finishes it. With a Globus route, a session whose ascp failed for good (an
  authentication failure, or a transient failure on its last try) goes by Globus instead: one transfer task of
  those files (checksum sync: what is there is skipped), its id journaled before the wait so that a run killed
  meanwhile waits for that task instead of starting another. ``--bwlimit`` cannot be applied to Globus (the
  copy runs between Globus endpoints; their administrators set its rate): a warning says so.
* ``finish(ok)``, when every file is there: grant the rights, then submit (unless told not to).

On a cluster (``asyncdepo push empiar ... --scheduler``) the coordinating process runs ``prepare`` and
``finish``; the workers run ascp sessions on copies of the adapter built without the API (``api`` None) and
without Globus: ``handoff`` gives them the entry's directory and the Aspera transfer password (never in a
task), ``handback`` returns which groups went by ascp. The Globus route stays with the coordinator
(``fallback``): files a worker's ascp failed for good, and files an earlier run's Globus task holds (a
worker leaves those alone, so two transfers never write one file), go in the coordinator's own Globus
tasks.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from asyncdepo import errors
from asyncdepo.adapters.empiar.depositor import DepositState, EmpiarApi
from asyncdepo.adapters.empiar.schema import Layout
from asyncdepo.adapters.globus import GlobusClient, TaskProgress, TransferItem
from asyncdepo.contract import (
    Adapter,
    ChunkWriter,
    Features,
    Item,
    SessionPlan,
    SessionProgress,
    SessionWriter,
)
from asyncdepo.transport.ascp.options import AscpOptions, AscpSecrets
from asyncdepo.transport.ascp.pairs import Pair, capped_rate, pair_safe, run_pairs

Say = Callable[[str, str], None]  # (level: "info" | "warning", text)


@dataclasses.dataclass(frozen=True)
class AscpRoute:
    """ascp to EMPIAR's upload host: options (checked before the run), the transfer password, ``user@host``."""

    opts: AscpOptions
    secrets: AscpSecrets
    host: str


@dataclasses.dataclass(frozen=True)
class GlobusRoute:
    """Globus to EMPIAR's endpoint: the client, the user's endpoint holding DATA (its paths are the local
    paths, as with Globus Connect Personal) and EMPIAR's endpoint."""

    client: GlobusClient
    source_endpoint: str
    destination_endpoint: str


@dataclasses.dataclass(frozen=True)
class Deposition:
    """What the deposition is, all checked before the first request (see ``asyncdepo.cli.empiar``)."""

    doc: Mapping[str, Any]
    json_path: Path
    layout: Layout
    thumbnail: Path | None = None
    rights: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    submit: bool = True
    upload_prefix: str = "upload"
    entry: tuple[int, str] | None = None  # -r ENTRY_ID ENTRY_DIR


class EmpiarAdapter(Adapter):
    """One EMPIAR deposition (see the module docstring). The caller owns the API's HTTP session.

    :param api: the deposition API client; None in a cluster worker's copy (it only runs sessions).
    :param deposition: the checked deposition.
    :param ascp: the ascp route, or None when ascp is not available (then Globus only).
    :param globus: the Globus route (fallback), or None.
    :param say: messages for the user (level, text).
    """

    name = "empiar"
    features = Features(sessions=True, session_items=1000)

    def __init__(self, api: EmpiarApi | None, deposition: Deposition, *, ascp: AscpRoute | None = None,
                 globus: GlobusRoute | None = None, say: Say | None = None, server: str = "") -> None:
        if ascp is None and globus is None:
            raise errors.UsageError("EMPIAR needs ascp or a Globus endpoint (-g) to send the files")
        self._api, self.dep, self.ascp, self.globus = api, deposition, ascp, globus
        self.server = api.base if api is not None else server
        self.say: Say = say or (lambda level, text: None)
        self.state = self._explicit() or DepositState()
        self.route = "ascp" if ascp is not None else "globus"
        self._warned_rate = False
        self._defer_globus = False  # a worker's copy: files an earlier Globus task holds are the coordinator's
        layout = deposition.layout
        self._sets = sorted(((_under(layout.data, s.local), s.remote) for s in layout.imagesets),
                            key=lambda p: len(p[0]), reverse=True)
        # folders (relative to DATA) that lead to an image set: the files outside the sets group by the
        # deepest such folder above them, as the reference client's extras
        self._leads = {posixpath.dirname(prefix) for prefix, _ in self._sets}
        for prefix in list(self._leads):
            while prefix:
                prefix = posixpath.dirname(prefix)
                self._leads.add(prefix)

    def _explicit(self) -> DepositState | None:
        if self.dep.entry is None:
            return None
        return DepositState(entry_id=self.dep.entry[0], directory=self.dep.entry[1], phase="created")

    @property
    def api(self) -> EmpiarApi:
        if self._api is None:
            raise errors.UsageError("a cluster worker's copy of the EMPIAR adapter has no API: the coordinating "
                                    "process creates and submits the entry")
        return self._api

    def describe(self) -> str:
        return f"{self.server} {self.dep.json_path}"  # ``server`` is the API's base URL (the server + API path)

    def job_state(self) -> dict[str, Any]:
        return self.state.to_json()

    def restore_job_state(self, state: Mapping[str, Any]) -> None:
        saved = DepositState.from_json(state)
        explicit = self._explicit()
        if explicit is not None and (saved.entry_id, saved.directory) != (explicit.entry_id, explicit.directory):
            saved = explicit  # -r names another entry than the journal's
        self.state = saved

    # -- job-level steps -------------------------------------------------------------------------------------
    async def prepare(self, items: list[tuple[Item, dict[str, str]]]) -> set[str]:
        """Create the entry (or re-deposit the known one) and upload the thumbnail.

        :raises ConflictError: EMPIAR refuses to re-deposit a submitted entry (the CLI refuses a deposition
            its journal says was submitted before this runs), or names another directory for the entry.
        """
        st, dep = self.state, self.dep
        if st.entry_id is None:
            entry = await self.api.create(dep.doc)
            self.say("info", f"EMPIAR entry {entry.entry_id} created; its data directory is {entry.directory}")
        else:
            entry = await self.api.redeposit(dep.doc, st.entry_id)
            self.say("info", f"EMPIAR entry {entry.entry_id} re-deposited (directory {entry.directory}); continuing")
            if st.directory not in (None, entry.directory):
                raise errors.ConflictError(
                    f"EMPIAR names directory {entry.directory} for entry {entry.entry_id}; the files were sent to "
                    f"{st.directory}", hint=f"send everything there: add -r {entry.entry_id} {entry.directory}")
        st.entry_id, st.directory = entry.entry_id, entry.directory
        if st.phase == "new":
            st.phase = "created"
        if dep.thumbnail is not None:
            await self.api.upload_thumbnail(entry.entry_id, dep.thumbnail)
            self.say("info", f"thumbnail {dep.thumbnail.name} uploaded")
        return set()

    async def finish(self, ok: bool) -> dict[str, Any]:
        """With every file there: grant rights, submit (unless told not to). Returns the entry's summary."""
        st, dep = self.state, self.dep
        if ok and st.entry_id is not None:
            if st.phase == "created":
                st.phase = "uploaded"
            # each kind holds one grantee at least (the CLI drops an empty list); granting again is harmless,
            # and a rerun may name new grantees
            for kind, grants in dep.rights.items():
                await self.api.grant_rights(st.entry_id, kind, grants)
                self.say("info", f"rights granted to {', '.join(grants)}")
                st.phase = "granted" if st.phase == "uploaded" else st.phase
            # never "submitted" here: prepare() re-deposits first, which EMPIAR refuses for a submitted entry
            if dep.submit:
                accession = await self.api.submit(st.entry_id)
                st.empiar_id = accession or st.empiar_id
                st.phase = "submitted"
                self.say("info", f"entry {st.entry_id} submitted" + (
                    f": accession {accession}" if accession else " (EMPIAR says it already was)"))
            else:
                self.say("info", f"data uploaded; entry {st.entry_id} (directory {st.directory}) not submitted (-s)")
        return {"entry_id": st.entry_id, "directory": st.directory, "phase": st.phase, "empiar_id": st.empiar_id,
                "via": dict(st.via)}

    # -- files -----------------------------------------------------------------------------------------------
    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        raise errors.UsageError("EMPIAR takes files in sessions (ascp or Globus), not one by one")

    def session_group(self, item: Item) -> str:
        for prefix, remote in self._sets:
            if not prefix or item.rel == prefix or item.rel.startswith(prefix + "/"):
                return remote
        folder = posixpath.dirname(item.rel)
        while folder and folder not in self._leads:
            folder = posixpath.dirname(folder)
        return "+extra:" + posixpath.join(self.dep.layout.base, folder).strip("/")

    def remote_dir(self) -> str:
        """The entry's ``data`` folder on the upload host (relative to its root)."""
        assert self.state.directory is not None, "prepare() runs before any session"
        return "/".join(p for p in (self.dep.upload_prefix, self.state.directory, "data") if p)

    def remote_rel(self, item: Item) -> str:
        """Where ``item`` goes, relative to :meth:`remote_dir`."""
        return posixpath.join(self.dep.layout.base, item.rel) if self.dep.layout.base else item.rel

    async def open_session(self, plan: SessionPlan) -> SessionWriter:
        return _Session(self, plan, self.route)

    async def discard(self, rel: str, saved: Mapping[str, Any] | None) -> None:
        """Neither ascp nor the entry's API can delete a file from the upload folder, so what an interrupted
        session left of ``rel`` (ascp keeps a partial file as ``NAME.aspx``, to resume it) stays there.

        :raises PermanentError: always: it says where the partial copy may be and what to do about it.
        """
        where = "/".join(p for p in (self.state.directory, "data", posixpath.join(self.dep.layout.base, rel)) if p)
        raise errors.PermanentError(
            f"EMPIAR's upload folder takes no deletions (ascp cannot delete): a partial copy of {rel} may remain "
            f"there as {where}.aspx",
            hint="ask the EMPIAR curators to remove it, or put the file back and run the push again to finish it")

    # -- copies on a cluster's workers -----------------------------------------------------------------------
    async def handoff(self) -> dict[str, Any]:
        """For the workers' copies: the entry's directory and the Aspera credentials (secret: the engine hands
        this over outside every task, log and event), and whether the coordinator has a Globus route."""
        secrets = self.ascp.secrets if self.ascp is not None else None
        return {"entry_id": self.state.entry_id, "directory": self.state.directory,
                "ascp": {"password": secrets.password, "token": secrets.token, "cookie": secrets.cookie}
                if secrets is not None else None, "globus": self.globus is not None}

    def take_handoff(self, data: Mapping[str, Any]) -> None:
        self.state = DepositState(entry_id=data.get("entry_id"), directory=data.get("directory"), phase="created")
        if self.ascp is not None and data.get("ascp"):
            self.ascp = dataclasses.replace(self.ascp, secrets=AscpSecrets(**data["ascp"]))
        self._defer_globus = bool(data.get("globus"))

    def handback(self) -> dict[str, Any]:
        return {"via": dict(self.state.via)}

    def take_handback(self, data: Mapping[str, Any]) -> None:
        for group, route in (data.get("via") or {}).items():
            self._went(str(group), str(route))

    def fallback(self) -> Adapter | None:
        """The Globus route, for files the workers' ascp could not send (see the module docstring)."""
        return _GlobusLane(self) if self.globus is not None else None

    def _went(self, group: str, route: str) -> None:
        """Record that files of ``group`` went by ``route``; a group split between routes (its sessions on
        several workers, some by Globus) reads ``ascp+globus``."""
        before = self.state.via.get(group)
        routes = set(before.split("+")) if before else set()
        self.state.via[group] = "+".join(sorted(routes | {route}))


class _GlobusLane(Adapter):
    """The coordinator's Globus sessions on a cluster (:meth:`EmpiarAdapter.fallback`): the parent adapter's
    entry, groups and job state, always by Globus."""

    name = "empiar"
    features = EmpiarAdapter.features

    def __init__(self, parent: EmpiarAdapter) -> None:
        self.parent = parent

    def describe(self) -> str:
        return self.parent.describe()

    def job_state(self) -> dict[str, Any]:
        return self.parent.job_state()

    def session_group(self, item: Item) -> str:
        return self.parent.session_group(item)

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        return await self.parent.open_item(item, saved)

    async def open_session(self, plan: SessionPlan) -> SessionWriter:
        return _Session(self.parent, plan, "globus")


def _under(data: Path, folder: Path) -> str:
    rel = folder.relative_to(data).as_posix() if folder != data else ""
    return "" if rel == "." else rel


class _Session(SessionWriter):
    """One session: ascp, falling back to Globus (see the module docstring)."""

    def __init__(self, adapter: EmpiarAdapter, plan: SessionPlan, route: str) -> None:
        self.a, self.plan, self.route = adapter, plan, route
        self.group = adapter.session_group(plan.items[0])
        self.done: set[str] = set()

    async def send(self, progress: SessionProgress) -> None:
        a, plan = self.a, self.plan
        items = []
        for item in plan.items:
            if not pair_safe(item.path):
                progress.failed(item.rel, errors.PermanentError(
                    f"{item.rel!r}: a name with a line break cannot be sent by ascp or Globus"))
            elif a._defer_globus and plan.saved.get(item.rel, {}).get("globus_task"):
                # an earlier run's Globus task holds it (it may still be writing it): the coordinator's Globus
                # route waits for that task; ascp here would write the same file at the same time
                progress.failed(item.rel, errors.PermanentError(
                    f"{item.rel}: an earlier run's Globus task holds it; the coordinator sends it by Globus"))
            else:
                items.append(item)
        if not items:
            return
        if self.route == "ascp" and a.ascp is not None:
            try:
                await self._ascp(a.ascp, items, progress)
            except errors.DepoError as exc:
                if a.globus is None or (errors.is_transient(exc) and not plan.last_try):
                    raise
                if isinstance(exc, errors.AuthError):
                    a.route = "globus"  # the password is refused: no later session tries ascp again
                a.say("warning", f"ascp failed for {self.group} ({exc}); sending it with Globus instead")
            else:
                a._went(self.group, "ascp")
                return
        assert a.globus is not None
        await self._globus(a.globus, [i for i in items if i.rel not in self.done], progress)
        a._went(self.group, "globus")

    async def _ascp(self, route: AscpRoute, items: list[Item], progress: SessionProgress) -> None:
        a = self.a
        opts = dataclasses.replace(route.opts, rate=capped_rate(route.opts.rate, self.plan.rate))
        pairs = [Pair(item.path, a.remote_rel(item), item.rel) for item in items]

        def on_progress(rel: str, delta: int, done: bool) -> None:
            progress.moved(rel, delta)
            if done and rel:
                self.done.add(rel)
                progress.done(rel)

        result = await run_pairs(opts, pairs, f"{route.host}:{a.remote_dir()}", secrets=route.secrets,
                                 on_progress=on_progress)
        if result.partial:
            raise errors.TransientError(f"ascp reported a partial completion for {self.group}")

    async def _globus(self, route: GlobusRoute, items: list[Item], progress: SessionProgress) -> None:
        a, client = self.a, route.client
        if self.plan.rate and not a._warned_rate:
            a._warned_rate = True
            a.say("warning", "--bwlimit does not apply to Globus transfers: Globus copies between its endpoints")
        # a task an earlier run started for these files may still be running (that run was killed): wait for
        # it, so two tasks never write the same files, and take what it completed
        earlier = {str(s["globus_task"]) for s in self.plan.saved.values() if s.get("globus_task")}
        finished: set[str] = set()
        for task_id in sorted(earlier):
            try:
                doc = await client.status(task_id)
                if doc.get("status") == "ACTIVE":
                    a.say("info", f"waiting for Globus task {task_id}, started by an earlier run")
                    doc = await client.wait(task_id)
            except errors.DepoError:
                continue  # unknown, or it failed: its files go in the new task
            if doc.get("status") == "SUCCEEDED":
                finished.add(task_id)
        rest = []
        for item in items:
            if str(self.plan.saved.get(item.rel, {}).get("globus_task")) in finished:
                progress.done(item.rel)
            else:
                rest.append(item)
        if not rest:
            return
        base = a.remote_dir()
        transfer = [TransferItem(item.path, f"/{base}/{a.remote_rel(item)}", recursive=False) for item in rest]
        task_id = await client.submit(route.source_endpoint, route.destination_endpoint, transfer,
                                      label=f"EMPIAR entry {a.state.entry_id}")
        await progress.note({"globus_task": task_id})
        a.say("info", f"Globus task {task_id} submitted ({len(transfer)} file(s), checksum sync)")
        seen = 0

        def on_poll(p: TaskProgress) -> None:
            nonlocal seen
            if p.bytes_transferred > seen:
                progress.moved("", p.bytes_transferred - seen)
                seen = p.bytes_transferred

        task = await client.wait(task_id, on_poll)
        a.say("info", f"Globus task {task_id} succeeded: {task.get('files_transferred', 0)} file(s) sent, "
                      f"{task.get('files_skipped', 0)} already there")
