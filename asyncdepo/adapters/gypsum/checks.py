"""What gypsum accepts, checked on our side before an upload starts: target and path names, and the state of
the project from its public layout files (it exists, the version does not, no other upload holds the lock,
the quota leaves room), so that a refused push says why, with figures, before ``/upload/start`` is
contacted."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from asyncdepo.adapters.gypsum.api import GypsumClient
from asyncdepo.errors import ConflictError, QuotaError, RemoteValidationError, UsageError, ValidationError

UNLOCK_HINT = "if that upload is stale, an administrator can clear the lock: asyncdepo gypsum unlock {p}"


def parse_target(text: str, *, need_version: bool) -> tuple[str, str, str | None]:
    """``PROJECT/ASSET/VERSION`` (or ``PROJECT/ASSET`` when ``need_version`` is false).

    :raises UsageError: wrong shape or a name gypsum refuses.
    """
    parts = text.strip("/").split("/")
    if len(parts) not in ((3,) if need_version else (2, 3)) or not all(parts):
        shape = "PROJECT/ASSET/VERSION" if need_version else "PROJECT/ASSET[/VERSION]"
        raise UsageError(f"target {text!r}: expected {shape}")
    for part in parts:
        if part.startswith("..") or "\\" in part:
            raise UsageError(f"target {text!r}: names cannot start with '..' or contain '\\'")
    return parts[0], parts[1], (parts[2] if len(parts) == 3 else None)


def check_rel(rel: str) -> None:
    """A file path gypsum accepts (no component starting with '..', no '\\').

    :raises ValidationError: naming the path.
    """
    if "\\" in rel or any(part.startswith("..") or part in ("", ".") for part in rel.split("/")):
        raise ValidationError("path", f"{rel!r} cannot be stored in gypsum (a component starts with '..', "
                              "is empty, or contains '\\')", hint="rename it, or leave it out with --exclude")


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover



def locked(project: str, lock: Mapping[str, Any]) -> ConflictError:
    """The error for a project whose lock another upload holds, saying who, what and since when."""
    # only fields that say who and what; a real server's lock may hold more, which is not ours to print
    held = f"{lock.get('asset', '?')}/{lock.get('version', '?')}"
    who = f" by {lock['user_id']}" if isinstance(lock.get("user_id"), str) else ""
    when = f" since {lock['locked_at']}" if isinstance(lock.get("locked_at"), str) else ""
    return ConflictError(
        f"gypsum project '{project}' is locked by another upload (of {held}{who}{when})",
        hint="wait for it to finish; its uploader can abort it with `asyncdepo gypsum abort "
             f"{project}/{held}` on the machine that started it; " + UNLOCK_HINT.format(p=project))


async def project_exists(client: GypsumClient, project: str) -> None:
    """:raises RemoteValidationError: the project does not exist."""
    if await client.fetch_json(f"{project}/..permissions") is None:
        raise RemoteValidationError(f"gypsum project '{project}' does not exist on {client.base}",
                                    hint=f"an administrator creates it: asyncdepo gypsum create {project} --owner LOGIN")


async def before_start(client: GypsumClient, p: str, a: str, v: str, local: Mapping[str, tuple[int, str]],
                       dedup: bool) -> str | None:
    """The version ``p/a/v`` is free, the project unlocked, and the upload of ``local`` (rel -> (size, md5))
    fits in the quota; returns a line about the quota (None: the project has none).

    :raises ConflictError: the version exists, or another upload holds the project's lock.
    :raises QuotaError: the upload would not fit (the figures in the message).
    """
    fetch = client.fetch_json
    summary = await fetch(f"{p}/{a}/{v}/..summary")
    if summary is not None:
        who = summary.get("upload_user_id", "?")
        raise ConflictError(f"gypsum version {p}/{a}/{v} already exists (uploaded by {who})",
                            hint="versions are immutable: push to a new version name")
    lock = await fetch(f"{p}/..LOCK")
    if lock is not None:
        raise locked(p, lock)
    quota, usage = await fetch(f"{p}/..quota"), await fetch(f"{p}/..usage")
    if not isinstance(quota, dict):
        return None
    needed = sum(size for size, _ in local.values())
    if dedup:
        needed -= await predicted_dedup(client, p, a, local)
    year = _dt.datetime.now(_dt.UTC).year
    baseline, growth = float(quota.get("baseline", 0)), float(quota.get("growth_rate", 0))
    since = int(quota.get("year", year))
    limit = baseline + (year - since) * growth
    used = float((usage or {}).get("total", 0))
    if used + needed >= limit:
        raise QuotaError(
            f"gypsum project '{p}' is over quota for this upload: it needs {human(needed)} "
            f"({needed:,} bytes) but only {human(max(0.0, limit - used))} is left (usage {human(used)} "
            f"of {human(limit)}: baseline {human(baseline)} + {human(growth)}/year since {since})",
            hint=f"ask a gypsum administrator to raise it: asyncdepo gypsum set-quota {p} --baseline BYTES")
    return f"quota: {human(needed)} to store, {human(limit - used)} left in project {p}"


async def predicted_dedup(client: GypsumClient, p: str, a: str, local: Mapping[str, tuple[int, str]]) -> int:
    """Bytes the server will link instead of storing (files matching the latest version)."""
    latest = await client.fetch_json(f"{p}/{a}/..latest")
    if not isinstance(latest, dict) or "version" not in latest:
        return 0
    manifest = await client.fetch_json(f"{p}/{a}/{latest['version']}/..manifest")
    if not isinstance(manifest, dict):
        return 0
    known = {(int(e["size"]), str(e["md5sum"]).lower()) for e in manifest.values()}
    return sum(size for size, md5 in local.values() if (size, md5) in known)
