"""The EMPIAR and Globus simulators over real loopback HTTP: shapes, auth, errors, upload areas, tasks."""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from asyncdepo import errors
from asyncdepo.adapters.empiar.adapter import EmpiarAdapter as EmpiarAdapterT
from asyncdepo.adapters.empiar.depositor import Credentials, EmpiarApi
from asyncdepo.adapters.empiar.schema import png_size
from asyncdepo.adapters.globus import GlobusClient, TaskProgress, TransferItem
from asyncdepo.config import EngineConfig
from asyncdepo.sim import empiar as empiar_sim
from asyncdepo.sim import globus as globus_sim
from asyncdepo.sim.datasets import make_png, sample_deposition
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.pacer import Pacer, RetryPolicy
from tests.adapters.contract_suite import AdapterContract, Harness, tree_of
from tests.fakeclock import FakeClock

API = "/empiar/deposition/api/"
TOKEN = {"Authorization": "Token sim-token"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
async def empiar(tmp_path: Path) -> AsyncIterator[SimServer]:
    app = empiar_sim.build_app(tmp_path / "store", FaultInjector(), None)
    async with SimServer(app) as server:
        yield server


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, str]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers["Content-Type"]


async def create(http: aiohttp.ClientSession, server: SimServer, *dirs: str) -> dict[str, Any]:
    status, body, ctype = await call(http, "POST", server.url + API + "deposit_entry/", json=sample_deposition(*dirs),
                                     headers=TOKEN)
    assert (status, ctype) == (200, "application/json"), body
    return body  # type: ignore[no-any-return]


