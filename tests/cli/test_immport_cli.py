"""``asyncdepo pull immport`` as a user runs it: a subprocess against the simulator (in a thread of this
process, so its counters are at hand), killed and re-run, with expiring tokens, corrupted files, a
wrong password, and the ascp route through the stand-in ascp."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport import IMMPORT_KEY, build_app
from asyncdepo.sim.immport_store import write_study
from asyncdepo.sim.server import ThreadedSim
from tests import requires

PASSWORD = "pa55-w0rd-xyz"
if importlib.util.find_spec("asyncdepo.cli.__main__") is not None:
    CLI = [sys.executable, "-m", "asyncdepo.cli"]
else:  # until the package has its __main__
    CLI = [sys.executable, "-c", "import sys; from asyncdepo.cli import main; sys.exit(main())"]
SIM_ASCP = shutil.which("asyncdepo-sim-ascp") or str(Path(sys.executable).parent / "asyncdepo-sim-ascp")


def _sim_args(**kw: Any) -> argparse.Namespace:
    base = {"user": [("alice", PASSWORD)], "token_lifetime": 60.0, "token_uses": None, "url_lifetime": 3600.0}
    return argparse.Namespace(**{**base, **kw})


def _http(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def _bytes_out(url: str) -> int:
    return sum(_http(f"{url}/_sim/stats")["bytes_out"].values())


def _env(tmp_path: Path, url: str, password: str = PASSWORD) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_"))}
    env.update(ASYNCDEPO_IMMPORT_PASSWORD=password, ASYNCDEPO_SIM_ASCP_ROOT=str(tmp_path / "store"),
               ASYNCDEPO_SIM_ASCP_TOKEN_URL=f"{url}/_sim/aspera/check",
               ASYNCDEPO_SIM_ASCP_COUNTERS=str(tmp_path / "ascp.jsonl"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    return env


def _pull(tmp_path: Path, url: str, *args: str, password: str = PASSWORD,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "pull", "immport", *args, "--server", url, "--user", "alice"],
                          env={**_env(tmp_path, url, password), **(env or {})}, capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)


def _on_disk(out: Path) -> int:
    """Bytes already fetched: complete files and partial ones (``*.asyncdepo-part``, ascp's ``*.aspx``)."""
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def _identical(store: Path, out: Path) -> None:
    for src in store.rglob("*.bin"):
        rel = src.relative_to(store)
        assert (out / rel).read_bytes() == src.read_bytes(), rel
    assert not [p for p in out.rglob("*") if p.name.endswith((".asyncdepo-part", ".aspx"))]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_study(root, "SDY1", 16, 5 << 19, per_dir=8)  # 16 x 2.5 MiB: partial files are likely when killed
    return root


def test_killed_pull_reruns_fetching_only_missing_bytes(tmp_path: Path, store: Path) -> None:
    total = sum(p.stat().st_size for p in store.rglob("*.bin"))
    out = tmp_path / "out"
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args(token_uses=6))) as sim:
        # 4 workers fetch one file at a time: when the 7th GET arrives, 3 files are complete; every
        # response then pauses mid-body, so the kill leaves complete and (most likely) partial files
        _http(f"{sim.url}/_sim/immport/hold", "POST", {"requests": 7})
        proc = subprocess.Popen([*CLI, "pull", "immport", "--study", "SDY1", str(out), "--server", sim.url,
                                 "--user", "alice", "--transfers", "4", "-q"], env=_env(tmp_path, sim.url),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert sim.server is not None
        held = sim.server.app[IMMPORT_KEY].held
        try:
            assert held.wait(timeout=60), "the pull never reached the hold point"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        _http(f"{sim.url}/_sim/immport/hold", "DELETE")
        kept = _on_disk(out)
        assert 3 * (5 << 19) <= kept < total
        _http(f"{sim.url}/_sim/reset", "POST")

        done = _pull(tmp_path, sim.url, "--study", "SDY1", str(out), "--json")
        assert done.returncode == 0, done.stderr
        assert _bytes_out(sim.url) == total - kept  # only the missing bytes crossed the wire
        finished = [json.loads(x) for x in done.stdout.splitlines() if '"job_finished"' in x][-1]["report"]
        assert finished["ok"] and finished["files_failed"] == 0
        assert finished["summary"]["logins"] >= 2  # tokens die after 6 calls: renewed mid-run
        stats = _http(f"{sim.url}/_sim/stats")
        assert stats["immport"]["token_expired"] >= 1
    _identical(store, out)


def test_corrupted_file_fails_the_run_and_is_listed(tmp_path: Path, store: Path) -> None:
    bad = store / "SDY1/ResultFiles/d01/file00009.bin"
    bad.with_name(bad.name + ".sim-md5").write_text("f" * 32)
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        res = _pull(tmp_path, sim.url, "/SDY1/ResultFiles/d01", str(tmp_path / "out"), "--request-attempts", "1",
                    "-q")
    assert res.returncode == 1
    assert "failed: SDY1/ResultFiles/d01/file00009.bin" in res.stderr and "md5 mismatch" in res.stderr
    assert "7 sent, 0 skipped, 1 failed" in res.stderr
    assert not (tmp_path / "out/SDY1/ResultFiles/d01/file00009.bin").exists()


def test_wrong_password_is_a_clear_message(tmp_path: Path, store: Path) -> None:
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        res = _pull(tmp_path, sim.url, "--study", "SDY1", str(tmp_path / "out"), password="not-it-42")
    assert res.returncode == 3
    assert "ImmPort login refused for user 'alice'" in res.stderr
    assert "invalid username or password" in res.stderr and "ASYNCDEPO_IMMPORT_PASSWORD" in res.stderr
    assert "not-it-42" not in res.stderr + res.stdout and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_ascp_route_interrupted_then_resumed(tmp_path: Path, store: Path) -> None:
    total = sum(p.stat().st_size for p in store.rglob("*.bin"))
    out = tmp_path / "out"
    cut = total // 2 + 12345  # mid-file
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        fault = {"ASYNCDEPO_SIM_ASCP_FAIL": f"drop:{cut}:once"}
        ascp = ("--via", "ascp", "--ascp", SIM_ASCP, "--aspera-host", "127.0.0.1", "-q")
        first = _pull(tmp_path, sim.url, "--study", "SDY1", str(out), *ascp, "--request-attempts", "1",
                      "--retries", "0", env=fault)
        assert first.returncode == 1, first.stderr
        assert "Connection lost" in first.stderr and "failed: SDY1/ResultFiles/" in first.stderr
        assert _on_disk(out) == cut
        second = _pull(tmp_path, sim.url, "--study", "SDY1", str(out), *ascp, env=fault)
        assert second.returncode == 0, second.stderr
    sessions = [json.loads(x) for x in (tmp_path / "ascp.jsonl").read_text().splitlines()]
    assert [s["bytes"] for s in sessions] == [cut, total - cut]  # the rerun moved only the missing bytes
    assert len(sessions[1]["resumed_from"]) == 1  # the file cut mid-way resumed (-k 2)
    _identical(store, out)


def test_usage_errors_exit_2(tmp_path: Path, store: Path) -> None:
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        no_ascp = _pull(tmp_path, sim.url, "--study", "SDY1", str(tmp_path / "o"), "--via", "ascp",
                        "--ascp", str(tmp_path / "nope"))
        nothing = _pull(tmp_path, sim.url, str(tmp_path / "o"))
    assert no_ascp.returncode == 2 and "ascp not found" in no_ascp.stderr
    assert nothing.returncode == 2 and "nothing to pull" in nothing.stderr


def test_stalled_ascp_is_killed_and_resumed_in_the_same_run(tmp_path: Path, store: Path) -> None:
    total = sum(p.stat().st_size for p in store.rglob("*.bin"))
    cut = total // 3 + 777
    with ThreadedSim(lambda: build_app(store, FaultInjector(), _sim_args())) as sim:
        res = _pull(tmp_path, sim.url, "--study", "SDY1", str(tmp_path / "out"), "--via", "ascp", "--ascp", SIM_ASCP,
                    "--aspera-host", "127.0.0.1", "--stall-timeout", "1", "-q",
                    env={"ASYNCDEPO_SIM_ASCP_FAIL": f"stall:{cut}:once"})
    assert res.returncode == 0, res.stderr
    assert "WARNING" not in res.stderr and "retrying" not in res.stderr, res.stderr  # -q: the retry is silent
    sessions = [json.loads(x) for x in (tmp_path / "ascp.jsonl").read_text().splitlines()]
    # the hung ascp was stopped (SIGTERM: it writes its counters then; a loaded machine may see it SIGKILLed at
    # the end of the grace before it did); the next session moved only the rest
    assert [s["bytes"] for s in sessions] in ([cut, total - cut], [total - cut])
    assert all(s["status"] != 0 for s in sessions[:-1]) and sessions[-1]["status"] == 0
    _identical(store, tmp_path / "out")


def test_https_pull_from_a_simulator_serving_tls(tmp_path: Path, store: Path) -> None:
    """The simulator as a user starts it with a certificate (``asyncdepo sim immport --tls-cert ...``); the
    pull trusts it through SSL_CERT_FILE, and refuses it, clearly and without retrying, when not told to."""
    requires.module("cryptography")
    from tests.tlscert import self_signed

    cert, key = self_signed(tmp_path)
    sim = subprocess.Popen([*CLI, "sim", "immport", "--port", "0", "--root", str(store), "--user",
                            f"alice:{PASSWORD}", "--tls-cert", str(cert), "--tls-key", str(key)],
                           stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()  # printed once it listens
        assert "listening on https://127.0.0.1:" in line, line
        url = line.split("listening on", 1)[1].split()[0]
        refused = _pull(tmp_path, url, "--study", "SDY1", str(tmp_path / "refused"), "--via", "https")
        assert refused.returncode != 0
        assert "TLS certificate is not trusted" in refused.stderr and "SSL_CERT_FILE" in refused.stderr
        assert "Traceback" not in refused.stderr
        res = _pull(tmp_path, url, "--study", "SDY1", str(tmp_path / "out"), "--via", "https",
                    env={"SSL_CERT_FILE": str(cert)})
        assert res.returncode == 0, res.stderr
        assert "16 sent, 0 skipped, 0 failed" in res.stderr
        _identical(store / "SDY1", tmp_path / "out" / "SDY1")
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(timeout=30)


def test_sim_tls_options_are_checked(tmp_path: Path) -> None:
    res = subprocess.run([*CLI, "sim", "immport", "--port", "0", "--root", str(tmp_path), "--tls-cert",
                          str(tmp_path / "missing.pem")], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, check=False)
    assert res.returncode != 0 and "--tls-cert and --tls-key go together" in res.stderr
    (tmp_path / "c.pem").write_text("not a certificate")
    res = subprocess.run([*CLI, "sim", "immport", "--port", "0", "--root", str(tmp_path), "--tls-cert",
                          str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "c.pem")], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert res.returncode != 0 and "cannot load the TLS certificate" in res.stderr
    assert "Traceback" not in res.stderr
