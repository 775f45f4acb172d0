"""The PDIS adapter's recovery and refusal paths, each reached by a real fault: the simulator's fault injector
(a lost submit answer, a falsified digest, a refused request, a cleanup that fails), a FaultProxy in front of
it (answers that are not PDIS's JSON), another account holding the same archive. Assertions are on the
simulator's submissions (their archives' md5 and status), the engine's report and the exact error."""

from __future__ import annotations

import argparse
import hashlib
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from asyncdepo.adapters.pdis import Metadata, PdisAdapter, PdisClient, normalize_server
from asyncdepo.config import EngineConfig
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.scheduler import push
from asyncdepo.errors import (
    PermanentError,
    RemoteValidationError,
    TransientError,
    UsageError,
    ValidationError,
)
from asyncdepo.sim import pdis as simpdis
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.pacer import Pacer, RetryPolicy
from tests.fakeclock import FakeClock

ALICE, BOB = "alice@lab.edu", "bob@lab.edu"
UPLOAD, SUBMIT = "POST /api/v1/upload/", "POST /api/v1/submit/"


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimServer]:
    args = argparse.Namespace(status_delay=0, user=[f"{ALICE}:alicepw", f"{BOB}:bobpw"])
    async with SimServer(simpdis.build_app(tmp_path / "simroot", FaultInjector(), args)) as server:
        yield server


def state(sim: SimServer) -> simpdis.PdisState:
    return sim.app[simpdis.PDIS_STATE]


def submissions(sim: SimServer, owner: str = ALICE) -> list[simpdis.Submission]:
    return [s for s in state(sim).submissions.values() if s.owner == owner]


def dataset(parent: Path, name: str, seed: str = "") -> Path:
    """A small dataset of CBF-like frames (the directory name carries the PDB id, as beamlines name them)."""
    root = parent / name
    root.mkdir(parents=True)
    for i in range(3):
        head = f"###CBF: VERSION 1.5\r\n# Detector: PILATUS\r\n# Frame {i}\r\n".encode()
        (root / f"{name}_{i:04d}.cbf").write_bytes(head + hashlib.sha256(f"{seed}{name}{i}".encode()).digest() * 900)
    return root


def archive_holds(sim: SimServer, sub: simpdis.Submission, root: Path) -> bool:
    """The stored archive is the tar of ``root``: its members are the dataset's files, byte for byte."""
    with tarfile.open(state(sim).archive_path(sub)) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    return members == {f"{root.name}/{p.name}": p.read_bytes() for p in root.iterdir()}


async def push_dataset(url: str, sim: SimServer, root: Path, tmp_path: Path, *, user: str = ALICE,
                       meta: Metadata | None = None, messages: list[str] | None = None,
                       pacer: Pacer | None = None) -> tuple[RunReport, PdisAdapter]:
    async with PdisClient(url, state(sim).token_for(user), pacer=pacer) as client:
        adapter = PdisAdapter(client, meta or Metadata(pdb_code="auto"),
                              on_message=None if messages is None else messages.append)
        report = await push(root, adapter, EngineConfig(compress=("zstd", 3)),
                            journal_path=tmp_path / f"journal-{user}.sqlite")
    return report, adapter


# -- upload ---------------------------------------------------------------------------------------------
async def test_an_archive_another_account_holds_is_a_conflict(sim: SimServer, tmp_path: Path) -> None:
    root = dataset(tmp_path, "1abc_shared")
    report, _ = await push_dataset(sim.url, sim, root, tmp_path, user=BOB)
    assert report.ok, report.failures
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path)  # the very same tar, by alice
    assert not report.ok and adapter.state == {}
    (rel, message), = report.failures
    assert rel.startswith("1abc_shared"), rel
    assert "already holds an archive with md5" in message and "not in this account's submissions" in message
    assert submissions(sim) == [] and len(submissions(sim, BOB)) == 1
    assert sim.faults.requests[UPLOAD] == 2 and SUBMIT in sim.faults.requests  # bob's submit only
    assert sim.faults.requests[SUBMIT] == 1


