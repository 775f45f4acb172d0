"""EMPIAR's and Globus's recovery and refusal paths with the fault on the wire: the simulators' fault injectors
(an answer that is empty, or JSON of the wrong shape), the wire proxy (a lost answer, a proxy's own error
page), the stand-in ascp's faults and real CLI runs; each asserts what the simulators hold and what the user
is told."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from asyncdepo import errors
from asyncdepo.adapters.empiar.depositor import Credentials, EmpiarApi
from asyncdepo.adapters.globus import GlobusClient, TransferItem
from asyncdepo.sim import empiar as empiar_sim
from asyncdepo.sim import globus as globus_sim
from asyncdepo.sim.datasets import make_png, sample_deposition
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.pacer import Pacer, RetryPolicy
from tests.fakeclock import FakeClock

API = "/empiar/deposition/api/"
SRC_EP = "11111111-2222-4333-8444-555555555555"
DEST_EP = globus_sim.EMPIAR_ENDPOINTS[1]


def fast() -> Pacer:
    return Pacer(RetryPolicy(attempts=3), clock=FakeClock())


@pytest.fixture
async def empiar(tmp_path: Path) -> AsyncIterator[SimServer]:
    async with SimServer(empiar_sim.build_app(tmp_path / "store", FaultInjector(), None)) as server:
        yield server


@pytest.fixture
async def globus(tmp_path: Path) -> AsyncIterator[SimServer]:
    (tmp_path / "src" / "set").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "src" / "set" / f"f{i}.bin").write_bytes(bytes([i]) * (5000 + i))
    args = argparse.Namespace(token="globus-token", endpoint=[f"{SRC_EP}={tmp_path / 'src'}"])
    async with SimServer(globus_sim.build_app(tmp_path / "store", FaultInjector(), args)) as server:
        yield server


def entries(server: SimServer) -> dict[int, empiar_sim.Entry]:
    return empiar_sim.state_of(server.app).entries


# -- the EMPIAR deposition API -------------------------------------------------------------------------------
async def test_create_whose_answer_is_lost_is_not_retried(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    """The server created the entry, the answer never came: a retry would create a second entry."""
    async with FaultProxy(("127.0.0.1", empiar.port)) as proxy:
        proxy.faults.add(f"POST {API}deposit_entry/ lose first=1")
        api = EmpiarApi(http, proxy.url, Credentials(token="sim-token"), pacer=fast())
        with pytest.raises(errors.PermanentError) as info:
            await api.create(sample_deposition("data/a"))
    assert len(entries(empiar)) == 1  # created once, never twice
    assert str(info.value).startswith("EMPIAR POST deposit_entry/: ")
    assert str(info.value).endswith("; the entry may or may not have been created")
    assert info.value.hint == "rerun the same command: nothing was transferred yet"


async def test_redeposit_whose_answer_is_lost_is_sent_again(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    direct = EmpiarApi(http, empiar.url, Credentials(token="sim-token"), pacer=fast())
    entry = await direct.create(sample_deposition("data/a"))
    async with FaultProxy(("127.0.0.1", empiar.port)) as proxy:
        proxy.faults.add(f"PUT {API}redeposit_entry/ lose first=1")
        api = EmpiarApi(http, proxy.url, Credentials(token="sim-token"), pacer=fast())
        assert await api.redeposit(sample_deposition("data/a", "data/b"), entry.entry_id) == entry
    stored = entries(empiar)[entry.entry_id]
    assert stored.redeposits == 2  # the lost one and the retry: re-depositing the same metadata is harmless
    assert [s["directory"] for s in stored.metadata["imagesets"]] == ["data/a", "data/b"]


async def test_proxy_error_page_and_empty_answers_are_retried(empiar: SimServer,
                                                              http: aiohttp.ClientSession) -> None:
    async with FaultProxy(("127.0.0.1", empiar.port)) as proxy:
        proxy.faults.add(f"POST {API}deposit_entry/ status=502 first=1")  # the proxy's XML page, not EMPIAR's
        empiar.faults.add(f"POST {API}deposit_entry/ status=204 first=1")  # 'application/json' and no body
        api = EmpiarApi(http, proxy.url, Credentials(token="sim-token"), pacer=fast())
        entry = await api.create(sample_deposition("data/a"))
    assert list(entries(empiar)) == [entry.entry_id]
    assert empiar.faults.injected() == 1 and proxy.faults.injected() == 1

    empiar.faults.add(f"POST {API}deposit_entry/ status=204 first=0")
    with pytest.raises(errors.TransientError) as info:
        await EmpiarApi(http, empiar.url, Credentials(token="sim-token"), pacer=fast()).create(
            sample_deposition("data/a"))
    assert str(info.value) == ("EMPIAR POST deposit_entry/: HTTP 204 answered application/json, "
                               "not a JSON object")
    assert len(entries(empiar)) == 1


async def test_answers_of_the_wrong_shape_are_refused(empiar: SimServer, http: aiohttp.ClientSession,
                                                      tmp_path: Path) -> None:
    """A 200 whose JSON is not the answer asked for (here the injector's own {"error": ...})."""
    api = EmpiarApi(http, empiar.url, Credentials(token="sim-token"), pacer=fast())
    empiar.faults.add(f"POST {API}deposit_entry/ status=200 first=1")
    with pytest.raises(errors.RemoteValidationError) as info:
        await api.create(sample_deposition("data/a"))
    assert str(info.value) == "EMPIAR deposition was not successful: {'error': 'injected fault: HTTP 200'}"
    assert entries(empiar) == {}

    entry = await api.create(sample_deposition("data/a"))
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(make_png(400, 400))
    empiar.faults.add(f"POST {API}image_upload/ status=200 first=1")
    with pytest.raises(errors.RemoteValidationError) as info:
        await api.upload_thumbnail(entry.entry_id, thumb)
    assert str(info.value) == ("EMPIAR thumbnail upload was not successful: "
                               "{'error': 'injected fault: HTTP 200'}")
    assert not entries(empiar)[entry.entry_id].thumbnail

    area = empiar_sim.state_of(empiar.app).upload_area(entries(empiar)[entry.entry_id])
    (area / "a").mkdir()
    (area / "a" / "x.mrc").write_bytes(b"x")
    empiar.faults.add(f"POST {API}submit_entry/ status=200 first=1")
    with pytest.raises(errors.RemoteValidationError) as info:
        await api.submit(entry.entry_id)
    assert str(info.value) == "EMPIAR submission was not successful: {'error': 'injected fault: HTTP 200'}"
    assert not entries(empiar)[entry.entry_id].submitted
    assert await api.submit(entry.entry_id) == f"EMPIAR-{10000 + entry.entry_id}"


async def test_username_and_password_and_no_credentials(empiar: SimServer, http: aiohttp.ClientSession) -> None:
    api = EmpiarApi(http, empiar.url, Credentials(username="alice", password="alice-password"), pacer=fast())
    assert repr(api) == f"EmpiarApi({empiar.url + API!r})"
    entry = await api.create(sample_deposition("data/a"))
    assert entries(empiar)[entry.entry_id].owner == "alice"
    wrong = EmpiarApi(http, empiar.url, Credentials(username="alice", password="nope"), pacer=fast())
    with pytest.raises(errors.AuthError) as info:
        await wrong.create(sample_deposition("data/a"))
    assert "Invalid username/password." in str(info.value) and "nope" not in str(info.value)
    assert info.value.hint == "check the EMPIAR API token (or the username and password given with -p)"
    log = len(empiar_sim.state_of(empiar.app).log)
    with pytest.raises(errors.UsageError) as info:
        await EmpiarApi(http, empiar.url, Credentials(username="alice"), pacer=fast()).create(
            sample_deposition("data/a"))
    assert str(info.value) == "no EMPIAR credentials: give an API token, or a username with -p"
    assert len(empiar_sim.state_of(empiar.app).log) == log and len(entries(empiar)) == 1  # nothing was sent


# -- the Globus Transfer client ------------------------------------------------------------------------------
def client_of(http: aiohttp.ClientSession, url: str) -> GlobusClient:
    return GlobusClient(http, "globus-token", base_url=url + "/v0.10", poll_interval=0.01, pacer=fast())


async def test_globus_empty_and_foreign_answers_are_retried(globus: SimServer, http: aiohttp.ClientSession,
                                                            tmp_path: Path) -> None:
    async with FaultProxy(("127.0.0.1", globus.port)) as proxy:
        client = client_of(http, proxy.url)
        assert repr(client) == f"GlobusClient({proxy.url + '/v0.10'!r})" and "globus-token" not in repr(client)
        proxy.faults.add("GET /v0.10/submission_id status=502 first=1")  # the proxy's XML page
        globus.faults.add("POST /v0.10/transfer status=204 first=1")  # 'application/json' and no body
        globus.faults.add("GET /v0.10/task/* status=204 first=1")
        task_id = await client.submit(SRC_EP, DEST_EP, [TransferItem("/set", "/upload/D/data/set")])
        task = await client.wait(task_id)
    assert task["status"] == "SUCCEEDED" and task["files_transferred"] == 3
    assert len(globus_sim.state_of(globus.app).tasks) == 1  # one task, whatever was retried
    assert proxy.faults.injected() == 1 and globus.faults.injected() == 2
    for i in range(3):
        assert (tmp_path / f"store/upload/D/data/set/f{i}.bin").read_bytes() == bytes([i]) * (5000 + i)

    globus.faults.add("GET /v0.10/endpoint/* status=204 first=0")
    with pytest.raises(errors.TransientError) as info:
        await client_of(http, globus.url).endpoint(SRC_EP)
    assert str(info.value) == f"Globus GET /endpoint/{SRC_EP}: HTTP 204 answered application/json, not a JSON object"


async def test_globus_answers_without_their_ids_are_refused(globus: SimServer, http: aiohttp.ClientSession) -> None:
    client = client_of(http, globus.url)
    item = [TransferItem("/set", "/upload/D/data/set")]
    globus.faults.add("GET /v0.10/submission_id status=200 first=1")
    with pytest.raises(errors.PermanentError) as info:
        await client.submit(SRC_EP, DEST_EP, item)
    assert str(info.value) == "Globus answered no submission id: {'error': 'injected fault: HTTP 200'}"
    globus.faults.add("POST /v0.10/transfer status=200 first=1")
    with pytest.raises(errors.PermanentError) as info:
        await client.submit(SRC_EP, DEST_EP, item)
    assert str(info.value) == "Globus accepted the transfer without a task id: None"
    assert globus_sim.state_of(globus.app).tasks == {}  # neither reached the service


async def test_globus_cancel_that_fails_stays_quiet(globus: SimServer, http: aiohttp.ClientSession) -> None:
    """Cancelling runs during cleanup: a refused cancel is not raised over the cancellation."""
    state = globus_sim.state_of(globus.app)
    client = client_of(http, globus.url)
    state.hold.clear()  # the task stays ACTIVE
    task_id = await client.submit(SRC_EP, DEST_EP, [TransferItem("/set", "/upload/D/data/set")])
    globus.faults.add("POST /v0.10/task/*/cancel status=503 first=0")
    with anyio.CancelScope() as scope:
        await client.wait(task_id, lambda _: scope.cancel())
    assert scope.cancelled_caught and not state.tasks[task_id].canceled
    assert globus.faults.injected() == 3  # every try of the cancel was refused
    await client.cancel("no-such-task")  # 404: nothing to cancel, nothing raised
    state.hold.set()
