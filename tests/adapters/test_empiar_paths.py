"""EMPIAR's and Globus's recovery and refusal paths with the fault on the wire: the simulators' fault injectors
(an answer that is empty, or JSON of the wrong shape), the wire proxy (a lost answer, a proxy's own error
page), the stand-in ascp's faults and real CLI runs; each asserts what the simulators hold and what the user
is told."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from asyncdepo import errors
from asyncdepo.adapters.empiar.depositor import Credentials, EmpiarApi
from asyncdepo.adapters.globus import GlobusClient, TransferItem
from asyncdepo.cli import empiar as cli
from asyncdepo.sim import empiar as empiar_sim
from asyncdepo.sim import globus as globus_sim
from asyncdepo.sim.datasets import make_png, sample_deposition
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.pacer import Pacer, RetryPolicy
from tests.cli.test_empiar_cli import World, tree_md5, world  # noqa: F401 - world is a fixture
from tests.cli.test_session_jobs import CLI, _post, killed, only_job
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
    # the lost one and the one sent again (a PUT: aiohttp itself repeats it on a reset connection)
    assert stored.redeposits == 2
    assert [s["directory"] for s in stored.metadata["imagesets"]] == ["data/a", "data/b"]


async def test_thumbnail_cut_on_the_wire_is_sent_again(empiar: SimServer, http: aiohttp.ClientSession,
                                                       tmp_path: Path) -> None:
    entry = await EmpiarApi(http, empiar.url, Credentials(token="sim-token")).create(sample_deposition("data/a"))
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(make_png(420, 400))
    async with FaultProxy(("127.0.0.1", empiar.port)) as proxy:
        proxy.faults.add(f"POST {API}image_upload/ drop after=100 first=1")  # a POST: aiohttp does not repeat it
        retried: list[str] = []
        pacer = Pacer(RetryPolicy(attempts=3), clock=FakeClock(), on_retry=lambda ev: retried.append(str(ev.error)))
        await EmpiarApi(http, proxy.url, Credentials(token="sim-token"), pacer=pacer).upload_thumbnail(
            entry.entry_id, thumb)
    assert proxy.faults.injected() == 1 and len(retried) == 1
    assert retried[0].startswith("EMPIAR POST image_upload/: ")
    stored = empiar_sim.state_of(empiar.app).root / "thumbnails" / f"{entry.entry_id}.png"
    assert stored.read_bytes() == thumb.read_bytes()


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


# -- the adapter, run by the CLI against the simulators and the stand-in ascp ---------------------------------
def _create_entry(world: World) -> empiar_sim.Entry:  # noqa: F811 - world is the fixture
    request = urllib.request.Request(world.empiar.url + API + "deposit_entry/", method="POST",
                                     data=json.dumps(sample_deposition("data/x")).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Token sim-token"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        entry_id = json.loads(resp.read())["entry_id"]
    return world.state.entries[entry_id]


def said_in(out: str) -> list[tuple[str, str]]:
    """The messages of a ``--json`` run's events: (level, text)."""
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [(e["level"], e["text"]) for e in events if e["event"] == "message"]