async def test_deposit_creates_entry_and_upload_area(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    body = await create(http, empiar, "data/micrographs")
    assert body["deposition"] is True and isinstance(body["entry_id"], int) and body["directory"]
    state = empiar_sim.state_of(empiar.app)
    area = state.upload_area(state.entries[body["entry_id"]])
    assert area == state.root / "upload" / body["directory"] / "data" and area.is_dir()


async def test_auth_errors_are_detail_json(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    url = empiar.url + API + "deposit_entry/"
    status, body, ctype = await call(http, "POST", url, json=sample_deposition("data/a"))
    assert (status, body, ctype) == (401, {"detail": "Authentication credentials were not provided."}, "application/json")
    status, body, _ = await call(http, "POST", url, json=sample_deposition("data/a"), headers={"Authorization": "Token nope"})
    assert (status, body) == (401, {"detail": "Invalid token."})
    bad = base64.b64encode(b"depositor:wrong").decode()
    status, body, _ = await call(http, "POST", url, json=sample_deposition("data/a"), headers={"Authorization": f"Basic {bad}"})
    assert (status, body) == (401, {"detail": "Invalid username/password."})
    status, body, _ = await call(http, "POST", url, json=sample_deposition("data/a"),
                                 headers=basic("depositor", "sim-password"))
    assert status == 200 and body["deposition"] is True
    status, body, ctype = await call(http, "GET", url, headers=TOKEN)
    assert (status, body, ctype) == (405, {"detail": 'Method "GET" not allowed.'}, "application/json")
    status, body, _ = await call(http, "POST", empiar.url + API + "nothing/", headers=TOKEN)
    assert (status, body) == (404, {"detail": "Not found."})


async def test_invalid_deposition_names_the_fields(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    doc = sample_deposition("data/a")
    doc["title"] = "short"
    del doc["imagesets"][0]["voxel_type"]
    status, body, _ = await call(http, "POST", empiar.url + API + "deposit_entry/", json=doc, headers=TOKEN)
    assert status == 400
    assert body["errors"]["title"] and body["errors"]["imagesets[0].voxel_type"] == ["This field is required."]
    assert body["detail"].startswith("title:")
    status, body, _ = await call(http, "POST", empiar.url + API + "deposit_entry/", data=b"{}", headers=TOKEN)
    assert status == 415


async def test_redeposit_replaces_metadata_and_checks_rights(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    first = await create(http, empiar, "data/a")
    doc = sample_deposition("data/a", "data/b")
    doc["entry_id"] = str(first["entry_id"])
    status, body, _ = await call(http, "PUT", empiar.url + API + "redeposit_entry/", json=doc, headers=TOKEN)
    assert status == 200 and body == first
    entry = empiar_sim.state_of(empiar.app).entries[first["entry_id"]]
    assert [i["directory"] for i in entry.metadata["imagesets"]] == ["data/a", "data/b"]
    status, body, _ = await call(http, "PUT", empiar.url + API + "redeposit_entry/", json=doc,
                                 headers=basic("alice", "alice-password"))
    assert (status, body) == (403, {"detail": "You do not have permission to perform this action."})
    doc["entry_id"] = "999"
    status, body, _ = await call(http, "PUT", empiar.url + API + "redeposit_entry/", json=doc, headers=TOKEN)
    assert (status, body) == (404, {"detail": "Not found."})


async def test_thumbnail_must_be_png_of_400(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    entry = await create(http, empiar, "data/a")

    async def upload(data: bytes) -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("entry_id", str(entry["entry_id"]))
        form.add_field("file", data, filename="thumb.png", content_type="image/png")
        status, body, _ = await call(http, "POST", empiar.url + API + "image_upload/", data=form, headers=TOKEN)
        return status, body

    assert await upload(make_png(400, 420)) == (200, {"thumbnail_upload": True})
    status, body = await upload(make_png(399, 800))
    assert status == 400 and "399 x 800" in body["detail"]
    status, body = await upload(b"GIF89a" + b"\0" * 100)
    assert status == 400 and "PNG" in body["detail"]
    stored = empiar_sim.state_of(empiar.app).root / "thumbnails" / f"{entry['entry_id']}.png"
    assert stored.read_bytes() == make_png(400, 420)


async def test_grant_rights(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    entry = await create(http, empiar, "data/a")
    url = empiar.url + API + "grant_rights/"
    body = {"u": {"alice": "3", "nobody": "2"}, "entry_id": entry["entry_id"]}
    assert (await call(http, "POST", url, json=body, headers=TOKEN))[:2] == (200, {"alice": True})
    body = {"e": {"bob@example.org": "2"}, "o": {"0000-0001-2345-6789": "4"}, "entry_id": entry["entry_id"]}
    status, answer, _ = await call(http, "POST", url, json=body, headers=TOKEN)
    assert (status, answer) == (200, {"bob@example.org": True, "0000-0001-2345-6789": True})
    assert empiar_sim.state_of(empiar.app).entries[entry["entry_id"]].rights == {"alice": 4, "bob": 2}
    status, answer, _ = await call(http, "POST", url, json={"u": {"alice": "7"}, "entry_id": entry["entry_id"]},
                                   headers=TOKEN)
    assert status == 400 and "must be 1, 2, 3 or 4" in answer["detail"]
    two = {"u": {"alice": "1", "bob": "1"}, "entry_id": entry["entry_id"]}
    status, answer, _ = await call(http, "POST", url, json=two, headers=TOKEN)
    assert (status, answer) == (400, {"detail": "There can be only one deposition owner."})


async def test_submit_refuses_empty_imagesets(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    entry = await create(http, empiar, "data/a", "/data/b/c")
    url = empiar.url + API + "submit_entry/"
    status, body, _ = await call(http, "POST", url, data=f'{{"entry_id": "{entry["entry_id"]}"}}',
                                 headers={**TOKEN, "Content-Type": "application/json"})
    assert status == 400 and "data/a" in body["detail"] and "/data/b/c" in body["detail"]
    state = empiar_sim.state_of(empiar.app)
    area = state.upload_area(state.entries[entry["entry_id"]])
    (area / "a").mkdir()
    (area / "a" / "x.mrc").write_bytes(b"x")
    (area / "b" / "c" / "deep").mkdir(parents=True)
    (area / "b" / "c" / "deep" / "y.mrc").write_bytes(b"y")
    status, body, _ = await call(http, "POST", url, json={"entry_id": str(entry["entry_id"])}, headers=TOKEN)
    assert (status, body) == (200, {"submission": True, "empiar_id": f"EMPIAR-{10000 + entry['entry_id']}"})
    status, body, _ = await call(http, "POST", url, json={"entry_id": str(entry["entry_id"])}, headers=TOKEN)
    assert status == 409
    redo = {**sample_deposition("data/a"), "entry_id": entry["entry_id"]}
    assert (await call(http, "PUT", empiar.url + API + "redeposit_entry/", json=redo, headers=TOKEN))[0] == 409


async def test_state_survives_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    root = tmp_path / "store"
    async with SimServer(empiar_sim.build_app(root, FaultInjector(), None)) as server:
        entry = await create(http, server, "data/a")
    async with SimServer(empiar_sim.build_app(root, FaultInjector(), None)) as server:
        doc = {**sample_deposition("data/a"), "entry_id": entry["entry_id"]}
        status, body, _ = await call(http, "PUT", server.url + API + "redeposit_entry/", json=doc, headers=TOKEN)
        assert (status, body) == (200, entry)
        assert (await create(http, server, "data/a"))["entry_id"] == entry["entry_id"] + 1


# -- Globus ----------------------------------------------------------------------------------------------
SRC_EP = "11111111-2222-4333-8444-555555555555"
BEARER = {"Authorization": "Bearer globus-token"}


@pytest.fixture
async def globus(tmp_path: Path) -> AsyncIterator[SimServer]:
    import argparse

    args = argparse.Namespace(token="globus-token", endpoint=[f"{SRC_EP}={tmp_path / 'src'}"])
    (tmp_path / "src" / "set" / "sub").mkdir(parents=True)
    for i, rel in enumerate(["set/a.bin", "set/sub/b.bin", "set/c.bin"]):
        (tmp_path / "src" / rel).write_bytes(bytes([i]) * (1000 + i * 777))
    async with SimServer(globus_sim.build_app(tmp_path / "store", FaultInjector(), args)) as server:
        yield server


async def submit_transfer(http: aiohttp.ClientSession, server: SimServer, **extra: Any) -> tuple[int, Any]:
    status, sub, _ = await call(http, "GET", server.url + "/v0.10/submission_id", headers=BEARER)
    assert status == 200 and sub["DATA_TYPE"] == "submission_id"
    body = {"DATA_TYPE": "transfer", "submission_id": sub["value"], "source_endpoint": SRC_EP,
            "destination_endpoint": globus_sim.EMPIAR_ENDPOINTS[1], "sync_level": 3, "verify_checksum": True,
            "DATA": [{"DATA_TYPE": "transfer_item", "source_path": "/set", "destination_path": "/upload/D/data/set",
                      "recursive": True}], **extra}
    status, answer, _ = await call(http, "POST", server.url + "/v0.10/transfer", json=body, headers=BEARER)
    return status, answer


async def finish(server: SimServer, http: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    state = globus_sim.state_of(server.app)
    await asyncio.gather(*state.running)  # the simulator's own tasks: awaited, not slept on
    status, task, _ = await call(http, "GET", server.url + f"/v0.10/task/{task_id}", headers=BEARER)
    assert status == 200
    return task  # type: ignore[no-any-return]


def tree_md5(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


async def test_globus_transfer_copies_and_resyncs(globus: SimServer, http: aiohttp.ClientSession,
                                                  tmp_path: Path) -> None:
    status, answer = await submit_transfer(http, globus)
    assert status == 202 and answer["code"] == "Accepted" and answer["message"] == globus_sim.ACCEPTED
    task = await finish(globus, http, answer["task_id"])
    assert task["status"] == "SUCCEEDED" and task["files_transferred"] == 3
    assert tree_md5(tmp_path / "store/upload/D/data/set") == tree_md5(tmp_path / "src/set")
    # checksum sync: a damaged copy is re-sent, intact ones are skipped
    (tmp_path / "store/upload/D/data/set/c.bin").write_bytes(b"torn")
    status, answer = await submit_transfer(http, globus)
    task = await finish(globus, http, answer["task_id"])
    assert (task["files_transferred"], task["files_skipped"]) == (1, 2)
    assert tree_md5(tmp_path / "store/upload/D/data/set") == tree_md5(tmp_path / "src/set")


async def test_globus_duplicate_faults_and_errors(globus: SimServer, http: aiohttp.ClientSession) -> None:
    state = globus_sim.state_of(globus.app)
    status, answer = await submit_transfer(http, globus)
    again = {"DATA_TYPE": "transfer", "submission_id": answer["submission_id"], "source_endpoint": SRC_EP,
             "destination_endpoint": globus_sim.EMPIAR_ENDPOINTS[0], "DATA": [{"DATA_TYPE": "transfer_item",
                                                                               "source_path": "/x", "destination_path": "/y"}]}
    status, dup, _ = await call(http, "POST", globus.url + "/v0.10/transfer", json=again, headers=BEARER)
    assert (status, dup["code"], dup["task_id"]) == (200, "Duplicate", answer["task_id"])
    await finish(globus, http, answer["task_id"])

    state.fail_tasks, state.transient_faults = 1, 0
    status, answer = await submit_transfer(http, globus)
    task = await finish(globus, http, answer["task_id"])
    assert task["status"] == "FAILED" and task["fatal_error"]["code"] == "PERMISSION_DENIED"

    state.transient_faults = 2
    status, answer = await submit_transfer(http, globus, sync_level=None)
    task = await finish(globus, http, answer["task_id"])
    assert (task["status"], task["faults"], task["files_transferred"]) == ("SUCCEEDED", 2, 3)

    status, body, _ = await call(http, "GET", globus.url + "/v0.10/submission_id",
                                 headers={"Authorization": "Bearer wrong"})
    assert (status, body["code"]) == (401, "AuthenticationFailed")
    status, answer = await submit_transfer(http, globus, source_endpoint="00000000-0000-0000-0000-000000000000")
    assert (status, answer["code"]) == (404, "EndpointNotFound")
    status, answer = await submit_transfer(http, globus, DATA=[{"DATA_TYPE": "transfer_item", "source_path": "/set",
                                                                "destination_path": "/../etc", "recursive": True}])
    assert status == 400


async def test_globus_cancel_held_task(globus: SimServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    status, _, _ = await call(http, "POST", globus.url + "/_sim/globus", json={"hold": True})
    status, answer = await submit_transfer(http, globus)
    status, body, _ = await call(http, "POST", globus.url + f"/v0.10/task/{answer['task_id']}/cancel", headers=BEARER)
    assert (status, body["code"]) == (200, "Canceled")
    globus_sim.state_of(globus.app).hold.set()
    task = await finish(globus, http, answer["task_id"])
    assert task["status"] == "FAILED" and task["fatal_error"]["code"] == "CANCELED"
    assert not (tmp_path / "store/upload/D/data/set/a.bin").exists()
    status, body, _ = await call(http, "GET", globus.url + "/v0.10/endpoint/" + SRC_EP, headers=BEARER)
    assert status == 200 and body["activated"] is True


def test_png_size_reader() -> None:
    assert png_size(make_png(512, 400)) == (512, 400)
    assert png_size(b"\x89PNG\r\n\x1a\n") is None
    assert copy.deepcopy(sample_deposition("data/x"))["imagesets"][0]["directory"] == "data/x"


# -- the clients against the simulators ----------------------------------------------------------------------
FAST = Pacer(RetryPolicy(attempts=3), clock=FakeClock())


async def test_empiar_api_retries_5xx_and_maps_errors(empiar: SimServer, http: aiohttp.ClientSession,
                                                      tmp_path: Path) -> None:
    empiar.faults.add("POST /empiar/deposition/api/deposit_entry/ status=503 first=1")
    api = EmpiarApi(http, empiar.url, Credentials(token="sim-token"), pacer=FAST)
    entry = await api.create(sample_deposition("data/a"))
    assert len(empiar_sim.state_of(empiar.app).entries) == 1  # the 503 created nothing; the retry did
    assert await api.redeposit(sample_deposition("data/a"), entry.entry_id) == entry
    thumb = tmp_path / "t.png"
    thumb.write_bytes(make_png(400, 400))
    await api.upload_thumbnail(entry.entry_id, thumb)
    await api.grant_rights(entry.entry_id, "u", {"alice": "2"})
    with pytest.raises(errors.RemoteValidationError, match="nobody"):
        await api.grant_rights(entry.entry_id, "u", {"nobody": "2"})
    with pytest.raises(errors.RemoteValidationError, match="empty or missing"):
        await api.submit(entry.entry_id)
    area = empiar_sim.state_of(empiar.app).upload_area(empiar_sim.state_of(empiar.app).entries[entry.entry_id])
    (area / "a").mkdir()
    (area / "a" / "f").write_bytes(b"1")
    assert await api.submit(entry.entry_id) == f"EMPIAR-{10000 + entry.entry_id}"
    assert await api.submit(entry.entry_id) is None  # already submitted
    bad = EmpiarApi(http, empiar.url, Credentials(token="wrong"), pacer=FAST)
    with pytest.raises(errors.AuthError, match="Invalid token") as info:
        await bad.create(sample_deposition("data/a"))
    assert "wrong" not in str(info.value) and info.value.hint


async def test_globus_client_waits_fails_and_cancels(globus: SimServer, http: aiohttp.ClientSession,
                                                     tmp_path: Path) -> None:
    client = GlobusClient(http, "globus-token", base_url=globus.url + "/v0.10", poll_interval=0.01, pacer=FAST)
    assert (await client.endpoint(SRC_EP))["activated"] is True
    item = TransferItem("/set", "/upload/D/data/set/", True)
    task_id = await client.submit(SRC_EP, globus_sim.EMPIAR_ENDPOINTS[1], [item], label="t")
    seen: list[TaskProgress] = []
    task = await client.wait(task_id, seen.append)
    assert task["status"] == "SUCCEEDED" and seen[-1].files_transferred == 3
    assert tree_md5(tmp_path / "store/upload/D/data/set") == tree_md5(tmp_path / "src/set")

    state = globus_sim.state_of(globus.app)
    state.fail_tasks = 1
    task_id = await client.submit(SRC_EP, globus_sim.EMPIAR_ENDPOINTS[1], [item])
    with pytest.raises(errors.PermanentError, match="PERMISSION_DENIED"):
        await client.wait(task_id)

    state.hold.clear()  # the task stays ACTIVE; cancelling our wait must cancel it on the service
    task_id = await client.submit(SRC_EP, globus_sim.EMPIAR_ENDPOINTS[1], [item])
    with anyio.CancelScope() as scope:
        await client.wait(task_id, lambda _: scope.cancel())
    assert scope.cancelled_caught and state.tasks[task_id].canceled

    bad = GlobusClient(http, "nope", base_url=globus.url + "/v0.10", pacer=FAST)
    with pytest.raises(errors.AuthError, match="AuthenticationFailed") as info:
        await bad.endpoint(SRC_EP)
    assert "GLOBUS_TRANSFER_TOKEN" in (info.value.hint or "") and "nope" not in str(info.value)


@pytest.mark.parametrize("change", [
    {}, {"title": "short"}, {"release_date": "XX"}, {"experiment_type": 10}, {"authors": []},
    {"imagesets": [{"directory": "/elsewhere/x"}]}, {"imagesets": [{"directory": "data/../x"}]},
    {"corresponding_author": {"email": "not-an-address"}}, {"citation": [{"published": "yes"}]},
])
def test_server_rules_refuse_what_the_client_refuses(change: dict[str, Any]) -> None:
    """The simulator's rules are its own (sim/empiar_rules.py): checked here against the client's validator
    on the reference example and on common mistakes. The server may be looser, never stricter: a deposition
    the client lets through must be accepted."""
    from asyncdepo.adapters.empiar.schema import problems
    from asyncdepo.sim.empiar_rules import deposition_errors

    doc = sample_deposition("data/a", "data/b")
    for key, value in change.items():
        if isinstance(value, list) and value and isinstance(doc[key], list):
            doc[key] = [{**doc[key][0], **value[0]}, *doc[key][1:]]
        elif isinstance(value, dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    server, client = deposition_errors(doc), problems(doc)
    assert bool(server) == bool(client), (server, client)
    assert {field for field, _ in server} <= {p.field for p in client}


# -- the shared contract suite (tests/adapters/contract_suite.py) over EMPIAR, by ascp and by Globus -------------
class _EmpiarContract(AdapterContract):
    """EMPIAR with the contract's tree as DATA: its two folders are the image sets, the other files go beside
    them; the entry is not submitted, so a second push re-deposits it (a submitted entry refuses changes)."""

    via = "ascp"

    @pytest.fixture
    async def harness(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
        from asyncdepo.adapters.empiar import adapter as EA
        from asyncdepo.adapters.empiar.schema import resolve_layout
        from asyncdepo.adapters.globus import GlobusClient
        from asyncdepo.transport.ascp.options import AscpOptions, AscpSecrets
        from asyncdepo.transport.httpbody import client_session
        from tests import requires

        store, src = tmp_path / "store", tmp_path / "src"
        for key, value in {"ASYNCDEPO_SIM_ASCP_ROOT": str(store), "ASYNCDEPO_SIM_ASCP_PASSWORD": "pw-3141"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL", raising=False)
        doc = sample_deposition("data/src/d0", "data/src/d1")
        (tmp_path / "dep.json").write_text(json.dumps(doc))
        globus_args = argparse.Namespace(token="globus-token", endpoint=[f"{globus_sim.LOCAL_ENDPOINT}=/"])
        opts = AscpOptions(ascp=requires.program("asyncdepo-sim-ascp", path_too=False), rate="2G", fair=True,
                           no_encryption=True, create_dir=True, resume=3, stall_timeout=30, management_port=True)
        async with SimServer(empiar_sim.build_app(store, FaultInjector(), None)) as empiar, \
                SimServer(globus_sim.build_app(store, FaultInjector(), globus_args)) as globus, \
                client_session() as session:
            state = empiar_sim.state_of(empiar.app)
            gstate = globus_sim.state_of(globus.app)

            def make(cfg: EngineConfig) -> EmpiarAdapterT:
                dep = EA.Deposition(doc, tmp_path / "dep.json", resolve_layout(doc, src), submit=False)
                ascp = EA.AscpRoute(opts, AscpSecrets(password="pw-3141"), "127.0.0.1") if self.via == "ascp" \
                    else None
                route = EA.GlobusRoute(GlobusClient(session, "globus-token", base_url=globus.url + "/v0.10",
                                                    poll_interval=0.02),
                                       globus_sim.LOCAL_ENDPOINT, globus_sim.EMPIAR_ENDPOINTS[0])
                return EA.EmpiarAdapter(EmpiarApi(session, empiar.url, Credentials(token="sim-token")), dep,
                                        ascp=ascp, globus=route if self.via == "globus" else None)

            def stored() -> dict[str, bytes]:
                entries = list(state.entries.values())
                return tree_of(state.upload_area(entries[0]) / "src", skip=(".aspx",)) if entries else {}

            def inject(fault: str) -> Callable[[], int] | None:
                if fault != "drop":
                    return None  # 5xx and 429 on EMPIAR's API
                if self.via == "ascp":  # the connection lost after 100 kB of the first session
                    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "drop:100000:once")
                    return lambda: len(list((store / ".ascp-faults").glob("*")))
                gstate.transient_faults = 1  # a copy that fails once; Globus tries it again by itself
                return lambda: int(gstate.transient_faults == 0)

            yield Harness(make, stored, faults=empiar.faults, data=("POST", API + "deposit_entry/"),
                          inject=inject, stops=False)


class TestContractAscp(_EmpiarContract):
    via = "ascp"


class TestContractGlobus(_EmpiarContract):
    via = "globus"
