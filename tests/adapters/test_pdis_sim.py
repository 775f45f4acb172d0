"""Fidelity of the PDIS simulator against the spec (shared/archives/pdis.md), over real loopback HTTP."""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zstandard

from asyncdepo.engine.scheduler import push
from asyncdepo.sim import pdis
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.pdis_scan import code_in_name, image_family, sniff_kind
from asyncdepo.sim.pdis_store import MultipartError, MultipartParser, PartEnd, PartStart
from asyncdepo.sim.server import SimServer
from tests.adapters.contract_suite import AdapterContract, Harness

CBF = b"###CBF: VERSION 1.5\r\n# Detector: PILATUS 6M\r\n"
USERS = ["alice@lab.edu:alicepw", "bob@lab.edu:bobpw"]


def make_tar(files: dict[str, bytes], fmt: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{fmt}") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def frames(prefix: str = "1abc_lyso/", n: int = 3, suffix: str = ".cbf", head: bytes = CBF) -> dict[str, bytes]:
    return {f"{prefix}frame_{i:04d}{suffix}": head + bytes(range(256)) * (i + 1) for i in range(n)}


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


class Client:
    """A tiny PDIS client for the tests (the adapter has its own)."""

    def __init__(self, http: aiohttp.ClientSession, server: SimServer) -> None:
        self.http = http
        self.server = server
        self.base = server.url + "/api/v1/"
        self.headers: dict[str, str] = {}

    async def login(self, user: str) -> str:
        email, password = user.split(":")
        async with self.http.post(self.base + "auth/token/", data={"username": email, "password": password}) as r:
            assert r.status == 200
            token: str = (await r.json())["token"]
        self.headers = {"Authorization": f"Token {token}"}
        return token

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = kw.pop("headers", self.headers)
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            body = await r.read()
            return r.status, (await r.json() if body else None)

    async def upload(self, data: bytes, filename: str = "1abc.tar.zst", **fields: str) -> tuple[int, Any]:
        form = aiohttp.FormData()
        for key, value in fields.items():
            form.add_field(key, value)
        form.add_field("dataset_file", data, filename=filename, content_type="application/octet-stream")
        return await self.call("POST", "upload/", data=form)

    async def status(self, token: str) -> str:
        code, body = await self.call("GET", f"submissions/{token}/")
        assert code == 200, body
        return str(body["status"])


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = pdis.build_app(tmp_path / "root", FaultInjector(), argparse.Namespace(status_delay=0, user=USERS))
    async with SimServer(app) as server:
        yield server


@pytest.fixture
async def client(sim: SimServer) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http:
        c = Client(http, sim)
        await c.login(USERS[0])
        yield c


def state(server: SimServer) -> pdis.PdisState:
    return server.app[pdis.PDIS_STATE]


def stored(server: SimServer) -> list[Path]:
    return sorted(p for p in (state(server).root / "submissions").rglob("*") if p.name != "meta.json" and p.is_file())


# -- auth --------------------------------------------------------------------------------------------------
async def test_token_exchange(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as http:
        c = Client(http, sim)
        token = await c.login(USERS[0])
        assert len(token) == 40 and int(token, 16) >= 0
        assert await c.login(USERS[0]) == token  # tokens do not change
        code, body = await c.call("POST", "auth/token/", json={"username": "alice@lab.edu", "password": "alicepw"})
        assert code == 200 and body["token"] == token and body["email"] == "alice@lab.edu"
        assert isinstance(body["user_id"], int)
        code, body = await c.call("POST", "auth/token/", data={"username": "alice@lab.edu", "password": "nope"})
        assert code == 401 and "credentials" in body["error"]
        code, body = await c.call("POST", "auth/token/", data={"username": "alice@lab.edu"})
        assert code == 400 and body["error"].startswith("password")
    assert (state(sim).root / "tokens.json").stat().st_mode & 0o777 == 0o600


async def test_token_required_everywhere(client: Client) -> None:
    for method, path in [("GET", "submissions/"), ("GET", "equipment/"), ("GET", "submissions/x/")]:
        code, body = await client.call(method, path, headers={})
        assert code == 401 and "not provided" in body["error"]
        code, body = await client.call(method, path, headers={"Authorization": "Token " + "0" * 40})
        assert code == 401 and body["error"] == "Invalid token."
    form = aiohttp.FormData()
    form.add_field("dataset_file", zst(make_tar(frames())), filename="a.tar.zst")
    code, _ = await client.call("POST", "upload/", data=form, headers={})
    assert code == 401
    assert stored(client.server) == []


# -- upload ------------------------------------------------------------------------------------------------
async def test_upload_zstd_stores_inner_tar(client: Client) -> None:
    tar = make_tar(frames())
    code, body = await client.upload(zst(tar), filename="dataset.tar.zst")
    assert code == 201, body
    assert body["md5hash"] == hashlib.md5(tar).hexdigest()
    assert body["size"] == len(tar)
    assert body["filename"] == "dataset.tar"
    assert body["pdbid"] == "1ABC" and body["is_pdb_exists"] is False
    assert len(body["token"]) == 40
    [path] = stored(client.server)
    assert path.read_bytes() == tar and path.name == "dataset.tar"
    assert await client.status(body["token"]) == "uploaded"
    assert list((state(client.server).root / "incoming").iterdir()) == []


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.bz2", "zip", "tar.gz.zst", "zip.zst"])
async def test_accepted_formats(client: Client, kind: str) -> None:
    files = frames()
    if kind.startswith("zip"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        inner = buf.getvalue()
    else:
        inner = make_tar(files, "gz" if ".gz" in kind else "bz2" if ".bz2" in kind else "")
    body_bytes = zst(inner) if kind.endswith(".zst") else inner
    code, body = await client.upload(body_bytes, filename=f"x.{kind}")
    assert code == 201, body
    assert body["md5hash"] == hashlib.md5(inner).hexdigest() and body["size"] == len(inner)
    assert body["filename"] == "x." + kind.removesuffix(".zst")
    assert stored(client.server)[0].read_bytes() == inner


@pytest.mark.parametrize(
    "data, words",
    [
        (b"just some text, not an archive" * 40, "wrong file format"),
        (zst(b"just some text, not an archive" * 40), "wrong file format"),
        (zst(make_tar(frames()))[:-20], "truncated zstd"),
        (gzip.compress(b"not a tar inside" * 100), "not a readable"),
        (bz2.compress(b"x" * 10), "not a readable"),
        (b"", "empty"),
    ],
)
async def test_refused_files_store_nothing(client: Client, data: bytes, words: str) -> None:
    code, body = await client.upload(data, filename="bad.tar.zst")
    assert code == 400 and words in body["error"] and body["error"].startswith("dataset_file")
    assert stored(client.server) == [] and state(client.server).submissions == {}
    assert list((state(client.server).root / "incoming").iterdir()) == []


async def test_missing_file_field_and_bad_dataset_type(client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("dataset_type", "pdb")
    form.add_field("other", b"x", filename="x.bin")  # a file, but not dataset_file
    code, body = await client.call("POST", "upload/", data=form)
    assert code == 400 and body["error"].startswith("dataset_file")
    code, body = await client.upload(zst(make_tar(frames())), dataset_type="protein")
    assert code == 400 and body["error"].startswith("dataset_type")
    code, body = await client.call("POST", "upload/", data=b"raw", headers=dict(client.headers))
    assert code == 400 and "multipart" in body["error"]
    assert stored(client.server) == []


async def test_multi_frame_zstd(client: Client) -> None:
    tar = make_tar(frames(n=4))
    half = len(tar) // 2
    code, body = await client.upload(zst(tar[:half]) + zst(tar[half:]))
    assert code == 201 and body["md5hash"] == hashlib.md5(tar).hexdigest()


async def test_duplicate_hash_409_any_user(client: Client, sim: SimServer) -> None:
    data = zst(make_tar(frames()))
    assert (await client.upload(data))[0] == 201
    code, body = await client.upload(data)
    assert code == 409 and "Duplicate file hash" in body["error"]
    await client.login(USERS[1])
    assert (await client.upload(data))[0] == 409
    assert len(stored(sim)) == 1
    assert list((state(sim).root / "incoming").iterdir()) == []


async def test_pdb_detection_rules(client: Client) -> None:
    # header line in a text member wins over names
    files = {"run/README.txt": b"sample notes\nPDB_ID: 7XYZ\n", **frames(prefix="2abc/")}
    code, body = await client.upload(zst(make_tar(files)), filename="upload.tar.zst")
    assert body["pdbid"] == "7XYZ"
    # the uploaded file's name comes before member paths; frame numbers never match
    code, body = await client.upload(zst(make_tar(frames(prefix="4def/", n=2))), filename="dataset_3GHI.tar.zst")
    assert body["pdbid"] == "3GHI"
    code, body = await client.upload(zst(make_tar(frames(prefix="run_1234/", n=1))), filename="data.tar.zst")
    assert body["pdbid"] is None
    assert code_in_name("x/1abc_lysozyme/img_0001.cbf") == "1ABC" and code_in_name("frame_1234.cbf") is None
    # a second upload with a known PDB id says so
    code, body = await client.upload(zst(make_tar(frames(prefix="7xyz/", n=2))), filename="again.tar.zst")
    assert code == 201 and body["pdbid"] == "7XYZ" and body["is_pdb_exists"] is True


def test_image_rules() -> None:
    assert image_family("a/b/x_0001.cbf") == "cbf" and image_family("X.CBF.gz") == "cbf"
    assert image_family("lys_master.h5") == "h5" and image_family("lys_data_000001.h5") is None
    assert image_family("s.nxs") == "h5" and image_family("x.mar2300") == "mar"
    assert image_family("notes.txt") is None and image_family("x.mccd") == "mccd"
    assert sniff_kind(b"hello" * 100) is None


# -- submit, status, delete --------------------------------------------------------------------------------
async def _uploaded(client: Client, files: dict[str, bytes] | None = None, name: str = "d.tar.zst") -> str:
    code, body = await client.upload(zst(make_tar(files or frames())), filename=name)
    assert code == 201, body
    return str(body["token"])


@pytest.mark.parametrize(
    "fields, field",
    [
        ({}, "pdb_code"),
        ({"pdb_code": "12345"}, "pdb_code"),
        ({"pdb_code": "AB"}, "pdb_code"),
        ({"dataset_type": "other", "project_title": "short", "project_authors": "A.", "equipment_other": "x"},
         "project_title"),
        ({"dataset_type": "other", "project_title": "A long enough title", "equipment_other": "x"},
         "project_authors"),
        ({"dataset_type": "other", "project_title": "A long enough title", "project_authors": "A."},
         "equipment_other"),
        ({"pdb_code": "1ABC", "synchrotron_id": 25}, "beamline_id"),
        ({"pdb_code": "1ABC", "synchrotron_id": 99, "beamline_id": 1}, "synchrotron_id"),
        ({"pdb_code": "1ABC", "synchrotron_id": 25, "beamline_id": 17}, "beamline_id"),
        ({"pdb_code": "1ABC", "dataset_type": "weird"}, "dataset_type"),
    ],
)
async def test_submit_validation(client: Client, fields: dict[str, Any], field: str) -> None:
    token = await _uploaded(client)
    code, body = await client.call("POST", "submit/", json={"token": token, **fields})
    assert code == 400 and body["error"].startswith(field + ":"), body
    assert await client.status(token) == "uploaded"


async def test_submit_progression_and_conflicts(client: Client) -> None:
    token = await _uploaded(client)
    code, body = await client.call(
        "POST", "submit/", json={"token": token, "pdb_code": "1abc", "synchrotron_id": 25, "beamline_id": 42}
    )
    assert (code, body) == (200, {"status": "submitted", "token": token})
    code, body = await client.call("POST", "submit/", json={"token": token, "pdb_code": "1ABC"})
    assert code == 409 and "already processed" in body["error"]
    code, _ = await client.call("DELETE", f"submissions/{token}/")
    assert code == 409  # submitted is not deletable
    seen = [await client.status(token) for _ in range(4)]
    assert seen == ["pending", "validated", "published", "published"]
    code, body = await client.call("GET", f"submissions/{token}/")
    assert body["pdbid"] == "1ABC" and body["beamline"] == {"id": 42, "short": "24-ID-C"}
    assert body["synchrotron"] == {"id": 25, "short": "APS"} and body["md5hash"]
    code, _ = await client.call("DELETE", f"submissions/{token}/")
    assert code == 409  # published is not deletable


async def test_other_dataset_type_with_form_body(client: Client) -> None:
    token = await _uploaded(client, frames(prefix="run/"), name="data.tar.zst")
    form = {"token": token, "dataset_type": "other", "project_title": "Ten chars!", "project_authors": "Doe A.",
            "equipment_other": "home source"}
    code, body = await client.call("POST", "submit/", data=form)
    assert code == 200, body
    code, body = await client.call("GET", f"submissions/{token}/")
    assert body["dataset_type"] == "other" and body["pdbid"] is None and body["equipment_other"] == "home source"


@pytest.mark.parametrize(
    "files, verdict",
    [
        ({"notes/readme.md": b"nothing here", "data/x.bin": b"\0" * 100}, "error_no_data"),
        ({**frames(n=2), **frames(prefix="1abc_lyso/b/", suffix=".img", head=b"")}, "inconsistent_datasets"),
        (frames(head=b"garbage header"), "header_not_readable"),
    ],
)
async def test_error_verdicts(client: Client, files: dict[str, bytes], verdict: str) -> None:
    token = await _uploaded(client, files)
    assert (await client.call("POST", "submit/", json={"token": token, "pdb_code": "1ABC"}))[0] == 200
    assert [await client.status(token) for _ in range(3)] == ["pending", verdict, verdict]
    code, body = await client.call("GET", f"submissions/{token}/")
    assert body["status_details"]
    code, _ = await client.call("DELETE", f"submissions/{token}/")
    assert code == (204 if verdict == "error_no_data" else 409)


async def test_delete_uploaded_and_ownership(client: Client, sim: SimServer) -> None:
    token = await _uploaded(client)
    await client.login(USERS[1])
    for method, path in [("GET", f"submissions/{token}/"), ("DELETE", f"submissions/{token}/")]:
        code, body = await client.call(method, path)
        assert code == 403 and "permission" in body["error"]
    code, body = await client.call("POST", "submit/", json={"token": token, "pdb_code": "1ABC"})
    assert code == 403
    code, body = await client.call("GET", "submissions/")
    assert (code, body) == (200, [])
    await client.login(USERS[0])
    code, body = await client.call("GET", "submissions/nope/")
    assert code == 404 and "error" in body
    code, body = await client.call("POST", "submit/", json={"token": "f" * 40, "pdb_code": "1ABC"})
    assert code == 404
    code, _ = await client.call("DELETE", f"submissions/{token}/")
    assert code == 204 and stored(sim) == [] and not (state(sim).root / "submissions" / token).exists()


async def test_list_newest_first_and_equipment(client: Client) -> None:
    first = await _uploaded(client, frames(n=1))
    second = await _uploaded(client, frames(n=2))
    code, body = await client.call("GET", "submissions/")
    assert [s["token"] for s in body] == [second, first]
    assert set(body[0]) >= {"token", "original_filename", "md5hash", "pdbid", "status", "inserted", "updated"}
    code, body = await client.call("GET", "equipment/")
    assert code == 200
    aps = next(e for e in body if e["short"] == "APS")
    assert aps["id"] == 25 and {"id": 42, "short": "24-ID-C", "fullname": None, "url": None} in aps["beamlines"]


async def test_status_follows_the_clock(tmp_path: Path) -> None:
    now = [1_000.0]
    app = pdis.build_app(tmp_path, FaultInjector(), argparse.Namespace(status_delay=5.0, user=USERS),
                         clock=lambda: now[0])
    async with SimServer(app) as server, aiohttp.ClientSession() as http:
        c = Client(http, server)
        await c.login(USERS[0])
        token = await _uploaded(c)
        await c.call("POST", "submit/", json={"token": token, "pdb_code": "1ABC"})
        seen = []
        for _ in range(4):
            seen.append(await c.status(token))
            now[0] += 5.0
        assert seen == ["submitted", "pending", "validated", "published"]


async def test_manual_advance_and_restart(tmp_path: Path) -> None:
    args = argparse.Namespace(status_delay=-1, user=USERS)
    async with SimServer(pdis.build_app(tmp_path, FaultInjector(), args)) as server, aiohttp.ClientSession() as http:
        c = Client(http, server)
        api_token = await c.login(USERS[0])
        token = await _uploaded(c)
        await c.call("POST", "submit/", json={"token": token, "pdb_code": "1ABC"})
        assert await c.status(token) == "submitted"
        async with http.post(server.url + "/_sim/pdis/advance", json={"token": token, "steps": 2}) as r:
            assert (await r.json()) == {token: "validated"}
    # a new simulator on the same root knows the tokens and submissions
    async with SimServer(pdis.build_app(tmp_path, FaultInjector(), args)) as server, aiohttp.ClientSession() as http:
        c = Client(http, server)
        assert await c.login(USERS[0]) == api_token
        assert await c.status(token) == "validated"


# -- faults --------------------------------------------------------------------------------------------------
async def test_drop_mid_upload_stores_nothing(client: Client, sim: SimServer) -> None:
    tar = make_tar(frames(n=40))
    data = tar  # uncompressed, so the drop lands inside the file part
    sim.faults.add(FaultRule(kind="drop", method="POST", path="/api/v1/upload/", after=len(data) // 2))
    with pytest.raises(aiohttp.ClientError):
        await client.upload(data)
    assert stored(sim) == [] and state(sim).submissions == {}
    assert list((state(sim).root / "incoming").iterdir()) == []
    assert len(data) // 2 == sim.faults.total_bytes("POST /api/v1/upload/")
    code, body = await client.upload(data)  # the rule was for the first request only
    assert code == 201 and body["md5hash"] == hashlib.md5(tar).hexdigest()


async def test_injected_503_then_success(client: Client, sim: SimServer) -> None:
    sim.faults.add(FaultRule(kind="status", method="POST", path="/api/v1/upload/", status=503, retry_after=1))
    data = zst(make_tar(frames()))
    code, body = await client.upload(data)
    assert code == 503 and "error" in body
    assert stored(sim) == []
    assert (await client.upload(data))[0] == 201


async def test_lost_upload_response(client: Client, sim: SimServer) -> None:
    async with client.http.post(sim.url + "/_sim/pdis/lose-upload-responses", json={"count": 1}) as r:
        assert r.status == 200
    tar = make_tar(frames())
    with pytest.raises(aiohttp.ClientError):
        await client.upload(zst(tar))
    [path] = stored(sim)  # the data arrived even though the answer did not
    assert path.read_bytes() == tar
    code, body = await client.upload(zst(tar))
    assert code == 409
    code, body = await client.call("GET", "submissions/")
    assert [s["md5hash"] for s in body] == [hashlib.md5(tar).hexdigest()]


# -- multipart parser ------------------------------------------------------------------------------------------
def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b"preamble to ignore\r\n"
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


@pytest.mark.parametrize("step", [1, 3, 7, 64, 10_000])
def test_multipart_parser_any_split(step: int) -> None:
    boundary = "b0undary"
    payload = b"\r\n--b0undar\r\n-b0undary\r--b0undary" * 5 + bytes(range(256))  # near-delimiters
    body = _multipart(boundary, [("dataset_type", None, b"pdb"), ("dataset_file", "a b.tar", payload)])
    parser = MultipartParser(boundary)
    parts: list[tuple[str | None, str | None, bytes]] = []
    current: list[Any] = []
    for i in range(0, len(body), step):
        for ev in parser.feed(body[i : i + step]):
            if isinstance(ev, PartStart):
                current = [ev.name, ev.filename, b""]
            elif isinstance(ev, PartEnd):
                parts.append((current[0], current[1], current[2]))
            else:
                current[2] += ev
    parser.close()
    assert parts == [("dataset_type", None, b"pdb"), ("dataset_file", "a b.tar", payload)]


def test_multipart_parser_truncated() -> None:
    body = _multipart("xyz", [("dataset_file", "a", b"data" * 10)])
    parser = MultipartParser("xyz")
    parser.feed(body[:-20])
    with pytest.raises(MultipartError):
        parser.close()


class TestContract(AdapterContract):
    """The shared contract suite (tests/adapters/contract_suite.py) over the PDIS adapter: the whole source as
    one tar.zst; what the server stored is the tar of its newest submission."""

    @pytest.fixture
    async def harness(self, sim: SimServer) -> AsyncIterator[Harness]:
        from asyncdepo.adapters.pdis import Metadata, PdisAdapter, PdisClient

        state = sim.app[pdis.PDIS_STATE]

        def stored() -> dict[str, bytes]:
            subs = list(state.submissions.values())
            if not subs:
                return {}
            with tarfile.open(state.archive_path(subs[-1])) as tf:
                return {m.name.split("/", 1)[1]: tf.extractfile(m).read()  # type: ignore[union-attr]
                        for m in tf.getmembers() if m.isfile()}

        async with PdisClient(sim.url, state.token_for("alice@lab.edu")) as client:
            yield Harness(lambda cfg: PdisAdapter(client, Metadata(pdb_code="1ABC")), stored, faults=sim.faults,
                          data=("POST", "/api/v1/upload/"))


    async def test_a_rewrite_that_keeps_size_and_mtime_is_found_with_checksum(
            self, harness: Harness, files: dict[str, bytes], tmp_path: Path) -> None:
        """The pack's journal row holds the tree's listing (skipped when it is the same) and the tar's digests:
        with --checksum the tar is built again and compared, so a same-size rewrite with its mtime put back
        is sent again."""
        assert (await self.move(harness, tmp_path)).ok
        path = tmp_path / "src" / "d1" / "f1.bin"
        st = path.stat()
        path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        plain = await self.move(harness, tmp_path)  # size and mtime alone cannot tell: skipped, as rsync does
        assert plain.ok and plain.bytes_sent == 0 and self.landed(harness, tmp_path) == files
        cfg = self.cfg(harness).replace(checksum=True)
        again = await push(tmp_path / "src", harness.make(cfg), cfg, journal_path=tmp_path / "j")
        assert again.ok and again.bytes_sent > 0
        files["d1/f1.bin"] = path.read_bytes()
        assert self.landed(harness, tmp_path) == files
        unchanged = await push(tmp_path / "src", harness.make(cfg), cfg, journal_path=tmp_path / "j")
        assert unchanged.ok and unchanged.bytes_sent == 0