def test_resume_option_naming_another_directory_is_refused(world: World,  # noqa: F811
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    entry = _create_entry(world)
    assert cli.push_main(world.argv("-r", str(entry.entry_id), "ELSEWHERE")) == 4
    err = capsys.readouterr().err
    assert (f"EMPIAR names directory {entry.directory} for entry {entry.entry_id}; the files were sent to "
            "ELSEWHERE") in err
    assert f"add -r {entry.entry_id} {entry.directory}" in err
    assert world.sessions() == [] and not any(world.state.upload_area(entry).iterdir())  # nothing sent
    assert entry.redeposits == 1 and not entry.submitted


def test_nested_image_sets_deep_extras_and_a_name_ascp_cannot_list(world: World,  # noqa: F811
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = world.tmp / "DATA"
    files = {"grid1/set/a.mrc": 70_000, "grid1/set/b.mrc": 5, "grid1/logs/deep/run.log": 300,
             "grid2/set/c.mrc": 1000, "README": 12}
    for rel, size in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(rel.encode() * (size // len(rel)) + b"x" * (size % len(rel)))
    (data / "grid1/set/two\nlines.mrc").write_bytes(b"a line break in its name")
    world.json.write_text(json.dumps(sample_deposition("data/grid1/set", "data/grid2/set")))
    argv = world.argv("--json")
    argv[-1] = str(data)
    argv.remove("-q")
    assert cli.push_main(argv) == 1  # one file failed: the others are there, the entry is not submitted
    entry = world.only_entry()
    assert not entry.submitted
    landed = tree_md5(world.state.upload_area(entry))
    assert landed == {k: v for k, v in tree_md5(data).items() if "\n" not in k}
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    report = next(e for e in events if e["event"] == "job_finished")["report"]
    assert report["failures"] == [{"rel": "grid1/set/two\nlines.mrc",
                                   "error": "'grid1/set/two\\nlines.mrc': a name with a line break cannot be sent "
                                            "by ascp or Globus"}]
    # one ascp session per image set, one for the files beside them in grid1 (logs/deep/run.log goes with
    # grid1's extras), one for README at the top
    assert sorted(report["summary"]["via"]) == ["+extra:", "+extra:grid1", "grid1/set", "grid2/set"]
    assert sorted(s["files"] for s in world.sessions()) == [1, 1, 1, 2]


def test_failed_and_unknown_globus_tasks_of_an_earlier_run_are_replaced(world: World,  # noqa: F811
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert world.globus.server is not None
    sim = globus_sim.state_of(world.globus.server.app)
    argv = world.argv(*world.globus_argv(), "--bwlimit", "50M", "--json")
    argv[argv.index("-a") + 1] = str(world.tmp / "no-ascp")  # no ascp: every file goes by Globus
    sim.fail_tasks = 3  # every session's task ends FAILED
    assert cli.push_main(argv) == 1
    said = said_in(capsys.readouterr().out)
    assert said.count(("warning", ("--bwlimit does not apply to Globus transfers: Globus copies between its "
                                  "endpoints"))) == 1  # said once, not per session
    failed = {t.task_id for t in sim.tasks.values()}
    assert len(failed) == 3 and all(t.status == "FAILED" for t in sim.tasks.values())
    assert not world.only_entry().submitted

    # the rerun looks each earlier task up: one lookup is refused (404, as for a task Globus no longer
    # knows), the others say FAILED; their files go in new tasks
    world.globus.server.faults.add("GET /v0.10/task/* status=404 first=1")
    assert cli.push_main(argv) == 0
    entry = world.only_entry()
    assert entry.submitted and tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    assert only_job(world.journal)["state"] == "done"
    new = [t for t in sim.tasks.values() if t.task_id not in failed]
    assert new and all(t.status == "SUCCEEDED" for t in new)
    total = sum(p.stat().st_size for p in world.data.rglob("*") if p.is_file())
    assert sum(t.bytes_transferred for t in new) == total
    assert world.globus.server.faults.injected() == 1


def test_rerun_waits_for_the_active_task_of_a_killed_run(world: World) -> None:  # noqa: F811
    assert world.globus.server is not None
    sim = globus_sim.state_of(world.globus.server.app)
    sim.hold.clear()  # tasks stay ACTIVE until released
    argv = world.argv(*world.globus_argv())
    argv[argv.index("-a") + 1] = str(world.tmp / "no-ascp")
    argv[argv.index("--transfers") + 1] = "1"
    argv[argv.index("-q")] = "--json"
    assert killed(["push", "empiar", *argv], None, lambda: sim.polled.wait(120))
    (first,) = sim.tasks.values()  # the first session's task, its id journaled before the wait
    assert only_job(world.journal)["state"] == "running"
    # the rerun (all sessions at once: whichever starts first) asks for that task's status: the request is
    # held at the simulator until the test has seen it; the task is still ACTIVE then
    faults = world.globus.server.faults
    asked = threading.Event()
    faults.on_stall.append(lambda _: asked.set())
    faults.add(f"GET /v0.10/task/{first.task_id} stall first=1")
    argv[argv.index("--transfers") + 1] = "3"
    rerun = subprocess.Popen([*CLI, "push", "empiar", *argv], text=True,  # the same deposition: the same job
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert asked.wait(120)
        assert first.status == "ACTIVE"
        request = urllib.request.Request(world.globus.url + "/_sim/faults", method="DELETE")
        with urllib.request.urlopen(request, timeout=30):  # the status request goes on (answered ACTIVE) ...
            pass
        _post(world.globus.url + "/_sim/globus", {"hold": False})  # ... and then the tasks may run
        out, err = rerun.communicate(timeout=180)
    finally:
        if rerun.poll() is None:
            rerun.kill()
            rerun.wait()
    assert rerun.returncode == 0, err
    assert ("info", f"waiting for Globus task {first.task_id}, started by an earlier run") in said_in(out)
    tasks = list(sim.tasks.values())
    assert all(t.status == "SUCCEEDED" for t in tasks)
    total = sum(p.stat().st_size for p in world.data.rglob("*") if p.is_file())
    assert sum(t.bytes_transferred for t in tasks) == total  # the earlier task's files were not sent again
    entry = world.only_entry()
    assert entry.submitted and tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    assert only_job(world.journal)["state"] == "done"


# -- the adapter's own refusals (no request is made) ----------------------------------------------------------
async def test_adapter_refuses_what_it_cannot_do(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    from asyncdepo.adapters.empiar import adapter as EA
    from asyncdepo.adapters.empiar.schema import Layout
    from asyncdepo.contract import Item

    dep = EA.Deposition({}, tmp_path / "d.json", Layout(tmp_path, "", (), ()))
    with pytest.raises(errors.UsageError) as info:
        EA.EmpiarAdapter(None, dep)
    assert str(info.value) == "EMPIAR needs ascp or a Globus endpoint (-g) to send the files"

    route = EA.GlobusRoute(GlobusClient(http, "globus-token"), SRC_EP, DEST_EP)
    adapter = EA.EmpiarAdapter(None, dep, globus=route, server="https://empiar.example/api/")
    lane = adapter.fallback()
    assert lane is not None and lane.describe() == adapter.describe() == f"https://empiar.example/api/ {dep.json_path}"
    item = Item(str(tmp_path / "f.mrc"), "f.mrc", 1, 0)
    for one in (adapter, lane):  # the engine sends EMPIAR's files in sessions only
        with pytest.raises(errors.UsageError) as info:
            await one.open_item(item, None)
        assert str(info.value) == "EMPIAR takes files in sessions (ascp or Globus), not one by one"


def test_builtin_adapters_load_without_the_optional_s3_dependency(tmp_path: Path) -> None:
    """aiobotocore (the ``s3`` extra) absent: every built-in scheme still registers (it is imported on first
    use only), so pushes to the other targets work."""
    code = ("import sys\nsys.modules['aiobotocore'] = None  # as if not installed: its import fails\n"
            "from asyncdepo import adapters\nprint(' '.join(adapters.schemes()))\n"
            "print(adapters.lookup('ftp'), adapters.lookup('s3') is not None)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["file s3 tus+http tus+https", "None True"]
