"""Upload routes of the gypsum simulator: start, presigned-file, complete, abort.

``POST /upload/start/{p}/{a}/{v}`` (GitHub bearer), in this order, each failure answering before anything
is written: names (400); JSON body with an optional boolean ``on_probation`` (400); identity (401);
upload permission (404 no project, 403); untrusted uploaders are forced onto probation; the project lock
(403 "project asset has already been locked"); the version must not exist (400 "project-asset-version
already exists"); the ``files`` entries (400: see :func:`split_files`); ``dedup`` entries matching a file
of the asset's latest version by md5 and size become links; links are checked (target manifest present,
target finished and not on probation, path present, not the version itself); the quota (400 "upload
exceeds the storage quota for this project"). Only then are the lock, ``..summary`` and ``..manifest``
written. A refused start deletes nothing: the real server's cleanup also deleted an existing version when
the start was refused as a duplicate; the simulator does not copy that bug.

The lock object ``{p}/..LOCK`` records ``session_sha256`` (the token's SHA-256, never the token), the asset,
version, user and time, and ``pending`` (bytes of simple files, added to ``..usage`` on completion).

Presigned-file, complete and abort take the session token as bearer and check it against the lock
(403 "project has not been previously locked for upload", "... by a different user", "... of a different
asset/version").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from asyncdepo.sim import gypsum_s3
from asyncdepo.sim.gypsum_auth import check_uploader, quota_limit, user_of
from asyncdepo.sim.gypsum_core import (
    GypsumError,
    GypsumState,
    bearer_token,
    check_names,
    json_body,
    ok,
    raw_params,
    state_of,
)
from asyncdepo.sim.gypsum_store import (
    iso_now,
    latest_key,
    links_key,
    lock_key,
    manifest_key,
    summary_key,
    usage_key,
)


def check_path(path: Any) -> str:
    """A file path inside a version: non-empty; no leading/trailing '/', '//', '\\'; no component
    starting with '..'.

    :raises GypsumError: 400.
    """
    if not isinstance(path, str) or not path:
        raise GypsumError("'files.path' should be a non-empty string", 400)
    if path.startswith("/") or path.endswith("/") or "//" in path or "\\" in path:
        raise GypsumError(f"'files.path' cannot have leading/trailing/repeated '/' or '\\' ('{path}')", 400)
    if any(part.startswith("..") for part in path.split("/")):
        raise GypsumError(f"components of 'files.path' cannot start with '..' ('{path}')", 400)
    if any(part == "." for part in path.split("/")):
        raise GypsumError(f"components of 'files.path' cannot be '.' ('{path}')", 400)
    return path


def split_files(files: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Validate the ``files`` array and split it into (simple, dedup, link) entries.

    :raises GypsumError: 400 describing the first invalid entry.
    """
    if not isinstance(files, list):
        raise GypsumError("expected the 'files' property to be an array", 400)
    simple: list[dict[str, Any]] = []
    dedup: list[dict[str, Any]] = []
    linked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for f in files:
        if not isinstance(f, dict):
            raise GypsumError("'files' should be an array of objects", 400)
        path = check_path(f.get("path"))
        if path in seen:
            raise GypsumError(f"duplicated value '{path}' in 'files.path'", 400)
        seen.add(path)
        kind = f.get("type")
        if kind in ("simple", "dedup"):
            md5 = f.get("md5sum")
            if not isinstance(md5, str) or len(md5) != 32 or any(c not in "0123456789abcdefABCDEF" for c in md5):
                raise GypsumError("'files.md5sum' should be a hex-encoded MD5 string", 400)
            size = f.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise GypsumError("'files.size' should be a non-negative integer", 400)
            entry = {"path": path, "md5sum": md5.lower(), "size": size}
            (simple if kind == "simple" else dedup).append(entry)
        elif kind == "link":
            target = f.get("link")
            if not isinstance(target, dict):
                raise GypsumError("'files.link' should be an object", 400)
            for field in ("project", "asset", "version", "path"):
                if not isinstance(target.get(field), str):
                    raise GypsumError(f"'files.link.{field}' should be a string", 400)
            linked.append({"path": path, "link": {k: target[k] for k in ("project", "asset", "version", "path")}})
        else:
            raise GypsumError("invalid 'files.type'", 400)
    _check_file_dir_clash(seen)
    return simple, dedup, linked


def _check_file_dir_clash(paths: set[str]) -> None:
    dirs = {p[: i] for p in paths for i in range(len(p)) if p[i] == "/"}
    clash = sorted(paths & dirs)
    if clash:
        raise GypsumError(f"'{clash[0]}' is both a file and a directory in 'files.path'", 400)


