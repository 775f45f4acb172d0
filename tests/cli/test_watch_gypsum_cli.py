"""``asyncdepo push gypsum SRC P/A/V --watch`` as a process, against the gypsum simulator in its own thread:
kill -9 while a version is being uploaded, then the same command again completes that version without sending
a confirmed file again and without a second version for it; ``--metrics-port`` is scraped while the watch
runs and its counters match the report. The tests wait on the process's JSON events, never on time."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncdepo.cli import gypsum as gcli
from asyncdepo.cli import main as cli_main
from asyncdepo.sim import gypsum as gsim
from asyncdepo.sim.faults import FaultRule
from asyncdepo.sim.server import ThreadedSim
from tests.cli.test_watch_cli import GUARD, Watcher, _free_port, _one, _scrape

OWNER, ADMIN = "tok-owner", "tok-admin"
PUT = "PUT /s3/{key}"


@pytest.fixture
def tsim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadedSim]:
    with ThreadedSim(lambda: gsim.create_app(tmp_path / "tsim", identities={OWNER: "olivia", ADMIN: "root"},
                                             admins=["root"])) as server:
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_URL", server.url)
        monkeypatch.delenv("GITHUB_TOKEN", raising=False)
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", ADMIN)
        assert gcli.group_main(["create", "proj", "--owner", "olivia"]) == 0
        monkeypatch.setenv("ASYNCDEPO_GYPSUM_TOKEN", OWNER)
        yield server
        assert server.server is not None
        server.call(server.server.faults.release_stalls)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for w in made:
        w.kill()


def _bucket(tsim: ThreadedSim) -> Path:
    assert tsim.server is not None
    return tsim.server.app[gsim.STATE_KEY].bucket.root  # type: ignore[no-any-return]


def _manifest(tsim: ThreadedSim, version: str) -> dict[str, Any]:
    return orjson.loads((_bucket(tsim) / "proj/asset" / version / "..manifest").read_bytes())  # type: ignore[no-any-return]


def _arrive(src: Path, tmp_path: Path, name: str, files: dict[str, bytes]) -> None:
    """``files`` (under directory ``name``) appear at once: written aside, then renamed into the source."""
    aside = tmp_path / "aside" / name
    for rel, data in files.items():
        (aside / rel).parent.mkdir(parents=True, exist_ok=True)
        (aside / rel).write_bytes(data)
    os.rename(aside, src / name)


def _completed(version: str) -> Any:
    return lambda e: e["event"] == "message" and e["text"].startswith(f"version proj/asset/{version} completed")


def test_kill_9_mid_version_and_restart_completes_it_once(tmp_path: Path, tsim: ThreadedSim,
                                                          watchers: list[Watcher]) -> None:
    assert tsim.server is not None
    faults, state = tsim.server.faults, tsim.server.app[gsim.STATE_KEY]
    src, journal = tmp_path / "beam", tmp_path / "journal.sqlite"
    src.mkdir()
    wave1 = {f"f{i}.bin": os.urandom(20_000 + i) for i in range(3)}
    _arrive(src, tmp_path, "w1", wave1)
    head = ["gypsum", str(src), "proj/asset/run"]
    w = Watcher(head, journal, "--transfers", "2")
    watchers.append(w)
    w.until(_completed("run"), "the first version")
    # the second wave: one file's PUT is held; the others are confirmed; then the watcher is killed
    held = threading.Event()
    faults.on_stall.append(lambda n: held.set())
    tsim.call(lambda: faults.add(FaultRule("stall", method="PUT", path="/s3/proj/asset/run-2/w2/f5.bin")))
    wave2 = {f"f{i}.bin": os.urandom(10_000 + i) for i in range(6)}
    _arrive(src, tmp_path, "w2", wave2)
    w.done({f"w2/f{i}.bin" for i in range(5)})
    assert held.wait(GUARD), "the held PUT never came"  # a guard, not a wait for work
    w.proc.send_signal(signal.SIGKILL)
    w.kill()
    bucket = _bucket(tsim)
    assert (bucket / "proj/..LOCK").exists()  # a killed watcher cleans up nothing
    assert "upload_finish" not in orjson.loads((bucket / "proj/asset/run-2/..summary").read_bytes())

    # while it is down a new file arrives; then the same command again
    late = os.urandom(7_000)
    (src / "late.bin").write_bytes(late)
    tsim.call(faults.release_stalls)
    tsim.call(faults.clear)
    tsim.call(faults.reset_counters)
    tsim.call(state.counters.clear)
    w2 = Watcher(head, journal, "--transfers", "2")
    watchers.append(w2)
    w2.until(_completed("run-2"), "the interrupted version completed")
    w2.until(_completed("run-3"), "the next version")
    rc, report = w2.stop()
    assert rc == 0, w2.proc.stderr.read() if w2.proc.stderr else ""
    assert report["ok"] and report["files_done"] == 2 and report["files_failed"] == 0
    # only the held file and the new one crossed the wire; run-2 was resumed, not started again
    assert faults.bytes_in[PUT] == len(wave2["f5.bin"]) + len(late)
    assert state.counters["starts"] == 1 and state.counters["completes"] == 2
    assert sorted(p.name for p in (bucket / "proj/asset").iterdir() if p.is_dir()) == ["run", "run-2", "run-3"]
    assert not (bucket / "proj/..LOCK").exists()
    everything = {**{f"w1/{r}": d for r, d in wave1.items()}, **{f"w2/{r}": d for r, d in wave2.items()}}
    assert set(_manifest(tsim, "run-2")) == set(everything)
    assert set(_manifest(tsim, "run-3")) == {*everything, "late.bin"}
    assert orjson.loads((bucket / "proj/asset/..latest").read_bytes())["version"] == "run-3"
    for rel, data in wave2.items():
        assert (bucket / "proj/asset/run-2/w2" / rel).read_bytes() == data
    assert (bucket / "proj/asset/run-3/late.bin").read_bytes() == late


def test_metrics_while_watching_into_gypsum(tmp_path: Path, tsim: ThreadedSim, watchers: list[Watcher]) -> None:
    assert tsim.server is not None
    faults = tsim.server.faults
    src, journal = tmp_path / "beam", tmp_path / "journal.sqlite"
    src.mkdir()
    files = {f"f{i}.raw": os.urandom(30_000 + i) for i in range(4)}
    _arrive(src, tmp_path, "d", files)
    tsim.call(lambda: faults.add("PUT /s3/* status=503 first=2"))  # retried, reason 5xx
    port = _free_port()
    w = Watcher(["gypsum", str(src), "proj/asset/run"], journal, "--metrics-port", str(port))
    watchers.append(w)
    w.until(_completed("run"), "the first version")
    snap = w.until(lambda e: e["event"] == "snapshot" and e["files_done"] == len(files), "a snapshot of all")
    m = _scrape(port)
    assert _one(m, "asyncdepo_files_sent_total") == snap["files_done"] == len(files)
    assert _one(m, "asyncdepo_bytes_done_total") == sum(map(len, files.values()))
    # on the wire: every file, and the bodies of the two PUTs answered 503 (retried)
    assert _one(m, "asyncdepo_bytes_sent_total") == snap["bytes_sent"] == faults.bytes_in[PUT]
    assert m["asyncdepo_retries_total"][(("reason", "5xx"),)] == snap["retries_by_reason"]["5xx"] == 2
    assert _one(m, "asyncdepo_files_failed_now") == 0 and _one(m, "asyncdepo_files_in_flight") == 0
    assert _one(m, "asyncdepo_watch_pending_files") == 0 and _one(m, "asyncdepo_watch_scans_total") >= 1
    assert _one(m, "asyncdepo_last_success_timestamp_seconds") > 0
    rc, report = w.stop()
    assert rc == 0
    assert report["files_done"] == _one(m, "asyncdepo_files_sent_total")
    assert report["bytes_sent"] == _one(m, "asyncdepo_bytes_sent_total")
    assert report["retries"] == sum(m["asyncdepo_retries_total"].values())
    with pytest.raises(OSError):  # the endpoint is gone with the command
        _scrape(port)


def test_watch_options_that_do_not_apply_to_gypsum(tmp_path: Path, tsim: ThreadedSim,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    base = ["push", "gypsum", str(tmp_path / "d"), "proj/asset/run", "--watch"]
    assert cli_main([*base, "--probation"]) == 2
    assert "--probation does not apply to --watch" in capsys.readouterr().err
    assert cli_main([*base, "--local-cluster", "2"]) == 2
    assert "cannot be spread over a cluster" in capsys.readouterr().err
    assert cli_main([*base, "--compress", "zstd"]) == 2
    assert not (_bucket(tsim) / "proj/asset").exists()
    shutil.rmtree(tmp_path / "d")


def test_sigterm_mid_version_lets_it_complete(tmp_path: Path, tsim: ThreadedSim, watchers: list[Watcher]) -> None:
    assert tsim.server is not None
    faults = tsim.server.faults
    src, journal = tmp_path / "beam", tmp_path / "journal.sqlite"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(5_000 + i) for i in range(4)}
    held = threading.Event()
    faults.on_stall.append(lambda n: held.set())
    tsim.call(lambda: faults.add(FaultRule("stall", method="PUT", path="/s3/proj/asset/run/d/f3.bin")))
    _arrive(src, tmp_path, "d", files)
    w = Watcher(["gypsum", str(src), "proj/asset/run"], journal)
    watchers.append(w)
    w.done({f"d/f{i}.bin" for i in range(3)})
    assert held.wait(GUARD), "the held PUT never came"  # a guard, not a wait for work
    w.proc.send_signal(signal.SIGTERM)
    w.until(lambda e: e["event"] == "message" and e["text"].startswith("stopping"), "the stop")
    tsim.call(faults.release_stalls)  # the held file goes on: the version is completed, then the watcher ends
    w.until(_completed("run"), "the version completed")
    finished = w.until(lambda e: e["event"] == "job_finished", "job_finished")
    assert w.proc.wait(timeout=GUARD) == 0
    assert finished["report"]["ok"] and finished["report"]["files_done"] == len(files)
    assert not (_bucket(tsim) / "proj/..LOCK").exists()
    assert set(_manifest(tsim, "run")) == {f"d/{r}" for r in files}
