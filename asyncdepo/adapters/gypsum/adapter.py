"""gypsum (ArtifactDB): a version of an asset pushed with concurrent presigned PUTs, or pulled back.

Push (the engine md5s every file in parallel first, ``needs_digests_before_start``):

1. ``__aenter__`` looks for a session file of an interrupted upload of the same target
   (``gypsum_session``); it is resumed only if the project's ``..LOCK`` still names it (SHA-256 of the
   token). The session's non-secret ``label`` is part of :meth:`describe`, hence of the job id: a new
   upload session is a new job, so the engine never skips files an aborted session had sent.
2. ``prepare(items)``: paths checked against gypsum's rules; then, for a new upload, the project, the
   version, the lock and the quota are checked from the public layout files (``..permissions``,
   ``..summary``, ``..LOCK``, ``..quota``, ``..usage``, and the latest ``..manifest`` to predict dedup), so
   an over-quota push fails with figures before ``/upload/start`` is contacted. Then the start (files as
   ``dedup`` unless ``dedup=False``); the session is saved (0600) before anything else. For a resumed
   upload the local files must match the version's ``..manifest``; objects already in the bucket (an
   object appears only after a PUT whose md5 the store checked) are not sent again. Returns the paths
   that need no PUT: links, dedup hits, files already PUT.
3. ``open_item`` -> :class:`GypsumWriter`: ``write_stream`` presigns (reusing the URL while it is young,
   presigning again when the store says it expired), then PUTs the streamed file with ``Content-MD5``
   and an explicit ``Content-Length``; ``complete`` compares the store's ETag with the md5.
4. ``finish(ok)``: complete on success; otherwise abort (the same server, same session) unless
   ``keep_for_resume``. The engine runs it shielded from cancellation, so Ctrl-C never leaves the lock.

Watch mode (``watch=True``, ``Features.watch_units``): each batch of files that became complete together
is a version of its own. The first is ``VERSION``, then ``VERSION-2``, ``VERSION-3``... (a name another
upload took is passed over). Every version after the first is the whole dataset: the batch's files are
declared (``dedup`` unless ``dedup=False``) and every other path of the previous version of the chain is a
``link`` to it, so nothing unchanged is sent again and ``..latest`` always names a complete version (a batch
whose files all match that version, touched but not changed, makes none). The
chain (the next number, the last version completed, the open version and its batch) is the job state; an
open version is taken up again through its session file (:meth:`open_unit`), and one the server shows
finished is taken as completed. A batch whose files no longer match the open version's manifest discards it
and starts it again. Probation does not apply: a probational version cannot be linked to, so a watch needs a
trusted uploader (a forced probation aborts the first version with an AuthError saying so).

Pull: ``list_remote`` reads ``..manifest`` (of ``..latest`` when no version is given; linked files are
read from their final destination, ``ancestor`` first), ``read`` does ranged GETs on ``/file/``.

Memory: one (path, size, md5) per file (the start request needs them all) and one presigned-file path per
file to PUT; nothing grows with file sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Self

import anyio

from asyncdepo.adapters.gypsum import checks
from asyncdepo.adapters.gypsum.api import GypsumClient, file_path
from asyncdepo.adapters.gypsum.chain import Chain
from asyncdepo.adapters.gypsum.checks import check_rel
from asyncdepo.adapters.gypsum.session import SessionRecord, SessionStore
from asyncdepo.adapters.gypsum.writer import GypsumWriter
from asyncdepo.contract import Adapter, ChunkWriter, Features, Item, PlainGet, RemoteItem
from asyncdepo.errors import (
    AuthError,
    ConflictError,
    PermanentError,
    RemoteValidationError,
    SourceVanishedError,
    TransientError,
    UsageError,
)
from asyncdepo.events import Reporter


def _shown(rels: list[str]) -> str:
    """The first few names of a list, and how many more."""
    return ", ".join(rels[:3]) + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")


class GypsumAdapter(Adapter):
    """One gypsum version: pushed (``version`` required) or pulled (latest when ``version`` is None).

    :param server: the gypsum REST URL (e.g. https://gypsum.artifactdb.com).
    :param token: GitHub token (push and administration; pulls need none).
    :param probation: ask for a probational upload (untrusted uploaders always get one).
    :param dedup: declare files as ``dedup`` so the server links unchanged files of the latest version.
    :param keep_for_resume: on failure or Ctrl-C keep the upload (and the project lock) for a re-run.
    :param sessions: where session files live (see ``gypsum_session``).
    :param watch: push each watch batch as a version of its own (see "Watch mode" in the module docstring).
    """

    name = "gypsum"
    features = Features(needs_digests_before_start=True, item_digests=("md5",), server_digest="md5", pull=True)

    def __init__(self, server: str, project: str, asset: str, version: str | None = None, *,
                 token: str | None = None, probation: bool = False, dedup: bool = True,
                 keep_for_resume: bool = False, sessions: SessionStore | Path | None = None,
                 reporter: Reporter | None = None, client: GypsumClient | None = None,
                 watch: bool = False) -> None:
        self.client = client or GypsumClient(server, token)
        self.project, self.asset, self.version = project, asset, version
        self.probation, self.dedup, self.keep_for_resume = probation, dedup, keep_for_resume
        self.sessions = sessions if isinstance(sessions, SessionStore) else SessionStore(sessions)
        self.reporter = reporter
        self.session: SessionRecord | None = None
        self.resumed = False
        self._label = uuid.uuid4().hex[:12]
        self._skip: set[str] | None = None
        self._md5: dict[str, str] = {}
        self._counts = {"files": 0, "to_put": 0, "already_put": 0}
        self._handed = False  # a copy on a cluster's worker: the session came from the coordinator
        self.watch = watch
        self.chain = Chain(version or "")  # (watch) the versions made so far, the open one
        if watch:
            if version is None:
                raise UsageError("a watch needs PROJECT/ASSET/VERSION")
            if probation:
                raise UsageError("--probation does not apply to --watch: a probational version cannot be linked "
                                 "to, so every version would upload the whole dataset again, and each would "
                                 "wait for an owner's approval",
                                 hint="push finished runs on probation without --watch, or ask an owner to make "
                                      "you a trusted uploader")
            self.features = dataclasses.replace(self.features, watch_units=True)

    # -- identity and state --------------------------------------------------------------------------
    def describe(self) -> str:
        if self.watch:  # one job for the whole chain: the journal knows which files are in a version
            return f"gypsum {self.client.base}/{self.project}/{self.asset}/{self.chain.base} watch"
        where = f"{self.client.base}/{self.project}/{self.asset}/{self.version or '(latest)'}"
        return f"gypsum {where} upload {self._label}"

    def _say(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.message(text)

    def job_state(self) -> dict[str, Any]:
        out = {"label": self._label, "target": f"{self.project}/{self.asset}/{self.version}",
               "started": self.session is not None, **self._counts}
        if self.watch:
            out["watch"] = self.chain.state()
        return out

    def restore_job_state(self, state: Mapping[str, Any]) -> None:
        """(watch) The chain of versions; otherwise nothing: the session file (checked against the lock) is
        the truth."""
        chain = state.get("watch")
        if self.watch and isinstance(chain, dict):
            self.chain.restore(chain)
            self.version = self.chain.version

    async def open_unit(self) -> list[str]:
        """(watch) The batch of the version an earlier run started and did not complete: resumed through its
        session file when the lock still names it, started again when it was discarded; [] when none, or
        when the server shows it finished (it completed before the journal heard so)."""
        chain = self.chain
        await self.find_session()  # also the session of a start whose answer the journal never recorded
        if not chain.open or self.session is not None:
            return list(chain.files) if chain.open else []
        summary = await self.client.fetch_json(f"{self.project}/{self.asset}/{self.version}/..summary")
        if isinstance(summary, dict) and "upload_finish" in summary:
            self._say(f"version {self.version} was completed before the watcher stopped")
            chain.completed()
            self.version = chain.version
            return []
        return list(chain.files)

    async def _free_name(self) -> None:
        """(watch) Pass over version names that exist already (taken by another upload, or a version whose
        session was lost): versions are immutable."""
        p, a = self.project, self.asset
        while await self.client.fetch_json(f"{p}/{a}/{self.chain.version}/..summary") is not None:
            taken = self.chain.version
            self.version = self.chain.pass_over()
            self._say(f"gypsum version {p}/{a}/{taken} exists already: this batch goes to {self.version}")

    def check_item(self, item: Item) -> None:
        """:raises ValidationError: a path gypsum cannot store (it fails alone in watch mode)."""
        check_rel(item.rel)

    async def handoff(self) -> dict[str, Any]:
        """The upload session (its token included) and the md5 of every file, for copies of the adapter on a
        cluster's workers: they PUT files of this upload; the coordinator alone completes or aborts it."""
        rec = self.session
        if rec is None:
            return {}
        return {"session": dataclasses.asdict(rec), "md5": dict(self._md5)}

    def take_handoff(self, data: Mapping[str, Any]) -> None:
        if data.get("session"):
            self.session = SessionRecord(**data["session"])
            self._label = self.session.label
            self._md5 = dict(data.get("md5") or {})
            self._handed = True

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        try:
            # (watch: the version is known once the job state is restored: see open_unit)
            if self.version is not None and not self._handed and not self.watch:
                await self.find_session()
        except BaseException:
            await self.client.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    async def find_session(self) -> None:
        """Take up the session of an interrupted upload of this target when the project's lock still
        names it; a stale session file is deleted."""
        assert self.version is not None
        args = (self.client.base, self.project, self.asset, self.version)
        rec = await anyio.to_thread.run_sync(lambda: self.sessions.load(*args))
        if rec is None:
            return
        lock = await self.client.fetch_json(f"{self.project}/..LOCK")
        if (isinstance(lock, dict) and lock.get("asset") == self.asset and lock.get("version") == self.version
                and lock.get("session_sha256") == hashlib.sha256(rec.token.encode()).hexdigest()):
            self.session, self.resumed, self._label = rec, True, rec.label
            return
        # the upload was completed, aborted or unlocked since: the file is stale
        await anyio.to_thread.run_sync(lambda: self.sessions.delete(*args))

    # -- push ----------------------------------------------------------------------------------------
    async def prepare(self, items: list[tuple[Item, dict[str, str]]]) -> set[str]:
        """See the module docstring. Safe to call again after it succeeded (returns the same set).

        :raises ValidationError: a path gypsum cannot store.
        :raises QuotaError: the upload would not fit (figures in the message).
        :raises ConflictError: the version exists, or the project is locked by another upload.
        :raises AuthError | RemoteValidationError | TransientError: from the server.
        """
        if self._skip is not None:
            return self._skip
        if self.version is None:
            raise UsageError("a push needs PROJECT/ASSET/VERSION")
        local: dict[str, tuple[int, str]] = {}
        for item, digests in items:
            check_rel(item.rel)
            local[item.rel] = (item.size, digests["md5"].lower())
        self._md5 = {rel: md5 for rel, (_, md5) in local.items()}
        self._counts = {"files": len(local), "to_put": 0, "already_put": 0}
        if self.session is not None:
            skip = await self._resume(local)
        else:
            last = await self._last_manifest()
            if last is not None and all(
                    rel in last and (int(last[rel]["size"]), str(last[rel]["md5sum"]).lower()) == entry
                    for rel, entry in local.items()):
                # (watch) touched, not changed: the version would be the last one again
                self._say(f"{len(local)} file(s) unchanged since version {self.chain.last}: no new version")
                self._skip = set(local)
                return self._skip
            await self._precheck(local)
            skip = await self._start(local, last)
        if self.watch:
            self.chain.opened(local)
        self._skip = skip
        return skip

    async def _precheck(self, local: Mapping[str, tuple[int, str]]) -> None:
        await checks.project_exists(self.client, self.project)
        if self.watch:
            await self._free_name()
        assert self.version is not None
        quota = await checks.before_start(self.client, self.project, self.asset, self.version, local, self.dedup)
        if quota:
            self._say(quota)

    async def _start(self, local: Mapping[str, tuple[int, str]], last: Mapping[str, Any] | None = None) -> set[str]:
        """Start the upload of ``local`` (rel -> (size, md5)); (watch) the paths of ``last``, the manifest of
        the chain's last version, that ``local`` does not replace are linked to it."""
        assert self.version is not None
        kind = "dedup" if self.dedup else "simple"
        files: list[dict[str, Any]] = [{"type": kind, "path": rel, "md5sum": md5, "size": size}
                                       for rel, (size, md5) in local.items()]
        carried = [] if last is None else self.chain.links(self.project, self.asset, last, local)
        files += carried
        try:
            init = await self.client.start(self.project, self.asset, self.version, files, self.probation)
        except TransientError:
            lock = await self.client.fetch_json(f"{self.project}/..LOCK")
            if isinstance(lock, dict) and lock.get("asset") == self.asset and lock.get("version") == self.version:
                raise ConflictError(
                    f"gypsum upload start {self.project}/{self.asset}/{self.version}: the answer was lost but "
                    "the server seems to have started the upload (the project is now locked for it)",
                    hint=checks.UNLOCK_HINT.format(p=self.project)) from None
            raise
        except ConflictError:
            lock = await self.client.fetch_json(f"{self.project}/..LOCK")
            if isinstance(lock, dict):
                raise checks.locked(self.project, lock) from None
            raise
        except AuthError as exc:
            if exc.status == 403 and exc.hint is None:
                exc.hint = (f"an owner of '{self.project}' can add you as an uploader: asyncdepo gypsum "
                            f"set-permissions {self.project} --uploader YOUR_GITHUB_LOGIN[,trusted]")
            raise
        urls = {str(f["path"]): str(f["url"]) for f in init.get("file_urls", [])}
        rec = SessionRecord(label=self._label, server=self.client.base, project=self.project, asset=self.asset,
                            version=self.version, probation=self.probation,
                            complete_url=str(init["complete_url"]), abort_url=str(init["abort_url"]),
                            token=str(init["session_token"]), file_urls=urls)
        # saved before anything else can fail: from here on a retry of prepare resumes this session
        await anyio.to_thread.run_sync(lambda: self.sessions.save(rec))
        self.session = rec
        # the server forces untrusted uploaders onto probation: its summary says which it is
        summary = await self.client.fetch_json(f"{self.project}/{self.asset}/{self.version}/..summary")
        if bool((summary or {}).get("on_probation")) != rec.probation:
            rec.probation = not rec.probation
            await anyio.to_thread.run_sync(lambda: self.sessions.save(rec))
        if rec.probation and self.watch:
            await self._end(rec, "abort")
            who = (summary or {}).get("upload_user_id", "you")
            raise AuthError(f"gypsum puts uploads of {who} to project '{self.project}' on probation: a watch "
                            "needs a trusted uploader (a probational version cannot be linked to); the upload "
                            "was aborted",
                            hint=f"an owner can make you trusted: asyncdepo gypsum set-permissions {self.project} "
                                 f"--uploader {who},trusted")
        self._counts["to_put"] = len(urls)
        where = f"version {self.version}: " if self.watch else ""
        self._say(f"{where}upload started: {len(urls)} file(s) to send, {len(local) - len(urls)} linked to "
                  "earlier versions or deduplicated" + (f", {len(carried)} kept from {self.chain.last}"
                                                       if carried else ""))
        return set(local) - set(urls)

    async def _last_manifest(self) -> dict[str, Any] | None:
        """(watch) The manifest of the chain's last version (None: no version yet, or not a watch): the next
        version links its paths that the batch does not replace, so that it is the whole dataset.

        :raises RemoteValidationError: that version is gone (removed by an administrator).
        """
        last = self.chain.last if self.watch else None
        if last is None:
            return None
        manifest = await self.client.fetch_json(f"{self.project}/{self.asset}/{last}/..manifest")
        if not isinstance(manifest, dict):
            raise RemoteValidationError(
                f"gypsum version {self.project}/{self.asset}/{last}, the last of this watch, is gone: the next "
                "version cannot keep its files", hint="start a new chain: run the watch with a new VERSION name")
        return manifest

    async def _resume(self, local: Mapping[str, tuple[int, str]]) -> set[str]:
        rec = self.session
        assert rec is not None
        p, a, v = self.project, self.asset, self.version
        manifest = await self.client.fetch_json(f"{p}/{a}/{v}/..manifest") or {}
        differ = [rel for rel, (size, md5) in local.items()
                  if rel not in manifest or int(manifest[rel]["size"]) != size
                  or str(manifest[rel]["md5sum"]).lower() != md5]
        gone = sorted(rel for rel in set(manifest) - set(local)
                      if not (self.watch and isinstance(manifest[rel], dict) and "link" in manifest[rel]))
        differ += gone
        if differ and self.watch:
            # a watch never asks the user: the open version is discarded and started again with this batch
            self._say(f"the files of the interrupted upload of {p}/{a}/{v} changed since ({differ[0]}...): it "
                      "is discarded and started again")
            await self._end(rec, "abort")
            await self._precheck(local)
            return await self._start(local, await self._last_manifest())
        if differ:
            hint = (f"discard it with `asyncdepo gypsum abort {p}/{a}/{v}`, then push again"
                    if self.keep_for_resume else "it is being discarded now; run the push again to start over")
            if gone:
                # a file of the upload is gone from the source: the version would miss it (exit 1, as the
                # engine's vanished-source failure of any other target)
                changed = sorted(set(differ) - set(gone))
                raise SourceVanishedError(
                    f"source vanished since the interrupted upload of {p}/{a}/{v} started: {_shown(gone)}"
                    + (f"; changed since: {_shown(changed)}" if changed else ""), hint=hint)
            raise UsageError(f"the files differ from the interrupted upload of {p}/{a}/{v} ({_shown(differ)})",
                             hint=hint)
        prefix = f"{p}/{a}/{v}/"
        present = {k[len(prefix):] for k in await self.client.list_keys(prefix, recursive=True)}
        todo = set(rec.file_urls) - present
        self._counts["to_put"] = len(todo)
        self._counts["already_put"] = len(rec.file_urls) - len(todo)
        self._say(f"resuming upload {rec.label}: {self._counts['already_put']} of {len(rec.file_urls)} "
                  "file(s) already on the server")
        return set(local) - todo

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        if self.session is None or item.rel not in self.session.file_urls:
            raise UsageError(f"{item.rel}: not part of the gypsum upload (prepare was not run, or the file "
                             "was added after the upload started)")
        return GypsumWriter(self.client, item, self.session.file_urls[item.rel], self.session.token,
                            self._md5.get(item.rel))

    async def finish(self, ok: bool) -> dict[str, Any]:
        """Complete (``ok``) or abort the upload (unless ``keep_for_resume``); returns a summary. In watch
        mode it closes one version of the chain: completed, or aborted (never kept: the next batch needs the
        project's lock).

        :raises PermanentError | TransientError: the completion was refused (the upload is then aborted
            unless kept), or the abort could not reach the server (the session file is kept).
        """
        rec = self.session
        self._skip = None
        if self.watch:
            return await self._close_version(rec, ok)
        if rec is None:
            return {}
        target = f"{rec.project}/{rec.asset}/{rec.version}"
        summary: dict[str, Any] = {"gypsum": target, "files": self._counts["files"],
                                   "linked or deduplicated": self._counts["files"] - len(rec.file_urls)}
        if ok:
            try:
                await self._end(rec, "complete")
            except PermanentError:
                if not self.keep_for_resume:
                    await self._end(rec, "abort")
                raise
            summary["state"] = "completed" + (" (on probation)" if rec.probation else "")
            if rec.probation:
                summary["next"] = f"an owner approves it: asyncdepo gypsum approve {target}"
            return summary
        if self.keep_for_resume:
            summary["state"] = "kept for resume (the project stays locked)"
            summary["next"] = f"run the same push again, or discard it: asyncdepo gypsum abort {target}"
            return summary
        await self._end(rec, "abort")
        summary["state"] = "aborted (nothing kept on the server)"
        return summary

    async def _close_version(self, rec: SessionRecord | None, ok: bool) -> dict[str, Any]:
        chain = self.chain
        target = f"{self.project}/{self.asset}/{self.version}"
        summary: dict[str, Any] = {"gypsum": target, "files in the batch": self._counts["files"]}
        if rec is None and ok:  # nothing was started: the batch is the last version's files, unchanged
            return {"gypsum": f"{self.project}/{self.asset}/{chain.last}", "state": "unchanged: no new version"}
        if rec is not None and ok:
            try:
                await self._end(rec, "complete")
            except PermanentError:
                await self._end(rec, "abort")
                chain.discarded()
                raise
            chain.completed()
            self.version = chain.version
            summary["state"] = "completed (now ..latest)"
            self._say(f"version {target} completed: {self._counts['files']} file(s) of this batch, "
                      f"{self._counts['to_put']} of them sent; it is now ..latest")
            return summary
        if rec is not None:
            await self._end(rec, "abort")
        chain.discarded()
        summary["state"] = "discarded (its files go in the next version)"
        return summary

    async def _end(self, rec: SessionRecord, action: str) -> None:
        """Complete or abort with retries; a lost answer followed by 403 "not locked" is checked against
        the bucket (done when the version is finished, resp. gone)."""
        url = rec.complete_url if action == "complete" else rec.abort_url
        what = f"gypsum {action} {rec.project}/{rec.asset}/{rec.version}"
        first = True

        async def once() -> None:
            nonlocal first
            retried, first = not first, False
            try:
                await self.client.finish_upload(url, rec.token, what)
            except PermanentError as exc:
                if not retried or exc.status != 403:
                    raise
                # 403 "not locked" after a retry: the lost answer had landed; the bucket tells
                summary = await self.client.fetch_json(f"{rec.project}/{rec.asset}/{rec.version}/..summary")
                done = summary is not None and "upload_finish" in summary
                if not ((action == "complete" and done) or (action == "abort" and summary is None)):
                    raise

        await self.client.pacer.call(once)
        await anyio.to_thread.run_sync(
            lambda: self.sessions.delete(rec.server, rec.project, rec.asset, rec.version))
        self.session = None

    # -- pull ----------------------------------------------------------------------------------------
    async def resolve_version(self) -> str:
        """The version to pull: the one given, else the asset's latest.

        :raises RemoteValidationError: the asset has no finished (non-probational) version.
        """
        if self.version is None:
            latest = await self.client.fetch_json(f"{self.project}/{self.asset}/..latest")
            if not isinstance(latest, dict) or not latest.get("version"):
                raise RemoteValidationError(f"gypsum asset {self.project}/{self.asset} has no latest version",
                                            hint="name the version: PROJECT/ASSET/VERSION")
            self.version = str(latest["version"])
        return self.version

    async def list_remote(self) -> AsyncIterator[RemoteItem]:
        version = await self.resolve_version()
        base = f"{self.project}/{self.asset}/{version}"
        manifest = await self.client.fetch_json(f"{base}/..manifest")
        if not isinstance(manifest, dict):
            raise RemoteValidationError(f"gypsum version {base} does not exist (no ..manifest)")
        for rel in sorted(manifest):
            entry = manifest[rel]
            link = entry.get("link")
            if isinstance(link, dict):
                t = link.get("ancestor") or link
                key = f"{t['project']}/{t['asset']}/{t['version']}/{t['path']}"
            else:
                key = f"{base}/{rel}"
            yield RemoteItem(rel=rel, size=int(entry["size"]), digests={"md5": str(entry["md5sum"]).lower()},
                             ref=key)

    async def plain_get(self, item: RemoteItem) -> PlainGet:
        """``/file/{key}`` needs no credentials: the engine receives, hashes and writes it in a thread."""
        return PlainGet(url=self.client.base + file_path(item.ref), what=f"gypsum GET /file/{item.ref}",
                        timeout=300.0)

    async def read(self, item: RemoteItem, offset: int) -> AsyncIterator[bytes]:
        async for block in self.client.open_file(item.ref, offset):
            yield block
