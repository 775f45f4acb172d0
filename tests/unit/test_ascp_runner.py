"""The async ascp runner driving the stand-in ascp (``asyncdepo-sim-ascp``) as a real child process."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path

import anyio
import psutil
import pytest
from aiohttp import web

from asyncdepo import errors
from asyncdepo.sim.server import SimServer
from asyncdepo.transport.ascp.runner import (
    AscpOptions,
    AscpProgress,
    AscpSecrets,
    build_argv,
    check_ascp,
    run_once,
    transfer,
)
from asyncdepo.transport.pacer import Pacer, RetryEvent, RetryPolicy
from tests import requires
from tests.fakeclock import FakeClock

STANDIN = Path(requires.program("asyncdepo-sim-ascp", path_too=False))
PASSWORD = "pw-Secr3t-of-the-transfer"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in's server storage, with EMPIAR's upload/<DIR>/data already there."""
    storage = tmp_path / "server"
    (storage / "upload" / "ABC123" / "data").mkdir(parents=True)
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_ROOT", str(storage))
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_PASSWORD", PASSWORD)
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_COUNTERS", str(tmp_path / "counters.jsonl"))
    for name in ("ASYNCDEPO_SIM_ASCP_FAIL", "ASYNCDEPO_SIM_ASCP_TOKEN_URL", "ASPERA_SCP_PASS", "ASPERA_SCP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return storage


def make_set(base: Path, name: str, sizes: list[int]) -> Path:
    """An image set: files of ``sizes`` bytes (deterministic content), one in a subdirectory, names with spaces."""
    d = base / name
    for i, size in enumerate(sizes):
        p = d / ("sub dir" if i % 2 else "") / f"img {i:03d}.mrc"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes((i * 7 + j) % 251 for j in range(size)))
    return d


def opts(**kw: object) -> AscpOptions:
    base: dict[str, object] = {"ascp": str(STANDIN), "fair": True, "no_encryption": True, "rate": "200M",
                               "resume": 3, "stall_timeout": 30.0, "grace": 2.0}
    base.update(kw)
    return AscpOptions(**base)  # type: ignore[arg-type]