async def test_a_falsified_digest_whose_cleanup_fails_carries_on_with_the_stored_archive(sim: SimServer,
                                                                                         tmp_path: Path) -> None:
    """The server's answer to the upload names another md5: the upload is to be deleted, but the delete is
    refused (503, best effort); the archive sent again is a duplicate (409) of the one stored, which the
    md5 finds among our submissions: that one is submitted, nothing is left over."""
    root = dataset(tmp_path, "2def_digest")
    sim.faults.add("POST /api/v1/upload/ digest first=1")
    sim.faults.add("DELETE /api/v1/submissions/* status=503 first=0")
    messages: list[str] = []
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path, messages=messages,
                                         pacer=Pacer(RetryPolicy(attempts=1)))
    assert report.ok and report.retries >= 1, report.failures
    (sub,) = submissions(sim)
    assert archive_holds(sim, sub, root) and state(sim).status(sub) in ("submitted", "pending")
    assert adapter.result["token"] == sub.token and adapter.result["md5"] == sub.md5hash
    assert sim.faults.requests[UPLOAD] == 2 and sim.faults.statuses["DELETE /api/v1/submissions/{token}/"] == 1
    assert any("already had this archive" in m for m in messages), messages


async def test_an_upload_answered_by_a_proxy_page_is_sent_again(sim: SimServer, tmp_path: Path) -> None:
    """A proxy answers the upload (201) and the equipment list (503) with its own XML pages: the upload
    has no digest to compare, so it is sent again; the list is asked again."""
    root = dataset(tmp_path, "3ghi_proxy")
    up = urlsplit(sim.url)
    async with FaultProxy((up.hostname or "", up.port or 0)) as proxy:
        proxy.faults.add("GET /api/v1/equipment/ status=503 first=1")
        proxy.faults.add("POST /api/v1/upload/ status=201 first=1")
        report, adapter = await push_dataset(proxy.url, sim, root, tmp_path)
        assert report.ok and report.retries >= 1, report.failures
        assert sum(proxy.faults.statuses.values()) == 2
        (sub,) = submissions(sim)
        assert archive_holds(sim, sub, root) and adapter.result["token"] == sub.token
        assert sim.faults.requests[UPLOAD] == 1  # the server saw the second upload only
        # a login page that is not PDIS's JSON has no token in it
        proxy.faults.add("POST /api/v1/auth/token/ status=200 first=1")
        async with PdisClient(proxy.url, None) as anonymous:
            with pytest.raises(TransientError, match="no token in the answer"):
                await anonymous.login(ALICE, "alicepw")
            assert await anonymous.login(ALICE, "alicepw") == state(sim).token_for(ALICE)


async def test_a_second_dataset_of_a_known_pdb_id_is_noted(sim: SimServer, tmp_path: Path) -> None:
    first = dataset(tmp_path / "a", "4jkl_first")
    assert (await push_dataset(sim.url, sim, first, tmp_path, meta=Metadata(pdb_code="4JKL")))[0].ok
    messages: list[str] = []
    again = dataset(tmp_path / "b", "4jkl_again", seed="other")
    report, _ = await push_dataset(sim.url, sim, again, tmp_path, meta=Metadata(pdb_code="4JKL"),
                                   messages=messages)
    assert report.ok, report.failures
    assert any("note: PDB 4JKL already has a dataset in PDIS" in m for m in messages), messages
    third = dataset(tmp_path / "c", "4jkl_third", seed="third")  # no listener: the note goes nowhere
    assert (await push_dataset(sim.url, sim, third, tmp_path, meta=Metadata(pdb_code="4JKL")))[0].ok
    assert [s.pdbid for s in submissions(sim)] == ["4JKL"] * 3


