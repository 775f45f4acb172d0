"""A minimal Globus Transfer API (v0.10) simulator: enough for EMPIAR's Globus upload path.

Routes (``Authorization: Bearer <token>``)::

    GET  /v0.10/submission_id         {"DATA_TYPE": "submission_id", "value": "<uuid>"}
    GET  /v0.10/endpoint/{id}         {"DATA_TYPE": "endpoint", "id", "display_name", "activated": true, ...}
    POST /v0.10/transfer              202 {"DATA_TYPE": "transfer_result", "code": "Accepted", "task_id", ...}
    GET  /v0.10/task/{id}             {"DATA_TYPE": "task", "status": "ACTIVE|SUCCEEDED|FAILED", ...}
    POST /v0.10/task/{id}/cancel      {"DATA_TYPE": "result", "code": "Canceled", ...}
    GET|POST /_sim/globus             task-level faults ({"fail_tasks": N, "transient_faults": N, "hold": bool})

Endpoints: every ``--endpoint ID=DIR`` is a source collection whose path ``/a/b`` is ``DIR/a/b`` (the default
maps :data:`LOCAL_ENDPOINT` to ``/``, like Globus Connect Personal sharing the whole disk). Both EMPIAR
endpoint ids (:data:`EMPIAR_ENDPOINTS`) map to ``--root``: run this simulator with the EMPIAR simulator's root,
and ``/upload/<DIR>/data/...`` lands in the entry's upload area.

A transfer is run by a task in the simulator's loop: each item (``recursive`` for a folder) is copied file by
file in a thread, parent folders created. ``sync_level`` (0 exists, 1 size, 2 mtime, 3 checksum) skips files
the destination already holds, so resubmitting resumes; ``verify_checksum`` compares md5 after each copy.
A duplicate ``submission_id`` answers 200 ``"code": "Duplicate"`` with the first task's id (Globus's
at-most-once guarantee). Errors are ``{"code": ..., "message": ..., "request_id": ..., "resource": ...}``.

Faults besides the HTTP ones of the fault injector: ``fail_tasks`` makes the next N tasks end ``FAILED`` with a
``fatal_error``; ``transient_faults`` makes the next N file copies fail once (counted in the task's
``faults``, then retried, as Globus does); ``hold`` keeps new tasks ``ACTIVE`` until released (cancel tests).
``GlobusState.polled`` (a threading.Event) is set by the first status poll: a client holds its task id then.
``GlobusState.pause_at(n)`` pauses every copy once ``n`` bytes were copied in all (tasks keep running after
their client is gone, as Globus's do: a test kills its client there, at a byte offset, then lets go).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import make_app

BASE = "/v0.10/"
EMPIAR_ENDPOINTS = ("d50a0618-6d04-11e5-ba46-22000b92c6ec", "138b5c78-adef-4c12-89e6-2cd170bf63ed")
LOCAL_ENDPOINT = "9b2d5f2e-0c1a-4a53-9a8e-6b0f2c7d1e01"
ACCEPTED = "The transfer has been accepted and a task has been created and queued for execution"
STATE_KEY: web.AppKey[GlobusState] = web.AppKey("globus_state", object)  # type: ignore[arg-type]


class GlobusReject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


@dataclasses.dataclass
class Task:
    """One transfer task and its counters (serialised as Globus's ``task`` document)."""

    task_id: str
    submission_id: str
    source: str
    destination: str
    items: list[dict[str, Any]]
    sync_level: int | None
    verify_checksum: bool
    label: str | None = None
    status: str = "ACTIVE"
    nice_status: str | None = "Queued"
    request_time: str = dataclasses.field(default_factory=_now)
    completion_time: str | None = None
    files: int = 0
    directories: int = 0
    files_transferred: int = 0
    files_skipped: int = 0
    bytes_transferred: int = 0
    bytes_checksummed: int = 0
    faults: int = 0
    fatal_error: dict[str, str] | None = None
    canceled: bool = False

    def document(self) -> dict[str, Any]:
        return {
            "DATA_TYPE": "task", "type": "TRANSFER", "task_id": self.task_id, "label": self.label,
            "status": self.status, "nice_status": self.nice_status, "request_time": self.request_time,
            "completion_time": self.completion_time, "source_endpoint_id": self.source,
            "destination_endpoint_id": self.destination, "sync_level": self.sync_level,
            "verify_checksum": self.verify_checksum, "files": self.files, "directories": self.directories,
            "files_transferred": self.files_transferred, "files_skipped": self.files_skipped,
            "bytes_transferred": self.bytes_transferred, "bytes_checksummed": self.bytes_checksummed,
            "faults": self.faults, "fatal_error": self.fatal_error,
            "subtasks_total": self.files, "subtasks_succeeded": self.files_transferred + self.files_skipped,
            "subtasks_failed": 0 if self.status != "FAILED" else 1, "is_paused": False,
        }


class GlobusState:
    """Endpoints, issued submission ids, tasks and task faults of one simulator."""

    def __init__(self, root: Path, token: str, endpoints: dict[str, Path]) -> None:
        self.root = root
        self.token = token
        self.endpoints = {**endpoints, **{e: root for e in EMPIAR_ENDPOINTS}}
        self.submission_ids: set[str] = set()
        self.by_submission: dict[str, str] = {}
        self.tasks: dict[str, Task] = {}
        self.fail_tasks = 0
        self.transient_faults = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.running: set[asyncio.Task[None]] = set()
        # set when a client asks for a task's status: it holds the task id then (a test kills it at that
        # point); a threading.Event, so a test in another thread (ThreadedSim) can wait on it
        self.polled = threading.Event()
        self.meter = ByteMeter()

    def resolve(self, endpoint: str, path: str) -> Path:
        """The local path of ``path`` on ``endpoint``.

        :raises GlobusReject: unknown endpoint (404) or a path leaving the collection (400).
        """
        base = self.endpoints.get(endpoint)
        if base is None:
            raise GlobusReject(404, "EndpointNotFound", f"No such endpoint with id '{endpoint}'")
        rel = path.removeprefix("/~/").lstrip("/")
        if ".." in Path(rel).parts:
            raise GlobusReject(400, "ClientError.BadRequest", f"Invalid path '{path}'")
        return base / rel


# -- copying (in worker threads) -----------------------------------------------------------------------
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _in_sync(src: Path, dst: Path, level: int | None) -> bool:
    if level is None or not dst.is_file():
        return False
    a, b = src.stat(), dst.stat()
    if level == 0:
        return True
    if a.st_size != b.st_size:
        return False
    if level == 1:
        return True
    if level == 2:
        return b.st_mtime_ns >= a.st_mtime_ns
    return _md5(src) == _md5(dst)


def _copy(src: Path, dst: Path, task: Task, meter: ByteMeter) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(meter.room(1 << 20)):
            fout.write(block)
            fout.flush()
            task.bytes_transferred += len(block)
            meter.passed(len(block))
    shutil.copystat(src, dst)


class ByteMeter:
    """Bytes copied by every task, and the pause point (the copies run in threads: threading primitives)."""

    def __init__(self) -> None:
        self.total = 0
        self.limit: int | None = None
        self.paused = threading.Event()
        self._go = threading.Event()
        self._go.set()

    def pause_at(self, n: int | None) -> None:
        if n is None:
            self.limit = None
            self._go.set()
        else:
            self.paused.clear()
            self._go.clear()
            self.limit = n

    def room(self, want: int) -> int:
        """How much the next read may take; blocks at the pause point until released."""
        while self.limit is not None and self.total >= self.limit:
            self.paused.set()
            self._go.wait()
        return want if self.limit is None else max(1, min(want, self.limit - self.total))

    def passed(self, n: int) -> None:
        self.total += n


def _pairs(src: Path, dst: Path, recursive: bool, task: Task) -> list[tuple[Path, Path]]:
    if not src.exists():
        raise FileNotFoundError(f"No such file or directory: {src}")
    if src.is_dir():
        if not recursive:
            raise IsADirectoryError(f"{src} is a directory; set recursive")
        pairs = []
        for folder, dirs, files in os.walk(src):
            task.directories += 1
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                pairs.append((path, dst / path.relative_to(src)))
        dst.mkdir(parents=True, exist_ok=True)
        return pairs
    return [(src, dst)]


async def _run(state: GlobusState, task: Task) -> None:
    await state.hold.wait()
    if task.canceled:
        return
    task.nice_status = "OK"
    try:
        if state.fail_tasks > 0:
            state.fail_tasks -= 1
            raise PermissionError("injected fault: permission denied on the destination")
        pairs: list[tuple[Path, Path]] = []
        for item in task.items:
            src = state.resolve(task.source, item["source_path"])
            dst = state.resolve(task.destination, item["destination_path"])
            pairs += await asyncio.to_thread(_pairs, src, dst, bool(item.get("recursive")), task)
        task.files = len(pairs)
        for src, dst in pairs:
            if task.canceled:
                return
            if await asyncio.to_thread(_in_sync, src, dst, task.sync_level):
                task.files_skipped += 1
                continue
            while True:
                if state.transient_faults > 0:
                    state.transient_faults -= 1
                    task.faults += 1  # Globus retries a faulted file by itself
                    continue
                await asyncio.to_thread(_copy, src, dst, task, state.meter)
                if task.verify_checksum:
                    a, b = await asyncio.gather(asyncio.to_thread(_md5, src), asyncio.to_thread(_md5, dst))
                    task.bytes_checksummed += src.stat().st_size
                    if a != b:
                        task.faults += 1
                        continue
                break
            task.files_transferred += 1
        task.status, task.nice_status = "SUCCEEDED", None
    except (OSError, GlobusReject) as exc:
        code = "FILE_NOT_FOUND" if isinstance(exc, FileNotFoundError) else "PERMISSION_DENIED"
        task.status, task.nice_status = "FAILED", code
        task.fatal_error = {"code": code, "description": str(exc)}
    finally:
        task.completion_time = _now()


# -- HTTP ---------------------------------------------------------------------------------------------
def _answer(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _routes(app: web.Application, state: GlobusState, faults: FaultInjector) -> None:
    def guarded(fn: Any) -> Any:
        async def handle(request: web.Request) -> web.Response:
            try:
                auth = request.headers.get("Authorization", "")
                if not auth.startswith("Bearer ") or auth[7:].strip() != state.token:
                    raise GlobusReject(401, "AuthenticationFailed", "Token is not active")
                return await fn(request)  # type: ignore[no-any-return]
            except GlobusReject as rej:
                body = {"code": rej.code, "message": rej.message, "request_id": uuid.uuid4().hex[:9],
                        "resource": request.path}
                return _answer(body, rej.status)

        return handle

    async def submission_id(_: web.Request) -> web.Response:
        value = str(uuid.uuid4())
        state.submission_ids.add(value)
        return _answer({"DATA_TYPE": "submission_id", "value": value})

    async def endpoint(request: web.Request) -> web.Response:
        ident = request.match_info["id"]
        if ident not in state.endpoints:
            raise GlobusReject(404, "EndpointNotFound", f"No such endpoint with id '{ident}'")
        name = "EMPIAR" if ident in EMPIAR_ENDPOINTS else f"local {state.endpoints[ident]}"
        return _answer({"DATA_TYPE": "endpoint", "id": ident, "display_name": name, "activated": True,
                        "gcs_version": "5.4", "entity_type": "GCP_mapped_collection"})

    async def transfer(request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await faults.read_all(request))
        except orjson.JSONDecodeError:
            raise GlobusReject(400, "ClientError.BadRequest", "Request body is not valid JSON") from None
        if not isinstance(body, dict) or body.get("DATA_TYPE") != "transfer":
            raise GlobusReject(400, "ClientError.BadRequest", "DATA_TYPE must be 'transfer'")
        sub = body.get("submission_id")
        if sub in state.by_submission:
            task_id = state.by_submission[sub]
            return _answer({"DATA_TYPE": "transfer_result", "code": "Duplicate", "task_id": task_id,
                            "submission_id": sub, "message": f"A transfer with id '{sub}' was already submitted",
                            "resource": "/transfer", "request_id": uuid.uuid4().hex[:9]})
        if sub not in state.submission_ids:
            raise GlobusReject(400, "ClientError.BadRequest", "Invalid or missing submission_id")
        items = body.get("DATA") or []
        if not items or not all(isinstance(i, dict) and i.get("DATA_TYPE") == "transfer_item" for i in items):
            raise GlobusReject(400, "ClientError.BadRequest", "DATA must be a non-empty list of transfer_item")
        src, dst = str(body.get("source_endpoint")), str(body.get("destination_endpoint"))
        for item in items:  # unknown endpoints and bad paths are refused at submission, as Globus does
            state.resolve(src, str(item.get("source_path", "")))
            state.resolve(dst, str(item.get("destination_path", "")))
        level = body.get("sync_level")
        if level is not None and level not in (0, 1, 2, 3):
            raise GlobusReject(400, "ClientError.BadRequest", "sync_level must be 0, 1, 2 or 3")
        task = Task(str(uuid.uuid4()), sub, src, dst, items, level, bool(body.get("verify_checksum", True)),
                    label=body.get("label"))
        state.tasks[task.task_id] = task
        state.by_submission[sub] = task.task_id
        runner = asyncio.get_running_loop().create_task(_run(state, task))
        state.running.add(runner)
        runner.add_done_callback(state.running.discard)
        return _answer({"DATA_TYPE": "transfer_result", "code": "Accepted", "message": ACCEPTED,
                        "task_id": task.task_id, "submission_id": sub, "resource": "/transfer",
                        "request_id": uuid.uuid4().hex[:9],
                        "task_link": {"DATA_TYPE": "link", "href": f"task/{task.task_id}?format=json",
                                      "rel": "related", "resource": "task"}}, 202)

    def _task(request: web.Request) -> Task:
        task = state.tasks.get(request.match_info["id"])
        if task is None:
            raise GlobusReject(404, "TaskNotFound", f"Task {request.match_info['id']} not found")
        return task

    async def task_status(request: web.Request) -> web.Response:
        task = _task(request)
        state.polled.set()
        return _answer(task.document())

    async def cancel(request: web.Request) -> web.Response:
        task = _task(request)
        if task.status in ("SUCCEEDED", "FAILED"):
            return _answer({"DATA_TYPE": "result", "code": "TaskComplete", "message": "The task already completed"})
        task.canceled = True
        task.status, task.nice_status = "FAILED", "CANCELED"
        task.fatal_error = {"code": "CANCELED", "description": "canceled"}
        return _answer({"DATA_TYPE": "result", "code": "Canceled", "message": "The task has been cancelled successfully."})

    async def sim_faults(request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await request.json()
            state.fail_tasks = int(body.get("fail_tasks", state.fail_tasks))
            state.transient_faults = int(body.get("transient_faults", state.transient_faults))
            if "hold" in body:
                state.hold.clear() if body["hold"] else state.hold.set()
        return _answer({"fail_tasks": state.fail_tasks, "transient_faults": state.transient_faults,
                        "hold": not state.hold.is_set(), "tasks": [t.document() for t in state.tasks.values()]})

    app.router.add_get(BASE + "submission_id", guarded(submission_id))
    app.router.add_get(BASE + "endpoint/{id}", guarded(endpoint))
    app.router.add_post(BASE + "transfer", guarded(transfer))
    app.router.add_get(BASE + "task/{id}", guarded(task_status))
    app.router.add_post(BASE + "task/{id}/cancel", guarded(cancel))
    app.router.add_route("*", "/_sim/globus", sim_faults)

    async def stop_tasks(_: web.Application) -> None:
        state.hold.set()
        state.meter.pause_at(None)  # a copy thread held at the pause point would outlive the loop
        for runner in list(state.running):
            runner.cancel()
        await asyncio.gather(*state.running, return_exceptions=True)

    app.on_cleanup.append(stop_tasks)


# -- module contract ----------------------------------------------------------------------------------
DEFAULT_TOKEN = "globus-token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Globus simulator's own flags."""
    parser.add_argument("--token", default=DEFAULT_TOKEN, help=f"the accepted bearer token (default {DEFAULT_TOKEN})")
    parser.add_argument(
        "--endpoint", action="append", default=[], metavar="ID=DIR",
        help=f"a source collection rooted at DIR (default {LOCAL_ENDPOINT}=/; repeatable)",
    )


def build_app(root: Path, faults: FaultInjector, args: argparse.Namespace | None) -> web.Application:
    """The Globus Transfer API whose EMPIAR endpoints write under ``root`` (the EMPIAR simulator's root)."""
    endpoints: dict[str, Path] = {}
    for spec in getattr(args, "endpoint", None) or [f"{LOCAL_ENDPOINT}=/"]:
        ident, sep, folder = spec.partition("=")
        if not sep or not ident or not folder:
            raise ValueError(f"endpoint {spec!r}: expected ID=DIR")
        endpoints[ident] = Path(folder)
    state = GlobusState(Path(root), getattr(args, "token", None) or DEFAULT_TOKEN, endpoints)
    app = make_app(faults)
    app[STATE_KEY] = state
    _routes(app, state, faults)
    return app


def state_of(app: web.Application) -> GlobusState:
    """The simulator's state, for in-process tests."""
    return app[STATE_KEY]
