"""Fidelity: the official ``empiar-depositor`` (PyPI, 1.6b30) deposits into our EMPIAR simulator.

The client's hidden ``-dl`` flag points it at ``https://127.0.0.1:8001`` and its upload folder at
``tmp/andrii``; so the simulator is served over TLS on that port with a certificate made here, and the client
is told to skip verification with its ``-i`` flag. It shells out to ascp: ``-a`` names the stand-in
(``asyncdepo-sim-ascp``, whose name ends in ``ascp`` as the client demands), which writes into the
simulator's storage through ``ASYNCDEPO_SIM_ASCP_ROOT``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from tests import requires

requires.module("empiar_depositor")
requires.module("cryptography")
from aiohttp import web

from asyncdepo.sim import empiar as empiar_sim
from asyncdepo.sim.datasets import make_png
from asyncdepo.sim.faults import FaultInjector
from tests.tlscert import self_signed

PORT = 8001
BIN = Path(sys.executable).parent
DEPOSITOR = shutil.which("empiar-depositor") or str(BIN / "empiar-depositor")
ASCP = shutil.which("asyncdepo-sim-ascp") or str(BIN / "asyncdepo-sim-ascp")
API = "/empiar/deposition/api/"


class TlsSim:
    """The EMPIAR simulator on https://127.0.0.1:8001 in a thread of its own."""

    def __init__(self, app: web.Application, context: ssl.SSLContext) -> None:
        self.app, self.context = app, context
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop_event: asyncio.Event | None = None

    def _run(self) -> None:
        async def main() -> None:
            self.stop_event = asyncio.Event()
            runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", PORT, ssl_context=self.context).start()
            except OSError as exc:  # reported to the starting thread (port in use, ...)
                self.error = exc
                self.ready.set()
                await runner.cleanup()
                return
            self.ready.set()
            await self.stop_event.wait()
            await runner.cleanup()

        self.loop.run_until_complete(main())
        self.loop.close()

    def __enter__(self) -> Self:
        self.thread.start()
        self.ready.wait(30)
        if isinstance(self.error, OSError) and self.error.errno == errno.EADDRINUSE:
            pytest.skip(f"port {PORT} (the client's -dl server) is in use")
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


def example_json(data_name: str) -> dict[str, Any]:
    """The client's own example deposition, pointed at our two image sets."""
    from importlib import resources

    text = (resources.files("empiar_depositor") / "tests/deposition_json/working_example.json").read_text()
    doc = json.loads(text)
    first = doc["imagesets"][0]
    doc["imagesets"] = [{**first, "name": "micrographs", "directory": f"/data/{data_name}/micrographs"},
                        {**first, "name": "tilt series", "directory": f"/data/{data_name}/tilts"}]
    return doc  # type: ignore[no-any-return]


def tree_md5(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[empiar_sim.EmpiarState, Path]]:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    args = argparse.Namespace(token=["fidelity-token=depositor"], user=list(empiar_sim.DEFAULT_USERS),
                              upload_prefix="tmp/andrii")
    app = empiar_sim.build_app(tmp_path / "store", FaultInjector(), args)
    with TlsSim(app, context):
        yield empiar_sim.state_of(app), cert


def run_depositor(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DEPOSITOR, *argv], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)


