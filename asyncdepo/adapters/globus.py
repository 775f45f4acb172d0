"""A small Globus Transfer API (v0.10) client on aiohttp: submit a transfer, follow its task, cancel it.

Only what an upload needs: ``GET endpoint/{id}`` (pre-flight check), ``GET submission_id`` + ``POST transfer``
(at most once: a retried POST with the same submission id answers ``Duplicate`` with the same task) and
``GET task/{id}`` polled until the task ends; a cancelled wait cancels the task (shielded), so Ctrl-C leaves
nothing running on Globus's side.

The access token (a Globus Transfer bearer token) is held by the client and sent only in the
``Authorization`` header; messages are built from Globus's ``code``/``message`` fields and the resource path.

Errors: 401/403 -> AuthError, 404 -> RemoteValidationError (unknown endpoint or task), 409 -> ConflictError,
429/5xx/network and a success answered without a JSON object -> TransientError (retried per request), an answer
without the submission or task id it must hold -> PermanentError, a task that ends ``FAILED`` -> PermanentError with
its ``fatal_error``. A Globus task retries faulted files itself, so a task's faults are reported, not retried.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import anyio

from asyncdepo import errors
from asyncdepo.transport.failures import boundary, status_error
from asyncdepo.transport.httpbody import request_timeout
from asyncdepo.transport.pacer import Pacer

DEFAULT_BASE = "https://transfer.api.globus.org/v0.10"
SYNC_LEVELS = {"exists": 0, "size": 1, "mtime": 2, "checksum": 3}


@dataclasses.dataclass(frozen=True)
class TransferItem:
    """One path to copy; ``recursive`` for a folder."""

    source_path: str
    destination_path: str
    recursive: bool = True


@dataclasses.dataclass(frozen=True)
class TaskProgress:
    """A poll of a running task (``files`` is known once Globus has expanded the folders)."""

    task_id: str
    status: str
    bytes_transferred: int
    files: int
    files_transferred: int
    files_skipped: int
    faults: int


class GlobusClient:
    """Talks to one Globus Transfer service with one token. Not a context manager: the session is the caller's.

    :param session: an aiohttp session (the caller closes it).
    :param token: the Transfer API bearer token (kept private).
    :param base_url: e.g. ``https://transfer.api.globus.org/v0.10`` or a simulator's ``http://127.0.0.1:N/v0.10``.
    :param poll_interval: seconds between task polls.
    """

    def __init__(self, session: aiohttp.ClientSession, token: str, *, base_url: str = DEFAULT_BASE,
                 poll_interval: float = 2.0, pacer: Pacer | None = None) -> None:
        self._session = session
        self._token = token
        self.base_url = base_url.rstrip("/")
        self.poll_interval = poll_interval
        self.pacer = pacer or Pacer()

    def __repr__(self) -> str:  # never the token
        return f"GlobusClient({self.base_url!r})"

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        url = f"{self.base_url}/{path}"
        # identity: the engine's sessions do not decompress (they stream file bodies untouched)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                   "Accept-Encoding": "identity"}

        what = f"Globus {method} /{path}"

        async def once() -> tuple[int, dict[str, Any]]:
            with boundary(what):
                async with self._session.request(method, url, json=body, headers=headers,
                                                 timeout=request_timeout(0)) as resp:
                    try:
                        data = await resp.json(content_type=None)
                    except ValueError:  # not JSON: e.g. a proxy's own page
                        data = None
                    if resp.status >= 400:
                        fields = data if isinstance(data, dict) else {}
                        text = ": ".join(str(fields[k]) for k in ("code", "message") if fields.get(k)) or resp.reason
                        raise status_error(resp.status, str(text or ""), what=what,
                                           retry_after=resp.headers.get("Retry-After"), hints={
                                               errors.AuthError: "give a valid Globus Transfer access token in "
                                                                 "GLOBUS_TRANSFER_TOKEN"})
                    if not isinstance(data, dict):  # an empty or foreign answer: the next try may get the real one
                        raise errors.TransientError(f"{what}: HTTP {resp.status} answered "
                                                    f"{resp.content_type or 'no content type'}, not a JSON object",
                                                    status=resp.status)
                    return resp.status, data

        return await self.pacer.call(once)

    async def endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """The endpoint document; raises RemoteValidationError when Globus does not know it."""
        return (await self._call("GET", f"endpoint/{endpoint_id}"))[1]

    async def submit(self, source_endpoint: str, destination_endpoint: str, items: Sequence[TransferItem], *,
                     label: str | None = None, sync_level: str = "checksum", verify_checksum: bool = True) -> str:
        """Submit one transfer of ``items``; returns the task id. Safe to call again after a crash: with
        ``sync_level="checksum"`` files already at the destination are skipped."""
        _, sub = await self._call("GET", "submission_id")
        if not sub.get("value"):
            raise errors.PermanentError(f"Globus answered no submission id: {sub}")
        body = {
            "DATA_TYPE": "transfer",
            "submission_id": sub["value"],
            "source_endpoint": source_endpoint,
            "destination_endpoint": destination_endpoint,
            "sync_level": SYNC_LEVELS[sync_level],
            "verify_checksum": verify_checksum,
            "preserve_timestamp": True,
            "DATA": [{"DATA_TYPE": "transfer_item", "source_path": i.source_path,
                      "destination_path": i.destination_path, "recursive": i.recursive} for i in items],
        }
        if label:
            body["label"] = label
        _, result = await self._call("POST", "transfer", body)
        task_id = result.get("task_id")
        if not task_id:
            raise errors.PermanentError(f"Globus accepted the transfer without a task id: {result.get('code')}")
        return str(task_id)

    async def status(self, task_id: str) -> dict[str, Any]:
        return (await self._call("GET", f"task/{task_id}"))[1]

    async def cancel(self, task_id: str) -> None:
        """Cancel a task; never raises (it runs during cleanup)."""
        try:
            await self._call("POST", f"task/{task_id}/cancel")
        except errors.DepoError:
            pass

    async def wait(self, task_id: str, on_progress: Callable[[TaskProgress], None] | None = None) -> dict[str, Any]:
        """Poll the task until it ends; returns its final document.

        :raises PermanentError: the task ended FAILED (its fatal error in the message).
        On cancellation the task is cancelled on Globus's side (shielded) before re-raising.
        """
        try:
            while True:
                task = await self.status(task_id)
                if on_progress is not None:
                    on_progress(TaskProgress(
                        task_id, str(task.get("status")), int(task.get("bytes_transferred") or 0),
                        int(task.get("files") or 0), int(task.get("files_transferred") or 0),
                        int(task.get("files_skipped") or 0), int(task.get("faults") or 0)))
                status = task.get("status")
                if status == "SUCCEEDED":
                    return task
                if status == "FAILED":
                    fatal = task.get("fatal_error") or {}
                    reason = f"{fatal.get('code', 'FAILED')}: {fatal.get('description', '')}".rstrip(": ")
                    raise errors.PermanentError(f"Globus task {task_id} failed: {reason}")
                await anyio.sleep(self.poll_interval)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.cancel(task_id)
            raise
