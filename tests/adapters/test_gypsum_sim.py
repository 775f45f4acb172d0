"""Fidelity of the gypsum simulator (asyncdepo.sim.gypsum) over real loopback HTTP, request by request."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from asyncdepo.sim import gypsum as gsim
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.server import SimServer
from tests.adapters.contract_suite import AdapterContract, Harness, tree_of

ADMIN, OWNER, UPLOADER, TRUSTED, STRANGER = "tok-admin", "tok-owner", "tok-up", "tok-trusted", "tok-stranger"
PUT_ROUTE = "PUT /s3/{key}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = gsim.create_app(
        tmp_path / "sim",
        FaultInjector(),
        identities={ADMIN: "root", OWNER: "olivia", UPLOADER: "ursula:lab", TRUSTED: "tim", STRANGER: "sam"},
        admins=["root"],
    )
    async with SimServer(app) as server:
        yield server


def bucket(sim: SimServer) -> Path:
    """The simulator's bucket directory (objects as files)."""
    return sim.app[gsim.STATE_KEY].bucket.root


async def call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
               body: Any = None, status: int = 200) -> Any:
    async with http.request(method, url, headers=bearer(token) if token else {},
                            json=body if body is not None else None) as r:
        text = await r.text()
        assert r.status == status, f"{method} {url}: {r.status} {text}"
        if r.status >= 400 and r.content_type == "application/json":
            data = json.loads(text)
            assert data["status"] == "error" and data["reason"]
            return data
        return json.loads(text) if text and r.content_type == "application/json" else text


async def create_project(http: aiohttp.ClientSession, sim: SimServer, project: str = "proj", **quota: int) -> None:
    body: dict[str, Any] = {"permissions": {"owners": ["olivia"], "uploaders": [
        {"id": "lab"}, {"id": "tim", "trusted": True}]}}
    if quota:
        body["quota"] = quota
    await call(http, "POST", f"{sim.url}/create/{project}", ADMIN, body)


async def get_json(http: aiohttp.ClientSession, sim: SimServer, key: str, status: int = 200) -> Any:
    return await call(http, "GET", f"{sim.url}/file/{quote(key, safe='')}", status=status)


async def put(http: aiohttp.ClientSession, url: str, data: bytes, md5b64: str | None) -> aiohttp.ClientResponse:
    headers = {"Content-MD5": md5b64} if md5b64 is not None else {}
    async with http.put(url, data=data, headers=headers) as r:
        await r.read()
        return r


async def upload(http: aiohttp.ClientSession, sim: SimServer, version: str, files: dict[str, bytes], *,
                 token: str = OWNER, asset: str = "asset", project: str = "proj", kind: str = "simple",
                 extra: list[dict[str, Any]] | None = None, probation: bool = False,
                 complete: bool = True, send: bool = True) -> dict[str, Any]:
    entries = [{"type": kind, "path": p, "md5sum": md5(d), "size": len(d)} for p, d in files.items()]
    init = await call(http, "POST", f"{sim.url}/upload/start/{project}/{asset}/{version}", token,
                      {"files": entries + (extra or []), "on_probation": probation})
    for info in init["file_urls"] if send else []:
        pre = await call(http, "POST", sim.url + info["url"], init["session_token"])
        r = await put(http, pre["url"], files[info["path"]], pre["md5sum_base64"])
        assert r.status == 200 and r.headers["ETag"] == f'"{md5(files[info["path"]])}"'
    if complete:
        await call(http, "POST", sim.url + init["complete_url"], init["session_token"])
    return init  # type: ignore[no-any-return]


