"""Who may do what in the gypsum simulator, and the stand-in GitHub endpoints.

Roles (as the real server): administrators (``--admin``, users or organisations) may do anything; project
owners (``owners`` in ``{p}/..permissions``, users or organisations) manage their project and upload
trusted; uploaders ``{id, asset?, version?, until?, trusted?}`` may upload (untrusted ones on probation).
One deliberate difference: the real server stops at the first uploader entry whose ``id`` matches even when
its asset/version/until do not fit (a ``break`` where a ``continue`` was meant); the simulator goes on to
the next entry.

GitHub: ``GET /user`` and ``GET /user/orgs`` answer from the configured identities, like api.github.com
does for a token, so gypsum-client's ``set_access_token(token, github_url=<simulator>)`` works offline.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

from aiohttp import web

from asyncdepo.sim.gypsum_core import GypsumError, GypsumState, Identity, bearer_token, ok, state_of
from asyncdepo.sim.gypsum_store import parse_iso, permissions_key, quota_key

_DATE = re.compile(r"^[1-9]\d{3}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


def user_of(request: web.Request) -> Identity:
    """The identity behind the request's bearer token (401 when missing or unknown)."""
    return state_of(request).identify(bearer_token(request))


def get_permissions(state: GypsumState, project: str) -> dict[str, Any]:
    """The project's permissions.

    :raises GypsumError: 404 when the project does not exist.
    """
    perms = state.bucket.read_json(permissions_key(project))
    if perms is None:
        raise GypsumError(f"project '{project}' does not exist", 404)
    return perms  # type: ignore[no-any-return]


def _is_one_of(ident: Identity, allowed: list[str] | tuple[str, ...]) -> bool:
    return bool(ident.ids() & set(allowed))


def check_admin(state: GypsumState, ident: Identity) -> None:
    """:raises GypsumError: 403 unless ``ident`` is an administrator."""
    if not state.is_admin(ident):
        raise GypsumError("user does not have administrative privileges", 403)


def check_owner(state: GypsumState, project: str, ident: Identity) -> dict[str, Any]:
    """The project's permissions, when ``ident`` owns the project or is an administrator.

    :raises GypsumError: 404 (no such project), 403 (not an owner).
    """
    perms = get_permissions(state, project)
    if not _is_one_of(ident, perms.get("owners", [])) and not state.is_admin(ident):
        raise GypsumError(f"user is not an owner of project '{project}'", 403)
    return perms


def check_uploader(state: GypsumState, project: str, asset: str, version: str, ident: Identity) -> tuple[bool, bool]:
    """``(can_manage, trusted)`` for an upload of ``project/asset/version`` by ``ident``.

    :raises GypsumError: 404 (no such project), 403 (not authorised).
    """
    perms = get_permissions(state, project)
    if _is_one_of(ident, perms.get("owners", [])) or state.is_admin(ident):
        return True, True
    ids = ident.ids()
    for up in perms.get("uploaders", []):
        if up.get("id") not in ids:
            continue
        if "asset" in up and up["asset"] != asset:
            continue
        if "version" in up and up["version"] != version:
            continue
        if "until" in up:
            until = parse_iso(str(up["until"]))
            if until is None or until < state.now():
                continue
        return False, bool(up.get("trusted", False))
    raise GypsumError(f"user is not authorized to upload to project '{project}'", 403)


def validate_permissions(body: Any) -> None:
    """Check a (partial) permissions object as the real server does.

    :raises GypsumError: 400 describing the first problem.
    """
    if not isinstance(body, dict):
        raise GypsumError("expected permissions to be a JSON object", 400)
    if "owners" in body:
        owners = body["owners"]
        if not isinstance(owners, list) or not all(isinstance(o, str) for o in owners):
            raise GypsumError("expected 'owners' to be an array of strings", 400)
    if "uploaders" in body:
        uploaders = body["uploaders"]
        if not isinstance(uploaders, list):
            raise GypsumError("expected 'uploaders' to be an array", 400)
        for entry in uploaders:
            if not isinstance(entry, dict):
                raise GypsumError("expected 'uploaders' to be an array of objects", 400)
            if not isinstance(entry.get("id"), str):
                raise GypsumError("expected 'uploaders.id' property to be a string", 400)
            if "until" in entry:
                until = entry["until"]
                if not isinstance(until, str) or not _DATE.match(until) or parse_iso(until) is None:
                    raise GypsumError("expected 'uploaders.until' property to be a date/time-formatted string", 400)
            if "trusted" in entry and not isinstance(entry["trusted"], bool):
                raise GypsumError("expected 'uploaders.trusted' property to be a boolean", 400)
            for field in ("asset", "version"):
                if field in entry and not isinstance(entry[field], str):
                    raise GypsumError(f"expected 'uploaders.{field}' property to be a string", 400)


def validate_quota(body: Any) -> None:
    """:raises GypsumError: 400 unless ``body`` is an object whose baseline/growth_rate/year are numbers >= 0."""
    if not isinstance(body, dict):
        raise GypsumError("expected quota specification to be a JSON object", 400)
    for field in ("baseline", "growth_rate", "year"):
        if field in body:
            value = body[field]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GypsumError(f"expected '{field}' to be a number", 400)
            if value < 0:
                raise GypsumError(f"expected '{field}' to be a non-negative number", 400)


def quota_limit(state: GypsumState, project: str) -> float:
    """``baseline + (this_year - year) * growth_rate`` (infinite when the project has no quota file)."""
    quota = state.bucket.read_json(quota_key(project))
    if quota is None:
        return float("inf")
    year = _dt.datetime.fromtimestamp(state.now(), _dt.UTC).year
    return float(quota.get("baseline", 0)) + (year - float(quota.get("year", year))) * float(
        quota.get("growth_rate", 0)
    )


def default_quota(state: GypsumState) -> dict[str, int]:
    """The real server's defaults: 10 GB baseline, 20 GB a year, starting this year."""
    year = _dt.datetime.fromtimestamp(state.now(), _dt.UTC).year
    return {"baseline": 10 * 10**9, "growth_rate": 20 * 10**9, "year": year}


def add_github_routes(app: web.Application) -> None:
    """``GET /user`` and ``GET /user/orgs`` as api.github.com answers them (401 "Bad credentials")."""

    def ident(request: web.Request) -> Identity | None:
        auth = request.headers.get("Authorization", "")
        token = auth.split(" ", 1)[1].strip() if " " in auth else ""
        return state_of(request).config.identities.get(token)

    async def user(request: web.Request) -> web.Response:
        found = ident(request)
        if found is None:
            return web.json_response({"message": "Bad credentials"}, status=401)
        return ok({"login": found.login, "type": "User"})

    async def orgs(request: web.Request) -> web.Response:
        found = ident(request)
        if found is None:
            return web.json_response({"message": "Bad credentials"}, status=401)
        return ok([{"login": o} for o in found.orgs])

    app.router.add_get("/user", user)
    app.router.add_get("/user/orgs", orgs)
