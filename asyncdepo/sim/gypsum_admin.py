"""Administration routes of the gypsum simulator.

=========================================  ===============  =================================================
route                                      who              effect
=========================================  ===============  =================================================
``POST /create/{p}``                       admin            ``..permissions``, ``..quota`` (defaults filled),
                                                            ``..usage`` = 0; 400 if the project exists
``PUT /permissions/{p}``                   owner or admin   replace ``owners`` and/or ``uploaders``
``PUT /quota/{p}``                         admin            replace baseline/growth_rate/year given
``POST /probation/approve/{p}/{a}/{v}``    owner or admin   drop ``on_probation``; ``..latest`` moves when the
                                                            version finished after the current latest
``POST /probation/reject/{p}/{a}/{v}``     its uploader,    delete the version, give its bytes back in
                                           owner or admin   ``..usage``
``POST /refresh/latest/{p}/{a}``           admin            recompute ``..latest`` -> ``{"version"}`` or ``{}``
``POST /refresh/usage/{p}``                admin            recompute ``..usage`` -> ``{"total"}``
``DELETE /remove/{p}[/{a}[/{v}]]``         admin            delete; usage and latest follow
``DELETE /unlock/{p}``                     admin            clear a stale ``..LOCK``
=========================================  ===============  =================================================

Approve and reject refuse (403 "project asset has already been locked") while an upload holds the
project's lock, as the real server (which takes the lock for their duration).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from asyncdepo.sim.gypsum_auth import (
    check_admin,
    check_owner,
    check_uploader,
    default_quota,
    user_of,
    validate_permissions,
    validate_quota,
)
from asyncdepo.sim.gypsum_core import (
    GypsumError,
    GypsumState,
    check_names,
    json_body,
    ok,
    raw_params,
    state_of,
)
from asyncdepo.sim.gypsum_store import (
    latest_key,
    lock_key,
    parse_iso,
    permissions_key,
    quota_key,
    summary_key,
    usage_key,
)


def refresh_latest(state: GypsumState, project: str, asset: str) -> str | None:
    """Point ``..latest`` at the finished, non-probational version with the latest ``upload_finish``
    (delete it when there is none); returns that version."""
    best: tuple[float, str] | None = None
    for entry in state.bucket.list(f"{project}/{asset}/", recursive=False):
        if not entry.endswith("/"):
            continue
        version = entry[len(project) + len(asset) + 2 : -1]
        summary = state.bucket.read_json(summary_key(project, asset, version))
        if not summary or summary.get("on_probation") or "upload_finish" not in summary:
            continue
        finished = parse_iso(summary["upload_finish"]) or 0.0
        if best is None or finished > best[0]:
            best = (finished, version)
    if best is None:
        state.bucket.delete(latest_key(project, asset))
        return None
    state.bucket.write_json(latest_key(project, asset), {"version": best[1]})
    return best[1]


def _give_back(state: GypsumState, project: str, freed: int) -> None:
    usage = state.bucket.read_json(usage_key(project))
    if usage is not None:
        usage["total"] = max(0, int(usage.get("total", 0)) - freed)
        state.bucket.write_json(usage_key(project), usage)


def _require_unlocked(state: GypsumState, project: str) -> None:
    if state.bucket.exists(lock_key(project)):
        raise GypsumError("project asset has already been locked", 403)


def _probational_summary(state: GypsumState, project: str, asset: str, version: str, what: str) -> dict[str, Any]:
    summary = state.bucket.read_json(summary_key(project, asset, version))
    if summary is None:
        raise GypsumError("version does not exist", 400)
    if not summary.get("on_probation"):
        raise GypsumError(f"cannot {what} probation for non-probational version", 400)
    return summary  # type: ignore[no-any-return]


async def create(request: web.Request) -> web.Response:
    state = state_of(request)
    (project,) = raw_params(request, 1, 1)
    check_names(project=project)
    check_admin(state, user_of(request))
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("permissions"), dict):
        raise GypsumError("expected a 'permissions' object in the request body", 400)
    perms = body["permissions"]
    validate_permissions(perms)
    quota = default_quota(state)
    if "quota" in body:
        validate_quota(body["quota"])
        quota.update(body["quota"])
    async with state.project_lock(project):
        if state.bucket.exists(permissions_key(project)):
            raise GypsumError(f"project '{project}' already exists", 400)
        state.bucket.write_json(permissions_key(project), {
            "owners": list(perms.get("owners", [])), "uploaders": list(perms.get("uploaders", [])),
        })
        state.bucket.write_json(quota_key(project), quota)
        state.bucket.write_json(usage_key(project), {"total": 0})
    return ok()


async def set_permissions(request: web.Request) -> web.Response:
    state = state_of(request)
    (project,) = raw_params(request, 1, 1)
    ident = user_of(request)
    body = await json_body(request)
    validate_permissions(body)
    async with state.project_lock(project):
        perms = check_owner(state, project, ident)
        for field in ("owners", "uploaders"):
            if field in body:
                perms[field] = body[field]
        state.bucket.write_json(permissions_key(project), perms)
    return ok()


async def set_quota(request: web.Request) -> web.Response:
    state = state_of(request)
    (project,) = raw_params(request, 1, 1)
    check_admin(state, user_of(request))
    body = await json_body(request)
    validate_quota(body)
    async with state.project_lock(project):
        quota = state.bucket.read_json(quota_key(project))
        if quota is None:
            raise GypsumError(f"project '{project}' does not exist", 404)
        quota.update({k: body[k] for k in ("baseline", "growth_rate", "year") if k in body})
        state.bucket.write_json(quota_key(project), quota)
    return ok()


async def approve(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset, version = raw_params(request, 2, 3)
    ident = user_of(request)
    async with state.project_lock(project):
        check_owner(state, project, ident)
        _require_unlocked(state, project)
        summary = _probational_summary(state, project, asset, version, "approve")
        del summary["on_probation"]
        state.bucket.write_json(summary_key(project, asset, version), summary)
        latest = state.bucket.read_json(latest_key(project, asset))
        is_latest = True
        if latest is not None:
            current = state.bucket.read_json(summary_key(project, asset, latest["version"])) or {}
            mine = parse_iso(summary.get("upload_finish", "")) or 0.0
            is_latest = mine > (parse_iso(current.get("upload_finish", "")) or 0.0)
        if is_latest:
            state.bucket.write_json(latest_key(project, asset), {"version": version})
    return ok()


async def reject(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset, version = raw_params(request, 2, 3)
    ident = user_of(request)
    async with state.project_lock(project):
        can_manage, _ = check_uploader(state, project, asset, version, ident)
        _require_unlocked(state, project)
        summary = _probational_summary(state, project, asset, version, "reject")
        if not can_manage and summary.get("upload_user_id") != ident.login:
            raise GypsumError("cannot reject probation for different user", 400)
        freed = state.bucket.delete_prefix(f"{project}/{asset}/{version}/")
        _give_back(state, project, freed)
    return ok()


async def refresh_latest_route(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset = raw_params(request, 2, 2)
    check_admin(state, user_of(request))
    async with state.project_lock(project):
        version = refresh_latest(state, project, asset)
    return ok({"version": version} if version is not None else {})


async def refresh_usage(request: web.Request) -> web.Response:
    state = state_of(request)
    (project,) = raw_params(request, 2, 1)
    check_admin(state, user_of(request))
    async with state.project_lock(project):
        if not state.bucket.exists(permissions_key(project)):
            raise GypsumError(f"project '{project}' does not exist", 404)
        total = state.bucket.usage(project)
        state.bucket.write_json(usage_key(project), {"total": total})
    return ok({"total": total})


async def remove(request: web.Request) -> web.Response:
    state = state_of(request)
    names = raw_params(request, 1)
    if not 1 <= len(names) <= 3:
        raise GypsumError("expected /remove/{project}[/{asset}[/{version}]]", 404)
    check_names(**dict(zip(("project", "asset", "version"), names)))
    check_admin(state, user_of(request))
    project = names[0]
    async with state.project_lock(project):
        freed = state.bucket.delete_prefix("/".join(names) + "/")
        if len(names) > 1:
            _give_back(state, project, freed)
        if len(names) == 3:
            latest = state.bucket.read_json(latest_key(project, names[1]))
            if latest is not None and latest.get("version") == names[2]:
                refresh_latest(state, project, names[1])
    return ok()


async def unlock(request: web.Request) -> web.Response:
    state = state_of(request)
    (project,) = raw_params(request, 1, 1)
    check_admin(state, user_of(request))
    async with state.project_lock(project):
        state.bucket.delete(lock_key(project))
    return ok()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/create/{project}", create)
    app.router.add_put("/permissions/{project}", set_permissions)
    app.router.add_put("/quota/{project}", set_quota)
    app.router.add_post("/probation/approve/{project}/{asset}/{version}", approve)
    app.router.add_post("/probation/reject/{project}/{asset}/{version}", reject)
    app.router.add_post("/refresh/latest/{project}/{asset}", refresh_latest_route)
    app.router.add_post("/refresh/usage/{project}", refresh_usage)
    app.router.add_delete("/remove/{names:.+}", remove)
    app.router.add_delete("/unlock/{project}", unlock)