async def test_full_upload_writes_the_bucket_layout(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    files = {"a.txt": b"hello", "dir/b.bin": b"\x00" * 1000, "dir/deeper/c": b""}
    init = await upload(http, sim, "v1", files)
    assert init["complete_url"] == "/upload/complete/proj/asset/v1"
    root = bucket(sim)
    for rel, data in files.items():
        assert (root / "proj/asset/v1" / rel).read_bytes() == data
    manifest = await get_json(http, sim, "proj/asset/v1/..manifest")
    assert manifest == {p: {"size": len(d), "md5sum": md5(d)} for p, d in files.items()}
    summary = await get_json(http, sim, "proj/asset/v1/..summary")
    assert summary["upload_user_id"] == "olivia" and "on_probation" not in summary
    assert summary["upload_finish"].endswith("Z") and summary["upload_start"] <= summary["upload_finish"]
    assert await get_json(http, sim, "proj/asset/..latest") == {"version": "v1"}
    assert await get_json(http, sim, "proj/..usage") == {"total": 1005}
    assert not (root / "proj/..LOCK").exists()
    assert (await get_json(http, sim, "proj/..quota"))["baseline"] == 10 * 10**9


async def test_put_checks_digest_signature_and_expiry(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    data = b"payload" * 100
    init = await upload(http, sim, "v1", {"f": data}, complete=False, send=False)
    pre = await call(http, "POST", sim.url + init["file_urls"][0]["url"], init["session_token"])
    assert pre["md5sum_base64"] == base64.b64encode(hashlib.md5(data).digest()).decode()
    target = bucket(sim) / "proj/asset/v1/f"
    r = await put(http, pre["url"], data[:-1] + b"X", pre["md5sum_base64"])
    assert r.status == 400 and not target.exists()
    async with http.put(pre["url"], data=data + b"!", headers={"Content-MD5": pre["md5sum_base64"]}) as resp:
        assert resp.status == 400 and "BadDigest" in await resp.text()
    r = await put(http, pre["url"], data, None)
    assert r.status == 403
    r = await put(http, pre["url"].replace("X-Signature=", "X-Signature=0"), data, pre["md5sum_base64"])
    assert r.status == 403
    await call(http, "POST", f"{sim.url}/_sim/gypsum/expire-next", body={"count": 1})
    expired = await call(http, "POST", sim.url + init["file_urls"][0]["url"], init["session_token"])
    async with http.put(expired["url"], data=data, headers={"Content-MD5": expired["md5sum_base64"]}) as resp:
        assert resp.status == 403 and "expired" in (await resp.text()).lower()
    assert not target.exists()
    # completing now fails: the file is missing
    reason = await call(http, "POST", sim.url + init["complete_url"], init["session_token"], status=400)
    assert "should have a file" in reason["reason"]
    r = await put(http, pre["url"], data, pre["md5sum_base64"])
    assert r.status == 200 and target.read_bytes() == data
    await call(http, "POST", sim.url + init["complete_url"], init["session_token"])
    stats = await call(http, "GET", f"{sim.url}/_sim/gypsum/stats")
    assert stats["bad_digest"] == 2 and stats["expired_puts"] == 1 and stats["puts_ok"] == 1


async def test_presign_lifetime_and_clock(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    app = gsim.create_app(tmp_path, identities={OWNER: "olivia", ADMIN: "root"}, admins=["root"],
                          presign_lifetime=60)
    async with SimServer(app) as s:
        await create_project(http, s)
        init = await upload(http, s, "v1", {"f": b"x"}, complete=False, send=False)
        pre = await call(http, "POST", s.url + init["file_urls"][0]["url"], init["session_token"])
        await call(http, "POST", f"{s.url}/_sim/gypsum/clock", body={"advance": 61})
        r = await put(http, pre["url"], b"x", pre["md5sum_base64"])
        assert r.status == 403


async def test_broken_put_stores_nothing(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    init = await upload(http, sim, "v1", {"f": b"z" * 300_000}, complete=False, send=False)
    pre = await call(http, "POST", sim.url + init["file_urls"][0]["url"], init["session_token"])
    # aiohttp retries an idempotent request once on a dropped connection: drop both attempts
    sim.faults.add(FaultRule("drop", method="PUT", path="/s3/*", after=100_000, first=2))
    with pytest.raises(aiohttp.ClientError):
        await put(http, pre["url"], b"z" * 300_000, pre["md5sum_base64"])
    assert not (bucket(sim) / "proj/asset/v1/f").exists()
    assert not list((bucket(sim).parent / "tmp").iterdir())
    assert sim.faults.bytes_in[PUT_ROUTE] == 200_000


async def test_lock_abort_and_unlock(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    init = await upload(http, sim, "v1", {"f": b"abc"}, complete=False)
    lock = await get_json(http, sim, "proj/..LOCK")
    assert lock["asset"] == "asset" and lock["version"] == "v1" and lock["user_id"] == "olivia"
    assert init["session_token"] not in json.dumps(lock)
    err = await call(http, "POST", f"{sim.url}/upload/start/proj/other/v9", TRUSTED, {"files": []}, status=403)
    assert err["reason"] == "project asset has already been locked"
    # the session token is needed, a GitHub token is not enough
    await call(http, "POST", sim.url + init["abort_url"], OWNER, status=403)
    await call(http, "POST", sim.url + init["abort_url"], init["session_token"])
    assert not (bucket(sim) / "proj/asset/v1").exists()
    assert not (bucket(sim) / "proj/..LOCK").exists()
    await call(http, "POST", sim.url + init["abort_url"], init["session_token"], status=403)
    # a stale lock is cleared by an admin only
    await upload(http, sim, "v2", {"f": b"abc"}, complete=False)
    await call(http, "DELETE", f"{sim.url}/unlock/proj", OWNER, status=403)
    await call(http, "DELETE", f"{sim.url}/unlock/proj", ADMIN)
    await upload(http, sim, "v3", {"f": b"abc"})


async def test_duplicate_start_keeps_the_existing_version(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    await upload(http, sim, "v1", {"f": b"keep me"})
    err = await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v1", OWNER,
                     {"files": [{"type": "simple", "path": "g", "md5sum": md5(b"x"), "size": 1}]}, status=400)
    assert err["reason"] == "project-asset-version already exists"
    assert (bucket(sim) / "proj/asset/v1/f").read_bytes() == b"keep me"
    assert (await get_json(http, sim, "proj/asset/v1/..manifest")) == {"f": {"size": 7, "md5sum": md5(b"keep me")}}
    assert not (bucket(sim) / "proj/..LOCK").exists()


async def test_dedup_links_and_ancestors(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    await upload(http, sim, "v1", {"same.txt": b"same", "dir/also.txt": b"also", "old": b"old"})
    init = await upload(http, sim, "v2", {"same.txt": b"same", "x/also.txt": b"also", "new": b"new"}, kind="dedup")
    assert [f["path"] for f in init["file_urls"]] == ["new"]
    m2 = await get_json(http, sim, "proj/asset/v2/..manifest")
    assert m2["x/also.txt"]["link"] == {"project": "proj", "asset": "asset", "version": "v1", "path": "dir/also.txt"}
    assert m2["same.txt"]["link"]["version"] == "v1" and "link" not in m2["new"]
    assert await get_json(http, sim, "proj/asset/v2/x/..links") == {"also.txt": m2["x/also.txt"]["link"]}
    assert (await get_json(http, sim, "proj/asset/v2/..links"))["same.txt"]["path"] == "same.txt"
    await get_json(http, sim, "proj/asset/v2/same.txt", status=404)
    # dedup only saves the new bytes; usage counts stored bytes
    assert (await get_json(http, sim, "proj/..usage"))["total"] == 11 + 3
    # a link to a link records the final destination as the ancestor
    link = {"type": "link", "path": "y", "link": {"project": "proj", "asset": "asset", "version": "v2", "path": "same.txt"}}
    await upload(http, sim, "v3", {}, extra=[link])
    m3 = await get_json(http, sim, "proj/asset/v3/..manifest")
    assert m3["y"]["link"]["ancestor"] == {"project": "proj", "asset": "asset", "version": "v1", "path": "same.txt"}
    assert m3["y"]["md5sum"] == md5(b"same") and m3["y"]["size"] == 4
    # without "dedup" the same bytes are uploaded again
    init = await upload(http, sim, "v4", {"same.txt": b"same"})
    assert len(init["file_urls"]) == 1


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("proj/asset/v2/f", "circular"),
        ("proj/asset/nope/f", "no manifest"),
        ("proj/asset/v1/missing", "failed to link"),
        ("proj/asset/probe/f", "probational"),
        ("other/asset/open/f", "unfinished"),
    ],
)
async def test_link_checks(sim: SimServer, http: aiohttp.ClientSession, target: str, reason: str) -> None:
    await create_project(http, sim)
    await create_project(http, sim, "other")
    await upload(http, sim, "v1", {"f": b"1"})
    await upload(http, sim, "probe", {"f": b"2"}, probation=True)
    await upload(http, sim, "open", {"f": b"3"}, project="other", complete=False)
    project, asset, version, path = target.split("/")
    link = {"project": project, "asset": asset, "version": version, "path": path}
    err = await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v2", OWNER,
                     {"files": [{"type": "link", "path": "l", "link": link}]}, status=400)
    assert reason in err["reason"]
    assert not (bucket(sim) / "proj/asset/v2").exists()
    assert not (bucket(sim) / "proj/..LOCK").exists()


@pytest.mark.parametrize(
    "path", ["", "/a", "a/", "a//b", "a\\b", "..x", "a/..b", "a/./b"],
)
async def test_path_validation(sim: SimServer, http: aiohttp.ClientSession, path: str) -> None:
    await create_project(http, sim)
    await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v1", OWNER,
               {"files": [{"type": "simple", "path": path, "md5sum": md5(b""), "size": 0}]}, status=400)
    assert not (bucket(sim) / "proj/..LOCK").exists()


@pytest.mark.parametrize(
    "files",
    [
        [{"type": "simple", "path": "a", "md5sum": md5(b""), "size": 0}] * 2,
        [{"type": "simple", "path": "a", "md5sum": md5(b""), "size": 0},
         {"type": "simple", "path": "a/b", "md5sum": md5(b""), "size": 0}],
        [{"type": "simple", "path": "a", "md5sum": "xyz", "size": 0}],
        [{"type": "simple", "path": "a", "md5sum": md5(b""), "size": -1}],
        [{"type": "weird", "path": "a"}],
        [{"type": "link", "path": "a", "link": {"project": "p"}}],
        "not-a-list",
    ],
)
async def test_files_validation(sim: SimServer, http: aiohttp.ClientSession, files: Any) -> None:
    await create_project(http, sim)
    await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v1", OWNER, {"files": files}, status=400)


@pytest.mark.parametrize("name", ["..hidden", "a%2Fb", "a%5Cb"])
async def test_name_validation(sim: SimServer, http: aiohttp.ClientSession, name: str) -> None:
    await create_project(http, sim)
    async with http.post(f"{sim.url}/upload/start/proj/{name}/v1", headers=bearer(OWNER), json={"files": []}) as r:
        assert r.status == 400
    async with http.post(f"{sim.url}/upload/start/proj/asset/v1", headers=bearer(OWNER),
                         json={"files": [], "on_probation": "yes"}) as r:
        assert r.status == 400


async def test_quota_refused_before_anything_is_written(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim, baseline=1000, growth_rate=0)
    await upload(http, sim, "v1", {"f": b"x" * 600})
    err = await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v2", OWNER,
                     {"files": [{"type": "simple", "path": "g", "md5sum": md5(b"y" * 400), "size": 400}]}, status=400)
    assert err["reason"] == "upload exceeds the storage quota for this project"
    assert not (bucket(sim) / "proj/asset/v2").exists() and not (bucket(sim) / "proj/..LOCK").exists()
    # dedup hits cost no quota
    init = await upload(http, sim, "v2", {"g": b"x" * 600}, kind="dedup")
    assert init["file_urls"] == []
    await call(http, "PUT", f"{sim.url}/quota/proj", OWNER, {"baseline": 5000}, status=403)
    await call(http, "PUT", f"{sim.url}/quota/proj", ADMIN, {"baseline": 5000})
    await call(http, "PUT", f"{sim.url}/quota/proj", ADMIN, {"baseline": -1}, status=400)
    await upload(http, sim, "v3", {"g": b"y" * 400})


async def test_identities_and_permissions(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await call(http, "POST", f"{sim.url}/create/proj", OWNER, {"permissions": {"owners": ["olivia"]}}, status=403)
    await create_project(http, sim)
    await call(http, "POST", f"{sim.url}/create/proj", ADMIN, {"permissions": {"owners": ["olivia"]}}, status=400)
    files = {"files": []}
    await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v1", None, files, status=401)
    await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v1", "bogus", files, status=401)
    await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v1", STRANGER, files, status=403)
    await call(http, "POST", f"{sim.url}/upload/start/nope/asset/v1", OWNER, files, status=404)
    # "lab" organisation members may upload, untrusted: forced onto probation
    init = await upload(http, sim, "v1", {"f": b"1"}, token=UPLOADER)
    assert (await get_json(http, sim, "proj/asset/v1/..summary"))["on_probation"] is True
    await get_json(http, sim, "proj/asset/..latest", status=404)
    assert init["session_token"]
    # scoped and expiring uploader entries; the simulator looks past a non-matching entry
    perms = {"uploaders": [{"id": "sam", "asset": "other"}, {"id": "sam", "until": "2000-01-01T00:00:00Z"},
                           {"id": "sam", "asset": "asset", "version": "v2", "trusted": True}]}
    await call(http, "PUT", f"{sim.url}/permissions/proj", TRUSTED, perms, status=403)
    await call(http, "PUT", f"{sim.url}/permissions/proj", OWNER, {"uploaders": [{"id": 5}]}, status=400)
    await call(http, "PUT", f"{sim.url}/permissions/proj", OWNER, {"uploaders": [{"id": "x", "until": "soon"}]},
               status=400)
    await call(http, "PUT", f"{sim.url}/permissions/proj", OWNER, perms)
    assert (await get_json(http, sim, "proj/..permissions")) == {"owners": ["olivia"], **perms}
    await call(http, "POST", f"{sim.url}/upload/start/proj/asset/v3", STRANGER, files, status=403)
    await upload(http, sim, "v2", {"f": b"2"}, token=STRANGER)
    assert "on_probation" not in await get_json(http, sim, "proj/asset/v2/..summary")
    # GitHub stand-in
    assert await call(http, "GET", f"{sim.url}/user", UPLOADER) == {"login": "ursula", "type": "User"}
    assert await call(http, "GET", f"{sim.url}/user/orgs", UPLOADER) == [{"login": "lab"}]
    async with http.get(f"{sim.url}/user", headers=bearer("bogus")) as r:
        assert r.status == 401 and (await r.json())["message"] == "Bad credentials"


async def test_probation_approve_and_reject(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    await upload(http, sim, "v1", {"f": b"1"})
    await upload(http, sim, "v2", {"f": b"22"}, token=UPLOADER)
    assert await get_json(http, sim, "proj/asset/..latest") == {"version": "v1"}
    await call(http, "POST", f"{sim.url}/probation/approve/proj/asset/v2", UPLOADER, status=403)
    await call(http, "POST", f"{sim.url}/probation/approve/proj/asset/v2", OWNER)
    assert await get_json(http, sim, "proj/asset/..latest") == {"version": "v2"}
    assert "on_probation" not in await get_json(http, sim, "proj/asset/v2/..summary")
    await call(http, "POST", f"{sim.url}/probation/approve/proj/asset/v2", OWNER, status=400)
    await call(http, "POST", f"{sim.url}/probation/reject/proj/asset/v2", OWNER, status=400)
    # a trusted user may ask for probation; another uploader may not reject it, the owner may
    await upload(http, sim, "v3", {"f": b"333"}, token=TRUSTED, probation=True)
    await call(http, "POST", f"{sim.url}/probation/reject/proj/asset/v3", UPLOADER, status=400)
    usage = (await get_json(http, sim, "proj/..usage"))["total"]
    await call(http, "POST", f"{sim.url}/probation/reject/proj/asset/v3", OWNER)
    assert not (bucket(sim) / "proj/asset/v3").exists()
    assert (await get_json(http, sim, "proj/..usage"))["total"] == usage - 3
    await call(http, "POST", f"{sim.url}/probation/reject/proj/asset/v3", OWNER, status=400)
    # the uploader may reject their own probational upload
    await upload(http, sim, "v4", {"f": b"4"}, token=UPLOADER)
    await call(http, "POST", f"{sim.url}/probation/reject/proj/asset/v4", UPLOADER)
    assert await get_json(http, sim, "proj/asset/..latest") == {"version": "v2"}


async def test_file_reads_with_ranges(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    data = bytes(range(256)) * 40
    await upload(http, sim, "v1", {"d/a b+c.bin": data})
    url = f"{sim.url}/file/{quote('proj/asset/v1/d/a b+c.bin', safe='')}"
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == data
        assert r.headers["ETag"] == f'"{md5(data)}"' and r.headers["Content-Length"] == str(len(data))
        assert r.headers["Last-Modified"].endswith("GMT") and r.headers["Accept-Ranges"] == "bytes"
    # gypsum-client encodes with quote_plus (space -> '+', '+' -> %2B)
    async with http.get(f"{sim.url}/file/proj%2Fasset%2Fv1%2Fd%2Fa+b%2Bc.bin") as r:
        assert r.status == 200 and await r.read() == data
    n = len(data)
    for header, (start, end), status in [
        ("bytes=100-", (100, n), 206), ("bytes=0-9", (0, 10), 206), ("bytes=-5", (n - 5, n), 206),
        ("bytes=10-99999", (10, n), 206), ("bytes=1-2,5-6", (0, n), 200), ("junk", (0, n), 200),
    ]:
        async with http.get(url, headers={"Range": header}) as r:
            assert r.status == status and await r.read() == data[start:end], header
            if status == 206:
                assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{n}"
    async with http.get(url, headers={"Range": f"bytes={len(data)}-"}) as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    async with http.head(url) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(data)) and await r.read() == b""
    err = await get_json(http, sim, "proj/asset/v1/nothing", status=404)
    assert err == {"status": "error", "reason": "object not found"}
    await get_json(http, sim, "proj/asset/v1/d", status=404)
    # a drop fault on GET cuts the body
    sim.faults.add(FaultRule("drop", method="GET", path="/file/*", after=1000))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as r:
            await r.read()
    stats = await call(http, "GET", f"{sim.url}/_sim/gypsum/stats")
    assert stats["range_requests"] == 4


async def test_list(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    await upload(http, sim, "v1", {"a": b"1", "d/b": b"2", "d/e/c": b"3"})
    await create_project(http, sim, "proj2")
    lst = await call(http, "GET", f"{sim.url}/list")
    assert lst == ["proj/", "proj2/"]
    lst = await call(http, "GET", f"{sim.url}/list?prefix=proj%2Fasset%2Fv1%2F&recursive=false")
    assert lst == ["proj/asset/v1/..manifest", "proj/asset/v1/..summary", "proj/asset/v1/a", "proj/asset/v1/d/"]
    lst = await call(http, "GET", f"{sim.url}/list?prefix=proj%2Fasset%2Fv1%2Fd&recursive=true")
    assert lst == ["proj/asset/v1/d/b", "proj/asset/v1/d/e/c"]
    lst = await call(http, "GET", f"{sim.url}/list?prefix=proj%2F")
    assert lst == ["proj/..permissions", "proj/..quota", "proj/..usage", "proj/asset/"]
    assert await call(http, "GET", f"{sim.url}/list?prefix=nothing%2F") == []


async def test_refresh_and_remove(sim: SimServer, http: aiohttp.ClientSession) -> None:
    await create_project(http, sim)
    await upload(http, sim, "v1", {"f": b"1"})
    await upload(http, sim, "v2", {"f": b"22"})
    await upload(http, sim, "v3", {"f": b"333"}, probation=True)
    await call(http, "POST", f"{sim.url}/refresh/latest/proj/asset", OWNER, status=403)
    assert await call(http, "POST", f"{sim.url}/refresh/latest/proj/asset", ADMIN) == {"version": "v2"}
    (bucket(sim) / "proj/..usage").write_text('{"total": 999}')
    assert await call(http, "POST", f"{sim.url}/refresh/usage/proj", ADMIN) == {"total": 6}
    await call(http, "DELETE", f"{sim.url}/remove/proj/asset/v2", OWNER, status=403)
    await call(http, "DELETE", f"{sim.url}/remove/proj/asset/v2", ADMIN)
    assert await get_json(http, sim, "proj/asset/..latest") == {"version": "v1"}
    assert (await get_json(http, sim, "proj/..usage"))["total"] == 4
    await call(http, "DELETE", f"{sim.url}/remove/proj/asset", ADMIN)
    assert await call(http, "POST", f"{sim.url}/refresh/latest/proj/asset", ADMIN) == {}
    assert (await get_json(http, sim, "proj/..usage"))["total"] == 0
    await call(http, "DELETE", f"{sim.url}/remove/proj", ADMIN)
    assert await call(http, "GET", f"{sim.url}/list") == []


def test_identities_from_flags_and_file(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    gsim.add_arguments(parser)
    (tmp_path / "ids.json").write_text(json.dumps({"t1": {"login": "u1", "orgs": ["o1"]}, "t2": "u2"}))
    (tmp_path / "ids.txt").write_text("# comment\nt3=u3:o3,o4\n\n")
    args = parser.parse_args(["--identities", str(tmp_path / "ids.json"), "--identity", "t9=u9", "--admin", "o1",
                              "--presign-lifetime", "5", "--expire-first", "2"])
    cfg = gsim.config_from_args(tmp_path, args)
    assert cfg.identities["t1"] == gsim.Identity("u1", ("o1",)) and cfg.identities["t2"].login == "u2"
    assert cfg.identities["t9"].login == "u9" and cfg.admins == ("o1",)
    assert cfg.presign_lifetime == 5 and cfg.expire_first == 2
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert gsim.config_from_args(tmp_path, args).secret == cfg.secret
    args = parser.parse_args(["--identities", str(tmp_path / "ids.txt")])
    assert gsim.config_from_args(tmp_path, args).identities["t3"] == gsim.Identity("u3", ("o3", "o4"))
    with pytest.raises(ValueError):
        gsim.config_from_args(tmp_path, parser.parse_args(["--identity", "nouser"]))


class TestContract(AdapterContract):
    """The shared contract suite (tests/adapters/contract_suite.py) over the gypsum adapter, faults aimed at
    the presigned PUTs. A version is immutable: a changed file goes into another version, not tested here."""

    @pytest.fixture
    async def harness(self, sim: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> Harness:
        from asyncdepo.adapters.gypsum.adapter import GypsumAdapter

        await create_project(http, sim)
        bucket = sim.app[gsim.STATE_KEY].bucket.root

        def stored() -> dict[str, bytes]:
            found = tree_of(bucket / "proj/asset/v1") if (bucket / "proj/asset/v1").is_dir() else {}
            return {rel: data for rel, data in found.items() if not rel.split("/")[-1].startswith("..")}

        return Harness(lambda cfg: GypsumAdapter(sim.url, "proj", "asset", "v1", token=OWNER,
                                                 sessions=tmp_path / "sessions"),
                       stored, faults=sim.faults, data=("PUT", "/s3/*"), mutable=False)
