"""`asyncdepo push empiar` end to end: the CLI against the EMPIAR and Globus simulators and the stand-in ascp."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdepo.cli import empiar as cli
from asyncdepo.engine.journal import Journal
from asyncdepo.sim import empiar as empiar_sim
from asyncdepo.sim import globus as globus_sim
from asyncdepo.sim.datasets import make_png, sample_deposition
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import ThreadedSim

ASCP = shutil.which("asyncdepo-sim-ascp") or str(Path(sys.executable).parent / "asyncdepo-sim-ascp")
TRANSFER_PASS = "transfer-secret-3141"


def tree_md5(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class World:
    """Simulators in threads, a dataset, the environment and the argv of a deposition."""

    def __init__(self, tmp: Path, empiar: ThreadedSim, globus: ThreadedSim) -> None:
        self.tmp, self.empiar, self.globus = tmp, empiar, globus
        self.store = tmp / "store"
        self.data = tmp / "my data"  # a space: argv is a list, never a shell string
        self.journal = tmp / "journal.sqlite"
        self.json = tmp / "deposition.json"
        self.thumb = tmp / "thumb.png"
        self.counters = tmp / "ascp-counters.jsonl"

    @property
    def state(self) -> empiar_sim.EmpiarState:
        assert self.empiar.server is not None
        return empiar_sim.state_of(self.empiar.server.app)

    def argv(self, *extra: str) -> list[str]:
        return ["-a", ASCP, "--server", self.empiar.url, "--transfers", "2", "--journal", str(self.journal),
                "--rate", "2G", "--attempts", "2", "-q", *extra, "-", str(self.json), str(self.data)]

    def globus_argv(self) -> list[str]:
        return ["-g", globus_sim.LOCAL_ENDPOINT, "--globus-server", self.globus.url + "/v0.10",
                "--globus-poll", "0.02"]

    def sessions(self) -> list[dict[str, Any]]:
        if not self.counters.exists():
            return []
        return [json.loads(line) for line in self.counters.read_text().splitlines() if line.strip()]

    def only_entry(self) -> empiar_sim.Entry:
        assert len(self.state.entries) == 1
        return next(iter(self.state.entries.values()))

    def uploaded(self, entry: empiar_sim.Entry) -> Path:
        return self.state.upload_area(entry) / self.data.name


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    store = tmp_path / "store"
    globus_args = argparse.Namespace(token="globus-token", endpoint=[f"{globus_sim.LOCAL_ENDPOINT}=/"])
    with ThreadedSim(lambda: empiar_sim.build_app(store, FaultInjector(), None)) as empiar, \
            ThreadedSim(lambda: globus_sim.build_app(store, FaultInjector(), globus_args)) as globus:
        w = World(tmp_path, empiar, globus)
        for sub, sizes in (("micrographs", (300_000, 1_000_003, 7)), ("particles", (2_000_000, 65_536))):
            (w.data / sub).mkdir(parents=True)
            for i, size in enumerate(sizes):
                (w.data / sub / f"img {i}.mrc").write_bytes(hashlib.sha256(f"{sub}{i}".encode()).digest() * (size // 32)
                                                           + b"x" * (size % 32))
        (w.data / "README.txt").write_text("not in an image set, sent too\n")
        name = w.data.name
        w.json.write_text(json.dumps(sample_deposition(f"data/{name}/micrographs", f"/data/{name}/particles")))
        w.thumb.write_bytes(make_png(400, 400))
        for key, value in {"ASYNCDEPO_SIM_ASCP_ROOT": str(store), "ASYNCDEPO_SIM_ASCP_PASSWORD": TRANSFER_PASS,
                           "EMPIAR_TRANSFER_PASS": TRANSFER_PASS, "EMPIAR_TOKEN": "sim-token",
                           "GLOBUS_TRANSFER_TOKEN": "globus-token",
                           "ASYNCDEPO_SIM_ASCP_COUNTERS": str(w.counters)}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL", raising=False)
        yield w


def test_full_deposition_two_imagesets_in_parallel(world: World, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_MEET", "2")  # each session waits until two have started
    argv = world.argv("-e", str(world.thumb), "-gu", "alice:3", "-ge", "bob@example.org:2")
    argv[argv.index("-q")] = "--json"
    assert cli.push_main(argv) == 0
    entry = world.only_entry()
    assert entry.submitted and entry.empiar_id == f"EMPIAR-{10000 + entry.entry_id}"
    assert entry.thumbnail and entry.rights == {"alice": 3, "bob": 2}
    assert tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    # one ascp session per image set (+ one for the file outside them), each with the password it needs
    assert sorted(s["files"] for s in world.sessions()) == [1, 2, 3] and all(s["status"] == 0 for s in world.sessions())
    assert all(s["met"] for s in world.sessions())  # two sessions ran at once (--transfers 2)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    done = sorted(e["rel"] for e in events if e["event"] == "item_done")  # one event per file, as every push
    assert done == sorted(tree_md5(world.data))
    finished = next(e for e in events if e["event"] == "job_finished")["report"]
    assert finished["ok"] and finished["files_done"] == 6 and finished["files_failed"] == 0
    summary = finished["summary"]
    assert summary["empiar_id"] == entry.empiar_id and set(summary["via"].values()) == {"ascp"}
    assert TRANSFER_PASS not in json.dumps(events) and "sim-token" not in json.dumps(events)


def test_ascp_auth_failure_falls_back_to_globus(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "auth")
    assert cli.push_main(world.argv(*world.globus_argv())) == 0
    entry = world.only_entry()
    assert entry.submitted
    assert tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    sessions = world.sessions()
    # ascp did run and every session was refused (an empty list would pass all()); at most once per session:
    # after a refused password the later sessions go to Globus without trying ascp again
    assert 1 <= len(sessions) <= 3 and all(s["status"] != 0 for s in sessions), sessions
    assert world.globus.server is not None
    tasks = globus_sim.state_of(world.globus.server.app).tasks
    # one Globus task per session whose ascp was refused, each with checksum sync
    assert tasks and all(t.status == "SUCCEEDED" and t.sync_level == 3 for t in tasks.values())


def test_ascp_auth_failure_without_globus_is_permanent(world: World, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "auth")
    assert cli.push_main(world.argv("-s")) == 3
    err = capsys.readouterr().err
    assert "failed to authenticate" in err and TRANSFER_PASS not in err
    assert err.count("failed to authenticate") == 1, err  # said once
    # permanent: no retry although --attempts 2, and the job stops at the refusal (no session after it;
    # of the two sessions started at once, the second may be stopped before it ran ascp)
    assert 1 <= len(world.sessions()) <= 2 and all(s["status"] != 0 for s in world.sessions())
    assert not world.only_entry().submitted


def test_resumed_deposition_continues_where_it_stopped(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # first run: every session loses its connection after 400 kB, retries run out -> the files not sent
    # failed (exit 1, as any push with failed files)
    monkeypatch.setenv("ASYNCDEPO_SIM_ASCP_FAIL", "drop:400000")
    assert cli.push_main(world.argv()) == 1
    entry = world.only_entry()
    assert not entry.submitted and entry.redeposits == 0
    first = world.sessions()
    sent_first = sum(s["bytes"] for s in first)

    async def job_row() -> dict[str, Any]:
        journal = await Journal.open(world.journal)
        try:
            (job,) = await journal.jobs()
            row = await journal.job(job["id"])
            assert row is not None
            state = await journal.job_state(row["id"])
            assert (state["entry_id"], state["directory"], state["phase"]) == (entry.entry_id, entry.directory,
                                                                                "created")
            return row
        finally:
            await journal.close()

    row = anyio.run(job_row)
    assert row["kind"] == "empiar" and "sim-token" not in json.dumps(row)
    monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL")
    assert cli.resume_job(row) == 0
    entry = world.only_entry()  # the same entry, re-deposited, not a new one
    assert entry.submitted and entry.redeposits == 1
    assert tree_md5(world.uploaded(entry)) == tree_md5(world.data)
    second = world.sessions()[len(first):]
    total = sum(p.stat().st_size for p in world.data.rglob("*") if p.is_file())
    # the file outside the image sets went in the first run and is skipped; partial files resumed
    assert len(second) == 2 and any(s["resumed_from"] for s in second)
    assert sent_first + sum(s["bytes"] for s in second) < total + 2 * 400_000
    assert cli.push_main(world.argv()) == 4  # already submitted: refused, no second entry
    assert len(world.state.entries) == 1


def test_explicit_resume_option_redeposits(world: World) -> None:
    assert cli.push_main(world.argv("-s")) == 0
    entry = world.only_entry()
    assert cli.push_main(world.argv("--new", "-r", str(entry.entry_id), entry.directory)) == 0
    assert world.only_entry().submitted and world.only_entry().redeposits == 1


@pytest.mark.parametrize("case", ["json", "missing-set", "empty-set", "thumbnail", "rights", "two-owners", "ascp",
                                  "no-password", "globus-token"])
def test_checks_before_any_request(world: World, monkeypatch: pytest.MonkeyPatch, case: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    extra: list[str] = []
    name = world.data.name
    if case == "json":
        doc = sample_deposition(f"data/{name}/micrographs")
        doc["imagesets"][0]["voxel_type"] = "float"
        world.json.write_text(json.dumps(doc))
        expect = "imagesets[0].voxel_type"
    elif case == "missing-set":
        world.json.write_text(json.dumps(sample_deposition(f"data/{name}/micrographs", f"data/{name}/tomograms")))
        expect = "imagesets[1].directory"
    elif case == "empty-set":
        (world.data / "empty").mkdir()
        world.json.write_text(json.dumps(sample_deposition(f"data/{name}/empty")))
        expect = "holds no file"
    elif case == "thumbnail":
        world.thumb.write_bytes(make_png(399, 600))
        extra, expect = ["-e", str(world.thumb)], "399 x 600"
    elif case == "rights":
        extra, expect = ["-gu", "alice:3,bob"], "'bob' is not NAME:RIGHTS"
    elif case == "two-owners":
        extra, expect = ["-gu", "alice:1", "-ge", "bob@example.org:1"], "only one owner"
    elif case == "ascp":
        fake = world.tmp / "ascp"
        fake.write_text("#!/bin/sh\necho hello\nexit 1\n")
        fake.chmod(0o755)
        extra, expect = ["-a", str(fake)], "does not answer like ascp"
    elif case == "no-password":
        monkeypatch.delenv("EMPIAR_TRANSFER_PASS")
        expect = "EMPIAR_TRANSFER_PASS"
    else:
        monkeypatch.delenv("GLOBUS_TRANSFER_TOKEN")
        extra, expect = world.globus_argv(), "GLOBUS_TRANSFER_TOKEN"
    argv = world.argv()
    argv[:0] = extra  # a later -a wins in argparse: put the fake one last
    if case == "ascp":
        argv = world.argv(*extra)
    assert cli.push_main(argv) == 2
    assert expect in capsys.readouterr().err
    assert world.state.log == [] and world.sessions() == []


def test_parse_rights_and_resume_argv(world: World) -> None:
    assert cli.parse_rights("alice:2, bob@example.org:4", "-gu") == {"alice": "2", "bob@example.org": "4"}
    with pytest.raises(Exception, match="must be 1"):
        cli.parse_rights("alice:5", "-gu")
    args = cli.build_parser().parse_args(["-p", "hunter2", "-e", "t.png", "user", "d.json", "data"])
    stored = cli.resume_argv(args, world.journal)
    assert "hunter2" not in stored and stored[stored.index("-p") + 1] != "hunter2"
    assert stored[-3:] == ["user", str(Path("d.json").absolute()), str(Path("data").absolute())]
    args = cli.build_parser().parse_args(["secret-token", "d.json", "data"])
    assert "secret-token" not in cli.resume_argv(args, world.journal)
