"""End to end through the CLI (`asyncdepo.cli.main`, in process or as a subprocess) against the PDIS simulator.

Each test asserts real outcomes: the archive stored on the simulator's disk (md5 equal to the md5 of the tar
asyncdepo built, members equal to the source files), the number of submissions and of upload requests,
exit statuses and the messages a person reads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncdepo.cli import main
from asyncdepo.sim import pdis as simpdis
from asyncdepo.sim.faults import FaultInjector, FaultRule
from asyncdepo.sim.server import ThreadedSim

ALICE, BOB = "alice@lab.edu:alicepw", "bob@lab.edu:bobpw"
UPLOAD = "POST /api/v1/upload/"
SUBMIT = "POST /api/v1/submit/"
REPO = Path(__file__).resolve().parents[2]


class Sim:
    """A ThreadedSim plus views of its state for assertions."""

    def __init__(self, threaded: ThreadedSim) -> None:
        self.threaded = threaded
        assert threaded.server is not None
        self.server = threaded.server
        self.url = threaded.url

    @property
    def state(self) -> simpdis.PdisState:
        return self.server.app[simpdis.PDIS_STATE]

    @property
    def faults(self) -> FaultInjector:
        return self.server.faults

    def submissions(self, owner: str = "alice@lab.edu") -> list[simpdis.Submission]:
        return [s for s in list(self.state.submissions.values()) if s.owner == owner]

    def archive(self, sub: simpdis.Submission) -> Path:
        return self.state.archive_path(sub)

    def token_of(self, user: str) -> str:
        email = user.split(":")[0]
        return self.state.token_for(email)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    args = argparse.Namespace(status_delay=0, user=[ALICE, BOB])
    with ThreadedSim(lambda: simpdis.build_app(tmp_path / "simroot", FaultInjector(), args)) as threaded:
        yield Sim(threaded)


@pytest.fixture
def env(sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Isolated config/state dirs, the simulator as server, alice's token in the environment."""
    values = {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "ASYNCDEPO_PDIS_SERVER": sim.url,
        "ASYNCDEPO_PDIS_TOKEN": sim.token_of(ALICE),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in ("ASYNCDEPO_PDIS_PASSWORD", "ASYNCDEPO_PDIS_EMAIL", "ASYNCDEPO_COMPRESS"):
        monkeypatch.delenv(key, raising=False)
    return values


def detector_frame(i: int, size: int = 120_000) -> bytes:
    """A CBF-like frame: header, then low-count 16-bit pixels with some noise (compresses ~4-6x)."""
    head = f"###CBF: VERSION 1.5\r\n# Detector: PILATUS\r\n# Frame {i}\r\n".encode()
    noise = hashlib.sha256(str(i).encode()).digest() * (size // 64)
    body = bytes(b & 0x03 for b in noise[: size // 2]) + os.urandom(size // 8)
    return head + body


def make_dataset(parent: Path, name: str, frames: int = 3, images: bool = True) -> Path:
    d = parent / name
    (d / "sub").mkdir(parents=True)
    for i in range(frames):
        target = d / ("sub" if i % 2 else "") / (f"{name}_{i:04d}.cbf" if images else f"blob_{i}.bin")
        target.write_bytes(detector_frame(i))
    (d / "notes.txt").write_text("collected at 100 K\n")
    return d


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def results(out: str) -> dict[str, dict[str, Any]]:
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["dataset"]: r for r in lines if r.get("event") == "pdis_result"}


def assert_stored_matches(sim: Sim, dataset: Path, reported_md5: str) -> simpdis.Submission:
    """Exactly one submission holds this dataset; its stored tar is the one asyncdepo built and holds the files."""
    subs = [s for s in sim.submissions() if s.original_filename == dataset.name + ".tar"]
    assert len(subs) == 1, [s.original_filename for s in sim.submissions()]
    sub = subs[0]
    stored = sim.archive(sub)
    assert hashlib.md5(stored.read_bytes()).hexdigest() == reported_md5 == sub.md5hash
    with tarfile.open(stored) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    expected = {f"{dataset.name}/{p.relative_to(dataset).as_posix()}": p.read_bytes()
                for p in dataset.rglob("*") if p.is_file()}
    assert members == expected
    return sub


# -- login --------------------------------------------------------------------------------------------------
def test_login_stores_token_0600(sim: Sim, env: dict[str, str], capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCDEPO_PDIS_TOKEN")
    monkeypatch.setenv("ASYNCDEPO_PDIS_PASSWORD", "wrong")
    code, _, err = run_cli(capsys, "login", "pdis", "--email", "alice@lab.edu")
    assert code == 3 and "HTTP 401" in err and "wrong" not in err
    # it says which credentials were refused and where the password came from, not "the API token"
    assert "refused the email or the password" in err and "$ASYNCDEPO_PDIS_PASSWORD" in err
    assert "API token" not in err
    monkeypatch.setenv("ASYNCDEPO_PDIS_PASSWORD", "alicepw")
    code, _, err = run_cli(capsys, "login", "pdis", "--email", "alice@lab.edu")
    assert code == 0, err
    path = Path(env["XDG_CONFIG_HOME"]) / "asyncdepo" / "pdis-token"
    assert path.stat().st_mode & 0o777 == 0o600
    token = sim.token_of(ALICE)
    assert orjson.loads(path.read_bytes()) == {sim.url + "/api/v1/": token}
    assert token not in err and "alicepw" not in err
    # the stored token is used when the environment has none
    code, out, err = run_cli(capsys, "pdis", "submissions")
    assert (code, out.strip()) == (0, "no submissions"), err


# -- push ---------------------------------------------------------------------------------------------------
def test_multi_dataset_push_wait_published(sim: Sim, env: dict[str, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "data"
    sets = [make_dataset(parent, "1abc_lysozyme"), make_dataset(parent, "2def_thaumatin", frames=4)]
    code, out, err = run_cli(capsys, "push", "pdis", "--each", str(parent), "--pdb", "auto", "--wait",
                             "--poll-interval", "0", "--json", "--synchrotron-id", "25", "--beamline-id", "42")
    assert code == 0, err
    res = results(out)
    assert set(res) == {"1abc_lysozyme", "2def_thaumatin"}
    for ds in sets:
        r = res[ds.name]
        assert r["status"] == "published" and r["exit"] == 0
        sub = assert_stored_matches(sim, ds, r["md5"])
        assert sub.pdbid == ds.name[:4].upper() and sub.beamline_id == 42
        assert sim.state.status(sub) == "published"
    assert sim.faults.requests[UPLOAD] == 2 and sim.faults.requests[SUBMIT] == 2
    # every dataset had its own progress events
    tagged = {orjson.loads(line).get("dataset") for line in out.splitlines() if line.startswith("{")}
    assert tagged >= {"1abc_lysozyme", "2def_thaumatin"}
    # a second run finds both jobs done: nothing uploaded or submitted again
    code, out, err = run_cli(capsys, "push", "pdis", "--each", str(parent), "--pdb", "auto", "--json",
                             "--synchrotron-id", "25", "--beamline-id", "42")
    assert code == 0, err
    assert sim.faults.requests[UPLOAD] == 2 and sim.faults.requests[SUBMIT] == 2
    assert len(sim.submissions()) == 2


@pytest.mark.parametrize("rule", [
    FaultRule(kind="drop", method="POST", path="/api/v1/upload/", after=30_000, first=1),
    FaultRule(kind="status", method="POST", path="/api/v1/upload/", status=503, first=2),
    FaultRule(kind="status", method="POST", path="/api/v1/upload/", status=503, retry_after=0, first=1),
], ids=["drop", "503x2", "503-retry-after"])
def test_faults_mid_upload_one_submission(sim: Sim, env: dict[str, str], tmp_path: Path, rule: FaultRule,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "3ghi_sample", frames=5)
    sim.threaded.call(lambda: sim.faults.add(rule))
    code, out, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "3GHI", "--json", "--wait",
                             "--poll-interval", "0")
    assert code == 0, err
    r = results(out)["3ghi_sample"]
    assert_stored_matches(sim, ds, r["md5"])
    assert r["status"] == "published"
    assert rule.hits == rule.first and sim.faults.requests[UPLOAD] == rule.first + 1
    assert list((sim.state.root / "incoming").iterdir()) == []
    if rule.kind == "drop":
        assert sim.faults.bytes_in[UPLOAD] > rule.after  # the whole body went again after the drop


def test_lost_upload_response_409_absorbed(sim: Sim, env: dict[str, str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "4jkl_lost")
    sim.state.lose_upload_responses = 1
    code, out, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "4JKL", "--json")
    assert code == 0, err
    r = results(out)["4jkl_lost"]
    sub = assert_stored_matches(sim, ds, r["md5"])
    assert r["token"] == sub.token and sim.state.status(sub) == "submitted"
    assert sim.faults.requests[UPLOAD] == 2  # the retry met 409 (duplicate hash) and carried on
    assert "already had this archive" in out


def test_crash_between_upload_and_submit(sim: Sim, env: dict[str, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "5mno_crash")
    held = threading.Event()
    sim.faults.on_stall.append(lambda n: held.set())
    sim.threaded.call(lambda: sim.faults.add(FaultRule(kind="stall", method="POST", path="/api/v1/submit/")))
    child_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    entry = "import sys; from asyncdepo.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", entry, "push", "pdis", str(ds), "--pdb", "5MNO", "--quiet"], cwd=REPO, env=child_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        # woken by the simulator when the submit is being held (the timeout only guards against a hang)
        assert held.wait(timeout=60), "the push never reached submit/"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    sim.threaded.call(sim.faults.clear)
    sim.threaded.call(sim.faults.release_stalls)
    [sub] = sim.submissions()
    assert sim.state.status(sub) == "uploaded"
    sent = sim.faults.bytes_in[UPLOAD]
    code, out, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "5MNO", "--json")
    assert code == 0, err
    r = results(out)["5mno_crash"]
    assert r["token"] == sub.token and sim.state.status(sub) == "submitted"
    assert sim.faults.requests[UPLOAD] == 1 and sim.faults.bytes_in[UPLOAD] == sent  # nothing uploaded again
    assert len(sim.submissions()) == 1
    assert_stored_matches(sim, ds, r["md5"])


@pytest.mark.parametrize("flags, field", [
    ([], "pdb_code"),
    (["--pdb", "12345"], "pdb_code"),
    (["--pdb", "1AB"], "pdb_code"),
    (["--dataset-type", "other", "--title", "too short", "--authors", "A.", "--equipment-other", "x"],
     "project_title"),
    (["--dataset-type", "other", "--title", "A long enough title", "--equipment-other", "x"], "project_authors"),
    (["--dataset-type", "other", "--title", "A long enough title", "--authors", "Doe A."], "equipment_other"),
    (["--pdb", "1ABC", "--synchrotron-id", "25"], "beamline_id"),
    (["--pdb", "1ABC", "--synchrotron-id", "99", "--beamline-id", "1"], "synchrotron_id"),
    (["--pdb", "1ABC", "--synchrotron-id", "25", "--beamline-id", "17"], "beamline_id"),
])
def test_invalid_metadata_refused_before_upload(sim: Sim, env: dict[str, str], tmp_path: Path, flags: list[str],
                                                field: str, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "6pqr_meta", frames=1)
    code, _, err = run_cli(capsys, "push", "pdis", str(ds), *flags)
    assert code == 2, err
    assert f"error: {field}:" in err
    assert sim.faults.requests[UPLOAD] == 0 and sim.submissions() == []


def test_other_dataset_type_accepted(sim: Sim, env: dict[str, str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "run_other", frames=2)
    code, _, err = run_cli(capsys, "push", "pdis", str(ds), "--dataset-type", "other", "--title",
                             "Fragment screen of protein X", "--authors", "Doe A., Roe B.", "--equipment-other",
                             "home source", "--json")
    assert code == 0, err
    [sub] = sim.submissions()
    assert sub.dataset_type == "other" and sub.project_title == "Fragment screen of protein X" and sub.pdbid is None


def test_no_images_error_no_data(sim: Sim, env: dict[str, str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "7stu_empty", images=False)
    code, out, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "7STU", "--wait", "--poll-interval", "0")
    assert code == 4, err
    assert "error_no_data: no diffraction images found in the archive" in err
    assert "next: delete it (asyncdepo pdis delete TOKEN) and upload a corrected archive" in err
    [sub] = sim.submissions()
    assert sim.state.status(sub) == "error_no_data"
    code, out, err = run_cli(capsys, "pdis", "status", sub.token)
    assert code == 4 and "error_no_data" in out and "details: no diffraction images" in out
    code, out, err = run_cli(capsys, "pdis", "delete", sub.token)
    assert code == 0 and sub.token in out
    assert sim.submissions() == [] and not sim.archive(sub).exists()


def test_401_and_403(sim: Sim, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_dataset(tmp_path, "8vwx_auth", frames=1)
    monkeypatch.setenv("ASYNCDEPO_PDIS_TOKEN", "0" * 40)
    code, _, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "8VWX")
    assert code == 3
    assert "HTTP 401: PDIS refused the API token" in err and "asyncdepo login pdis" in err
    assert sim.faults.requests[UPLOAD] == 0
    monkeypatch.delenv("ASYNCDEPO_PDIS_TOKEN")
    code, _, err = run_cli(capsys, "pdis", "submissions")
    assert code == 3 and "no PDIS API token" in err and "login pdis" in err
    # bob uploads; alice may not look at, delete or submit it
    monkeypatch.setenv("ASYNCDEPO_PDIS_TOKEN", sim.token_of(BOB))
    assert run_cli(capsys, "push", "pdis", str(ds), "--pdb", "8VWX")[0] == 0
    [bob_sub] = sim.submissions("bob@lab.edu")
    monkeypatch.setenv("ASYNCDEPO_PDIS_TOKEN", sim.token_of(ALICE))
    for argv in (["status", bob_sub.token], ["delete", bob_sub.token]):
        code, _, err = run_cli(capsys, "pdis", *argv)
        assert code == 3 and f"HTTP 403: submission {bob_sub.token} belongs to another account" in err
    assert sim.submissions("bob@lab.edu") == [bob_sub]


def test_group_commands(sim: Sim, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = make_dataset(tmp_path, "9yza_group", frames=1)
    code, out, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "9YZA", "--json")
    assert code == 0, err
    token = results(out)["9yza_group"]["token"]
    code, out, _ = run_cli(capsys, "pdis", "delete", token)
    assert code == 4  # submitted is not deletable
    code, out, err = run_cli(capsys, "pdis", "status", token, "--wait", "--poll-interval", "0")
    assert code == 0 and "published: data publicly accessible" in err and "md5" in out
    code, out, _ = run_cli(capsys, "pdis", "submissions", "--json")
    assert [s["token"] for s in orjson.loads(out)] == [token]
    code, out, _ = run_cli(capsys, "pdis", "submissions")
    assert token in out and "published" in out
    code, out, _ = run_cli(capsys, "pdis", "equipment")
    assert code == 0 and "APS" in out and "24-ID-C" in out
    code, out, _ = run_cli(capsys, "pdis", "equipment", "--json")
    assert any(s["short"] == "APS" for s in orjson.loads(out))
    code, out, err = run_cli(capsys, "pdis", "status", "f" * 40)
    assert code == 4 and "HTTP 404" in err
    # options before or after the command
    code, out, _ = run_cli(capsys, "pdis", "--json", "submissions", "--server", sim.url)
    assert code == 0 and [s["token"] for s in orjson.loads(out)] == [token]
    code, out, err = run_cli(capsys, "pdis", "--server", "http://127.0.0.1:9/api/v1/", "equipment",
                             "--server", sim.url)
    assert code == 0 and "APS" in out, err


def test_body_damaged_in_transit_is_sent_again_with_a_fresh_read(
        sim: Sim, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One bit flipped in the first upload's body (as a bad NIC or proxy would): the server answers 400
    "corrupt zstd stream", which is an integrity failure of that request, not a refusal of the dataset; the
    upload is built and sent again and the dataset is stored whole, once."""
    from asyncdepo.transport.httpbody import Outlet  # every request body is written through it

    ds = make_dataset(tmp_path, "5mno_flip", frames=6)
    real = Outlet.send
    flipped = [0]

    async def flip_once(self: Outlet, data: Any) -> None:
        if not flipped[0] and len(data) > 4096:  # inside the zstd stream of the first body only
            flipped[0] += 1
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x10
            data = bytes(damaged)
        await real(self, data)

    monkeypatch.setattr(Outlet, "send", flip_once)
    code, out, err = run_cli(capsys, "push", "pdis", str(ds), "--pdb", "5MNO", "--json")
    assert code == 0, err
    assert assert_stored_matches(sim, ds, results(out)["5mno_flip"]["md5"])
    assert sim.faults.requests[UPLOAD] == 2 and flipped[0] == 1
    retried = [orjson.loads(line) for line in out.splitlines() if '"item_retrying"' in line]
    assert len(retried) == 1 and "corrupt zstd stream" in retried[0]["error"]