def test_reference_client_deposits_into_simulator(served: tuple[empiar_sim.EmpiarState, Path],
                                                  tmp_path: Path) -> None:
    state, _ = served
    data = tmp_path / "dataset"  # no space: the reference client builds a shell string
    for sub, count in (("micrographs", 3), ("tilts", 2)):
        (data / sub).mkdir(parents=True)
        for i in range(count):
            (data / sub / f"{sub}_{i}.mrc").write_bytes(os.urandom(50_000 + 12_345 * i))
    deposition = tmp_path / "deposition.json"
    deposition.write_text(json.dumps(example_json(data.name)))
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(make_png(400, 512))
    env = {**os.environ, "ASYNCDEPO_SIM_ASCP_ROOT": str(state.root), "ASYNCDEPO_SIM_ASCP_PASSWORD": "aspera-pw",
           "EMPIAR_TRANSFER_PASS": "aspera-pw", "PYTHONWARNINGS": "ignore"}
    env.pop("ASYNCDEPO_SIM_ASCP_FAIL", None)

    # 1: token auth, thumbnail, ascp upload, rights; stop before submitting (-s)
    done = run_depositor(["-dl", "-i", "-a", ASCP, "-e", str(thumb), "-gu", "alice:3", "-go",
                          "0000-0003-1415-9265:2", "-s", "fidelity-token", str(deposition), str(data)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "EMPIAR deposition was successfully created" in done.stdout
    assert "Successfully uploaded the thumbnail" in done.stdout and "Finished uploading the data." in done.stdout
    (entry,) = state.entries.values()
    assert entry.thumbnail and entry.rights == {"alice": 3, "bob": 2} and not entry.submitted
    area = state.root / "tmp/andrii" / entry.directory / "data"
    assert tree_md5(area / data.name) == tree_md5(data)

    # 2: basic auth (-p), resume the same entry (-r): re-deposit, ascp -k3 finds everything there, submit
    done = run_depositor(["-dl", "-i", "-a", ASCP, "-p", "sim-password", "-r", str(entry.entry_id),
                          entry.directory, "depositor", str(deposition), str(data)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "EMPIAR deposition was successfully updated" in done.stdout
    assert f"The accession code that can be cited in paper is EMPIAR-{10000 + entry.entry_id}" in done.stdout
    (entry,) = state.entries.values()
    assert entry.submitted and entry.redeposits == 1
    assert tree_md5(area / data.name) == tree_md5(data)

    # every request was accepted, with the content types and auth the simulator documents
    seen = [(r["method"], r["path"].removeprefix(API), r["content_type"], r["auth"], r["status"]) for r in state.log]
    assert seen == [
        ("POST", "deposit_entry/", "application/json", "Token", 200),
        ("POST", "image_upload/", "multipart/form-data", "Token", 200),
        ("POST", "grant_rights/", "application/json", "Token", 200),
        ("POST", "grant_rights/", "application/json", "Token", 200),
        ("PUT", "redeposit_entry/", "application/json", "Basic", 200),
        ("POST", "submit_entry/", "application/json", "Basic", 200),
    ]


def test_reference_client_sees_simulator_errors(served: tuple[empiar_sim.EmpiarState, Path],
                                                tmp_path: Path) -> None:
    state, _ = served
    data = tmp_path / "dataset"
    (data / "micrographs").mkdir(parents=True)
    (data / "micrographs" / "a.mrc").write_bytes(b"a" * 1000)
    deposition = tmp_path / "deposition.json"
    deposition.write_text(json.dumps(example_json(data.name)))
    env = {**os.environ, "ASYNCDEPO_SIM_ASCP_ROOT": str(state.root), "PYTHONWARNINGS": "ignore"}
    done = run_depositor(["-dl", "-i", "-a", ASCP, "wrong-token", str(deposition), str(data)], env)
    assert done.returncode == 1
    assert "was not successful" in done.stdout and "Invalid token." in done.stdout
    assert not state.entries and [r["status"] for r in state.log] == [401]
    with socket.create_connection(("127.0.0.1", PORT), timeout=5):
        pass  # still serving


def test_asyncdepo_takes_the_same_command_line(served: tuple[empiar_sim.EmpiarState, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Switching is one word: the reference client's argv, given to `asyncdepo push empiar`, deposits too."""
    from asyncdepo.cli import empiar as cli

    state, _ = served
    data = tmp_path / "dataset"
    for sub in ("micrographs", "tilts"):
        (data / sub).mkdir(parents=True)
        (data / sub / "a.mrc").write_bytes(os.urandom(70_000))
    deposition = tmp_path / "deposition.json"
    deposition.write_text(json.dumps(example_json(data.name)))
    thumb = tmp_path / "thumb.png"
    thumb.write_bytes(make_png(640, 400))
    for key, value in {"ASYNCDEPO_SIM_ASCP_ROOT": str(state.root), "ASYNCDEPO_SIM_ASCP_PASSWORD": "aspera-pw",
                       "EMPIAR_TRANSFER_PASS": "aspera-pw", "XDG_STATE_HOME": str(tmp_path / "state")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ASYNCDEPO_SIM_ASCP_FAIL", raising=False)
    argv = ["-dl", "-i", "-a", ASCP, "-e", str(thumb), "-gu", "alice:3", "fidelity-token", str(deposition), str(data)]
    assert cli.push_main([*argv, "-q"]) == 0
    (entry,) = state.entries.values()
    assert entry.submitted and entry.thumbnail and entry.rights == {"alice": 3}
    assert tree_md5(state.root / "tmp/andrii" / entry.directory / "data" / data.name) == tree_md5(data)