# -- submit ---------------------------------------------------------------------------------------------
async def test_a_lost_submit_answer_is_taken_as_submitted(sim: SimServer, tmp_path: Path) -> None:
    root = dataset(tmp_path, "5mno_lost")
    sim.faults.add("POST /api/v1/submit/ lose first=1")  # submitted; the answer lost; the retry gets 409
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path, meta=Metadata(pdb_code="5MNO"))
    assert report.ok, report.failures
    (sub,) = submissions(sim)
    assert sim.faults.requests[SUBMIT] == 2 and state(sim).status(sub) in ("submitted", "pending")
    assert adapter.result == {"token": sub.token, "md5": sub.md5hash, "size": adapter.result["size"],
                              "pdbid": "5MNO", "status": "submitted"}
    assert archive_holds(sim, sub, root)


async def test_pdb_auto_without_a_detected_id_keeps_the_upload_for_a_run_with_the_id(sim: SimServer,
                                                                                    tmp_path: Path) -> None:
    root = dataset(tmp_path, "beamline_run")  # no PDB id in any name
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path)
    assert not report.ok
    assert isinstance(adapter.error, ValidationError) and "detected no PDB id" in str(adapter.error)
    (sub,) = submissions(sim)
    assert state(sim).status(sub) == "uploaded"  # kept: the next run submits it
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path, meta=Metadata(pdb_code="6PQR"))
    assert report.ok, report.failures
    assert sim.faults.requests[UPLOAD] == 1 and adapter.result["token"] == sub.token
    assert sub.pdbid == "6PQR" and state(sim).status(sub) != "uploaded"


async def test_a_submit_pdis_refuses_is_the_push_s_error_naming_the_refusal(sim: SimServer,
                                                                           tmp_path: Path) -> None:
    root = dataset(tmp_path, "7stu_refused")
    sim.faults.add("POST /api/v1/submit/ status=400 first=1")
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path)
    assert not report.ok
    err = adapter.error
    assert isinstance(err, RemoteValidationError) and "PDIS refused the request: injected fault" in str(err)
    (sub,) = submissions(sim)
    assert state(sim).status(sub) == "uploaded"


# -- waiting ----------------------------------------------------------------------------------------------
async def test_a_wait_that_sees_no_progress_gives_up_with_a_hint(sim: SimServer, tmp_path: Path) -> None:
    root = dataset(tmp_path, "8vwx_wait")
    report, adapter = await push_dataset(sim.url, sim, root, tmp_path, meta=Metadata(pdb_code="8VWX"))
    assert report.ok, report.failures
    state(sim).status_delay = -1  # the simulator's validation moves only when told: it stays "submitted"
    clock, seen = FakeClock(), []
    async with PdisClient(sim.url, state(sim).token_for(ALICE)) as client:
        with pytest.raises(TransientError, match="still submitted after") as info:
            await client.wait_for(adapter.result["token"], interval=5.0, timeout=10.0,
                                  on_status=lambda status, _: seen.append(status), sleep=clock.sleep)
    assert seen == ["submitted"] and clock.slept == [5.0, 7.5]  # told once, polled three times
    assert "asyncdepo pdis status" in (info.value.hint or "")
    assert sim.faults.requests["GET /api/v1/submissions/{token}/"] == 3


# -- pure logic -------------------------------------------------------------------------------------------
async def test_servers_metadata_and_a_finish_with_nothing_uploaded() -> None:
    with pytest.raises(UsageError, match="expected an http"):
        normalize_server("proteindiffraction.org")
    with pytest.raises(UsageError, match="must not carry credentials"):
        normalize_server("https://user:pw@proteindiffraction.org/api/v1/")
    with pytest.raises(ValidationError, match="must be 'pdb' or 'other'"):
        Metadata(pdb_code="1ABC", dataset_type="protein").validate()
    client = PdisClient("http://127.0.0.1:9", "t")
    async with client:
        pass
    await client.__aexit__(None, None, None)  # a second exit is harmless
    adapter = PdisAdapter(client, Metadata(pdb_code="1ABC"))
    with pytest.raises(PermanentError, match="upload token was not kept"):
        await adapter.finish(True)
    assert await adapter.finish(False) == {}