def counters(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "counters.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def by_file(events: list[AscpProgress]) -> dict[str, int]:
    sums: dict[str, int] = defaultdict(int)
    for e in events:
        sums[e.file] += e.delta
    return dict(sums)


def on_disk(top: Path, rel_to: Path) -> dict[str, int]:
    return {p.relative_to(rel_to).as_posix(): p.stat().st_size for p in top.rglob("*") if p.is_file()}


def no_policy_sleep() -> Pacer:
    return Pacer(RetryPolicy(base=1.0, cap=30.0), clock=FakeClock())


def standin_children() -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("asyncdepo-sim-ascp" in part for part in child.cmdline()):
                out.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- argv ------------------------------------------------------------------------------------------------

def test_argv_is_a_list_with_resume_and_no_secret() -> None:
    o = AscpOptions(rate="200M", fair=True, no_encryption=True, resume=3, udp_port=33001, key_file="/k ey")
    argv = build_argv(o, ["/data/my set's \"x\"", "-odd"], "emp_dep@hx-fasp-1.ebi.ac.uk:upload/D/data", token=True)
    assert argv[0] == "ascp" and ["-k", "3"] == argv[argv.index("-k"):argv.index("-k") + 2]
    assert argv[-3:] == ["/data/my set's \"x\"", "./-odd", "emp_dep@hx-fasp-1.ebi.ac.uk:upload/D/data"]
    assert ["-l", "200M"] == argv[argv.index("-l"):argv.index("-l") + 2] and "-Q" in argv and "-T" in argv
    assert "-W" not in argv and "-L-" in argv
    recv = build_argv(AscpOptions(host="aspera.immport.org", user="databrowser", mode="recv", resume=2),
                      [], ".", pair_list=Path("/tmp/pairs"), management_port=4567)
    assert "--mode=recv" in recv and "--host=aspera.immport.org" in recv and "--user=databrowser" in recv
    assert recv[-2:] == ["--file-pair-list=/tmp/pairs", "."] and ["-M", "4567"] == recv[recv.index("-M"):][:2]


@pytest.mark.parametrize("bad", [{"mode": "up"}, {"resume": 4}, {"rate": "fast"}, {"extra": ("-Wtok",)},
                                 {"policy": "greedy"}, {"tcp_port": 0}])
def test_argv_refuses_bad_options(bad: dict[str, object]) -> None:
    with pytest.raises(errors.UsageError):
        build_argv(AscpOptions(**bad), ["a"], "h:b")  # type: ignore[arg-type]


def test_argv_refuses_sources_and_a_list_together() -> None:
    with pytest.raises(errors.UsageError):
        build_argv(AscpOptions(), ["a"], "h:b", pair_list=Path("p"))
    with pytest.raises(errors.UsageError):
        build_argv(AscpOptions(), [], "h:b")


def test_check_ascp(tmp_path: Path) -> None:
    assert check_ascp(AscpOptions(ascp=str(STANDIN))) == str(STANDIN)
    with pytest.raises(errors.UsageError, match="not found"):
        check_ascp(AscpOptions(ascp=str(tmp_path / "no-ascp-here")))
    with pytest.raises(errors.UsageError, match="does not answer like ascp"):
        check_ascp(AscpOptions(ascp="true"))


# -- sessions against the stand-in -----------------------------------------------------------------------

@pytest.mark.parametrize("management", [False, True], ids=["console", "management-port"])
async def test_send_progress_adds_up_to_the_bytes_on_disk(tmp_path: Path, root: Path, management: bool) -> None:
    src = make_set(tmp_path / "local", "micrographs", [300_000, 5_000, 0, 20_000, 70_000])
    events: list[AscpProgress] = []
    result = await transfer(opts(management_port=management), [str(src)], "emp_dep@hx:upload/ABC123/data",
                            secrets=AscpSecrets(password=PASSWORD), on_progress=events.append)
    data = root / "upload" / "ABC123" / "data"
    landed = on_disk(data, data)
    assert landed == on_disk(src, src.parent)  # every file, same names (spaces and subdirectories)
    assert by_file(events) == landed  # the deltas of each file add up to its size on disk
    assert sorted(e.file for e in events if e.done) == sorted(landed)
    assert all((data / rel).read_bytes() == (src.parent / rel).read_bytes() for rel in landed)
    assert (result.files, result.attempts, result.partial) == (5, 1, False)
    if management:
        assert result.bytes == sum(landed.values())  # exact from the management frames
    assert counters(tmp_path)[-1]["bytes"] == sum(landed.values())


@pytest.mark.parametrize("management", [False, True], ids=["console", "management-port"])
async def test_dropped_connection_is_retried_and_only_the_tail_resent(tmp_path: Path, root: Path, management: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_set(tmp_path / "local", "set1", [600_000, 90_000])
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "drop:250000:once")
    retries: list[RetryEvent] = []
    events: list[AscpProgress] = []
    result = await transfer(opts(management_port=management), [str(src)], "emp_dep@hx:upload/ABC123/data",
                            secrets=AscpSecrets(password=PASSWORD), on_progress=events.append,
                            on_retry=retries.append, pacer=no_policy_sleep())
    assert result.attempts == 2 and len(retries) == 1
    assert isinstance(retries[0].error, errors.TransientError) and "Connection lost" in str(retries[0].error)
    first, second = counters(tmp_path)
    assert first["bytes"] == 250_000 and first["status"] == 1
    assert second["resumed_from"] == {"set1/img 000.mrc": 250_000}
    assert second["bytes"] == 690_000 - 250_000  # only the missing tail went again
    data = root / "upload" / "ABC123" / "data"
    assert on_disk(data, data) == on_disk(src, src.parent) == by_file(events)
    assert (data / "set1" / "img 000.mrc").read_bytes() == (src / "img 000.mrc").read_bytes()
    if management:
        assert "FASP error 16" in str(retries[0].error) and result.bytes == 690_000  # exact, both sessions


async def test_without_resume_a_rerun_starts_from_zero(tmp_path: Path, root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_set(tmp_path / "local", "set1", [600_000])
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "drop:250000:once")
    result = await transfer(opts(resume=0), [str(src)], "u@hx:upload/ABC123/data",
                            secrets=AscpSecrets(password=PASSWORD), pacer=no_policy_sleep())
    assert result.attempts == 2
    assert [c["bytes"] for c in counters(tmp_path)] == [250_000, 600_000]  # what -k 0 costs


@pytest.mark.parametrize("management", [False, True], ids=["console", "management-port"])
async def test_authentication_failure_is_permanent_and_secret_free(tmp_path: Path, root: Path,
                                                                   management: bool) -> None:
    src = make_set(tmp_path / "local", "set1", [1000])
    wrong = "not-" + PASSWORD
    with pytest.raises(errors.AuthError) as info:
        await transfer(opts(management_port=management), [str(src)], "emp_dep@hx:upload/ABC123/data", secrets=AscpSecrets(password=wrong),
                       pacer=no_policy_sleep())
    assert "failed to authenticate" in str(info.value)
    assert wrong not in info.value.describe() and PASSWORD not in info.value.describe()
    assert len(counters(tmp_path)) == 1  # permanent: no second session


async def test_no_server_is_transient_with_a_port_hint(tmp_path: Path, root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "noserver")
    src = make_set(tmp_path / "local", "set1", [10])
    seen: list[int] = []
    with pytest.raises(errors.TransientError) as info:
        await transfer(opts(), [str(src)], "u@hx:upload/ABC123/data", secrets=AscpSecrets(password=PASSWORD),
                       attempts=2, pacer=no_policy_sleep(), on_retry=lambda e: seen.append(e.attempt))
    assert "Failed to open TCP connection for SSH" in str(info.value) and "33001" in (info.value.hint or "")
    assert seen == [1]


async def test_missing_source_and_bad_flags_are_permanent(tmp_path: Path, root: Path) -> None:
    with pytest.raises(errors.PermanentError, match="No such file or directory"):
        await run_once(opts(), [str(tmp_path / "nothing")], "u@hx:upload/ABC123/data",
                       secrets=AscpSecrets(password=PASSWORD))
    with pytest.raises(errors.PermanentError, match="command line"):
        await run_once(opts(extra=("--bogus",)), [str(tmp_path)], "u@hx:upload/ABC123/data")


async def test_a_stall_is_stopped_and_reported_transient(tmp_path: Path, root: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "stall:100000")
    src = make_set(tmp_path / "local", "set1", [400_000])
    pids: list[int] = []

    def seen(_: AscpProgress) -> None:
        pids.extend(p.pid for p in standin_children())

    with pytest.raises(errors.TransientError, match="no progress for 1 s"):
        await run_once(opts(stall_timeout=1.0), [str(src)], "u@hx:upload/ABC123/data",
                       secrets=AscpSecrets(password=PASSWORD), on_progress=seen)
    assert pids and all(gone(pid) for pid in pids)
    assert counters(tmp_path)[-1]["bytes"] == 100_000  # it died by SIGTERM after the stall, as told
    assert (root / "upload" / "ABC123" / "data" / "set1" / "img 000.mrc.aspx").stat().st_size == 100_000


async def test_a_child_that_ignores_sigterm_is_killed(tmp_path: Path, root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "wedge")
    src = make_set(tmp_path / "local", "set1", [10])
    with pytest.raises(errors.TransientError, match="no progress"):
        await run_once(opts(stall_timeout=1.0, grace=0.2), [str(src)], "u@hx:upload/ABC123/data")
    assert standin_children() == []


async def test_cancel_mid_transfer_leaves_no_child_and_a_resumable_part(tmp_path: Path, root: Path) -> None:
    src = make_set(tmp_path / "local", "set1", [2_000_000])
    pids: list[int] = []
    with anyio.CancelScope() as scope:
        def first(_: AscpProgress) -> None:
            pids.extend(p.pid for p in standin_children())
            scope.cancel()

        await run_once(opts(rate="4M"), [str(src)], "u@hx:upload/ABC123/data",
                       secrets=AscpSecrets(password=PASSWORD), on_progress=first)
    assert scope.cancelled_caught
    assert pids and all(gone(pid) for pid in pids)
    assert standin_children() == []
    part = root / "upload" / "ABC123" / "data" / "set1" / "img 000.mrc.aspx"
    assert 0 < part.stat().st_size < 2_000_000  # what arrived stays for the next run's -k


async def test_the_password_travels_in_the_environment_only(tmp_path: Path, root: Path) -> None:
    src = make_set(tmp_path / "local", "set1", [400_000])
    seen: list[tuple[bytes, bytes]] = []
    with anyio.CancelScope() as scope:
        def look(_: AscpProgress) -> None:
            for child in standin_children():
                seen.append((Path(f"/proc/{child.pid}/cmdline").read_bytes(),
                             Path(f"/proc/{child.pid}/environ").read_bytes()))
            scope.cancel()

        await run_once(opts(rate="2M"), [str(src)], "u@hx:upload/ABC123/data",
                       secrets=AscpSecrets(password=PASSWORD), on_progress=look)
    assert seen
    for cmdline, environ in seen:
        assert PASSWORD.encode() not in cmdline and b"-k\x003" in cmdline
        assert f"ASPERA_SCP_PASS={PASSWORD}".encode() in environ.split(b"\x00")


async def test_recv_with_a_pair_list_and_a_token(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = root / "SDY1" / "ResultFiles" / "Flow_cytometry_result"
    study.mkdir(parents=True)
    for name, size in (("02054141.001.52628.fcs", 242_048), ("02054142.001.52644.fcs", 1_523_228)):
        (study / name).write_bytes(os.urandom(size))
    pairs = tmp_path / "pairs.txt"
    remote = ["/SDY1/ResultFiles/Flow_cytometry_result/02054141.001.52628.fcs",
              "/SDY1/ResultFiles/Flow_cytometry_result/02054142.001.52644.fcs"]
    pairs.write_text("".join(f"{r}\nSDY1/{Path(r).name}\n" for r in remote))
    checked: list[dict[str, object]] = []

    async def check(request: web.Request) -> web.Response:
        body = await request.json()
        checked.append(body)
        return web.json_response({"ok": True}, status=200 if body["token"] == "ATV3_good" else 401)

    app = web.Application()
    app.router.add_post("/_sim/aspera/check", check)
    out = tmp_path / "download"
    out.mkdir()
    o = opts(host="aspera.immport.org", user="databrowser", mode="recv", resume=2, udp_port=33001)
    async with SimServer(app) as server:
        monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_TOKEN_URL", f"{server.url}/_sim/aspera/check")
        for management in (False, True):
            events: list[AscpProgress] = []
            for f in out.rglob("*.fcs"):
                f.unlink()
            result = await transfer(dataclasses.replace(o, management_port=management), [], str(out),
                                    secrets=AscpSecrets(token="ATV3_good"), pair_list=pairs,
                                    on_progress=events.append)
            assert result.files == 2
            assert by_file(events) == {"SDY1/02054141.001.52628.fcs": 242_048, "SDY1/02054142.001.52644.fcs": 1_523_228}
            for r in remote:
                assert (out / "SDY1" / Path(r).name).read_bytes() == (root / r.lstrip("/")).read_bytes()
        with pytest.raises(errors.AuthError):
            await run_once(o, [], str(out), secrets=AscpSecrets(token="ATV3_forged"), pair_list=pairs)
    assert checked[0] == {"token": "ATV3_good", "paths": remote}


async def test_two_image_sets_at_once(tmp_path: Path, root: Path) -> None:
    sets = [make_set(tmp_path / "local", f"set{i}", [150_000 + i, 40_000, 3]) for i in (1, 2)]
    events: dict[str, list[AscpProgress]] = {s.name: [] for s in sets}
    results = {}

    async def send(s: Path, management: bool) -> None:
        results[s.name] = await transfer(opts(management_port=management), [str(s)], "u@hx:upload/ABC123/data",
                                         secrets=AscpSecrets(password=PASSWORD), on_progress=events[s.name].append)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, sets[0], False)
        tg.start_soon(send, sets[1], True)
    data = root / "upload" / "ABC123" / "data"
    for s in sets:
        assert by_file(events[s.name]) == on_disk(data / s.name, data) == on_disk(s, s.parent)
        assert results[s.name].files == 3
    assert len(counters(tmp_path)) == 2