def _dedup(state: GypsumState, project: str, asset: str, simple: list[dict[str, Any]],
           dedup: list[dict[str, Any]], linked: list[dict[str, Any]]) -> None:
    latest = state.bucket.read_json(latest_key(project, asset))
    manifest = state.bucket.read_json(manifest_key(project, asset, latest["version"])) if latest else None
    if not manifest:
        simple.extend(dedup)
        return
    by_digest = {f"{v['md5sum']}_{v['size']}": k for k, v in manifest.items()}
    for f in dedup:
        hit = by_digest.get(f"{f['md5sum']}_{f['size']}")
        if hit is None:
            simple.append(f)
        else:
            link = {"project": project, "asset": asset, "version": latest["version"], "path": hit}
            linked.append({"path": f["path"], "link": link})


def _check_links(state: GypsumState, project: str, asset: str, version: str,
                 linked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Manifest entries for the links, with ``ancestor`` when the target is itself a link."""
    manifests: dict[str, dict[str, Any]] = {}
    out = []
    for f in linked:
        t = f["link"]
        where = f"{t['project']}/{t['asset']}/{t['version']}"
        if (t["project"], t["asset"], t["version"]) == (project, asset, version):
            raise GypsumError(f"detected circular link from '{f['path']}' to '{where}/{t['path']}'", 400)
        if where not in manifests:
            manifest = state.bucket.read_json(manifest_key(t["project"], t["asset"], t["version"]))
            summary = state.bucket.read_json(summary_key(t["project"], t["asset"], t["version"]))
            if manifest is None or summary is None:
                raise GypsumError(f"no manifest available for link target inside '{where}'", 400)
            if "upload_finish" not in summary:
                raise GypsumError(f"cannot link to an unfinished upload in '{where}'", 400)
            if summary.get("on_probation"):
                raise GypsumError(f"cannot link to a probational version in '{where}'", 400)
            manifests[where] = manifest
        details = manifests[where].get(t["path"])
        if details is None:
            raise GypsumError(f"failed to link from '{f['path']}' to '{where}/{t['path']}'", 400)
        link = dict(t)
        if "link" in details:
            parent = details["link"]
            link["ancestor"] = parent.get("ancestor") or {k: parent[k] for k in ("project", "asset", "version", "path")}
        out.append({"path": f["path"], "size": details["size"], "md5sum": details["md5sum"], "link": link})
    return out


def _encode_slug(parts: list[str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode()


def _decode_slug(slug: str) -> list[str]:
    try:
        raw = unquote(slug).replace("+", "-").replace("/", "_")
        parts = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as exc:
        raise GypsumError(f"invalid slug for the presigned URL endpoint; {exc}", 400) from None
    if not isinstance(parts, list) or len(parts) != 5 or not all(isinstance(p, str) for p in parts):
        raise GypsumError("invalid slug for the presigned URL endpoint", 400)
    return parts


def check_lock(state: GypsumState, project: str, asset: str, version: str, session: str) -> dict[str, Any]:
    """The lock, when ``session`` holds it for ``asset``/``version``.

    :raises GypsumError: 403 otherwise.
    """
    lock = state.bucket.read_json(lock_key(project))
    if lock is None:
        raise GypsumError("project has not been previously locked for upload", 403)
    if lock.get("session_sha256") != hashlib.sha256(session.encode()).hexdigest():
        raise GypsumError("project was locked for upload by a different user", 403)
    if lock.get("asset") != asset:
        raise GypsumError("project was locked for upload of a different asset", 403)
    if lock.get("version") != version:
        raise GypsumError("project was locked for upload of a different version", 403)
    return lock  # type: ignore[no-any-return]


async def start(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset, version = raw_params(request, 2, 3)
    check_names(project=project, asset=asset, version=version)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise GypsumError("expected request body to be a JSON object", 400)
    probation = body.get("on_probation", False)
    if not isinstance(probation, bool):
        raise GypsumError("expected the 'on_probation' property to be a boolean", 400)
    ident = user_of(request)
    bucket = state.bucket
    async with state.project_lock(project):
        _, trusted = check_uploader(state, project, asset, version, ident)
        probation = probation or not trusted
        if bucket.exists(lock_key(project)):
            raise GypsumError("project asset has already been locked", 403)
        if bucket.exists(summary_key(project, asset, version)):
            raise GypsumError("project-asset-version already exists", 400)
        simple, dedup, linked = split_files(body.get("files"))
        if dedup:
            _dedup(state, project, asset, simple, dedup, linked)
        link_details = _check_links(state, project, asset, version, linked)
        pending = sum(f["size"] for f in simple)
        usage = (bucket.read_json(usage_key(project)) or {}).get("total", 0)
        if usage + pending >= quota_limit(state, project):
            raise GypsumError("upload exceeds the storage quota for this project", 400)

        session = str(uuid.uuid4())
        now = state.now()
        bucket.write_json(lock_key(project), {
            "session_sha256": hashlib.sha256(session.encode()).hexdigest(),
            "asset": asset, "version": version, "user_id": ident.login,
            "locked_at": iso_now(now), "pending": pending,
        })
        bucket.write_json(summary_key(project, asset, version), {
            "upload_user_id": ident.login, "upload_start": iso_now(now), "on_probation": probation,
        })
        manifest: dict[str, Any] = {f["path"]: {"size": f["size"], "md5sum": f["md5sum"]} for f in simple}
        for link in link_details:
            manifest[link["path"]] = {"size": link["size"], "md5sum": link["md5sum"], "link": link["link"]}
        bucket.write_json(manifest_key(project, asset, version), manifest)
    state.counters["starts"] += 1
    file_urls = [
        {"path": f["path"], "method": "presigned",
         "url": "/upload/presigned-file/" + _encode_slug([project, asset, version, f["path"], f["md5sum"]])}
        for f in simple
    ]
    return ok({
        "file_urls": file_urls,
        "complete_url": f"/upload/complete/{project}/{asset}/{version}",
        "abort_url": f"/upload/abort/{project}/{asset}/{version}",
        "session_token": session,
    })


async def presigned_file(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset, version, path, md5 = _decode_slug(request.raw_path.split("?", 1)[0].split("/", 3)[3])
    session = bearer_token(request)
    check_lock(state, project, asset, version, session)
    manifest = state.bucket.read_json_cached(manifest_key(project, asset, version)) or {}
    entry = manifest.get(path)
    if entry is None or "link" in entry or entry.get("md5sum") != md5:
        raise GypsumError(f"'{path}' is not a file to upload in this session", 400)
    try:
        md5b64 = gypsum_s3.md5_hex_to_base64(md5)
    except ValueError:
        raise GypsumError("invalid md5sum in the presigned URL slug", 400) from None
    origin = f"{request.scheme}://{request.host}"
    url = gypsum_s3.presign(state, origin, f"{project}/{asset}/{version}/{path}", md5b64)
    return ok({"url": url, "md5sum_base64": md5b64})


async def complete(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset, version = raw_params(request, 2, 3)
    session = bearer_token(request)
    bucket = state.bucket
    async with state.project_lock(project):
        lock = check_lock(state, project, asset, version, session)
        manifest = bucket.read_json(manifest_key(project, asset, version)) or {}
        prefix = f"{project}/{asset}/{version}/"
        listing = {key[len(prefix):]: size for key, size in bucket.walk(prefix)}
        linkable: dict[str, dict[str, Any]] = {}
        for path, entry in manifest.items():
            found = listing.get(path)
            if "link" in entry:
                if found is not None:
                    raise GypsumError(f"linked-from path '{path}' in manifest should not have a file", 400)
                hostdir, _, name = path.rpartition("/")
                linkable.setdefault(f"{hostdir}/" if hostdir else "", {})[name] = entry["link"]
            elif found is None:
                raise GypsumError(f"path '{path}' in manifest should have a file", 400)
            elif found != entry["size"]:
                raise GypsumError(f"actual size of '{path}' does not match its reported size in the manifest", 400)
        for hostdir, links in linkable.items():
            bucket.write_json(links_key(project, asset, version, hostdir), links)
        summary = bucket.read_json(summary_key(project, asset, version)) or {}
        summary["upload_finish"] = iso_now(state.now())
        if not summary.get("on_probation"):
            summary.pop("on_probation", None)
            bucket.write_json(latest_key(project, asset), {"version": version})
        bucket.write_json(summary_key(project, asset, version), summary)
        usage = bucket.read_json(usage_key(project)) or {"total": 0}
        usage["total"] = usage.get("total", 0) + int(lock.get("pending", 0))
        bucket.write_json(usage_key(project), usage)
        bucket.delete(lock_key(project))
    state.counters["completes"] += 1
    return ok()


async def abort(request: web.Request) -> web.Response:
    state = state_of(request)
    project, asset, version = raw_params(request, 2, 3)
    session = bearer_token(request)
    async with state.project_lock(project):
        check_lock(state, project, asset, version, session)
        # The lock proves this session created the version, so everything under it is this upload's.
        state.bucket.delete_prefix(f"{project}/{asset}/{version}/")
        state.bucket.delete(lock_key(project))
    state.counters["aborts"] += 1
    return ok()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/upload/start/{project}/{asset}/{version}", start)
    app.router.add_post("/upload/presigned-file/{slug:[\\s\\S]+}", presigned_file)
    app.router.add_post("/upload/complete/{project}/{asset}/{version}", complete)
    app.router.add_post("/upload/abort/{project}/{asset}/{version}", abort)
    gypsum_s3.add_routes(app)
