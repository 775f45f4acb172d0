"""Shared fixtures: datasets, the tus simulator (in the test's loop or in a thread), a journal path, an HTTP
client session; ``tus_args`` for the tus simulator's options; ``start_over`` for a test server on HTTP or TLS."""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from asyncdepo.digests import hash_path_sync
from asyncdepo.sim import tus
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import SimServer, ThreadedSim
from tests import requires


async def start_over(server: TestServer, scheme: str, folder: Path) -> ssl.SSLContext | None:
    """Start ``server`` over ``http`` or ``https``; over https (a self-signed certificate for 127.0.0.1, written
    to ``folder``) return a client context that trusts only that certificate."""
    if scheme != "https":
        await server.start_server()
        return None
    requires.module("cryptography")
    from tests.tlscert import contexts

    server_ctx, client_ctx = contexts(folder)
    await server.start_server(ssl=server_ctx)
    assert str(server.make_url("/")).startswith("https://")
    return client_ctx


def sha256_of(path: Path) -> str:
    return hash_path_sync(path, ("sha256",)).hexdigests()["sha256"]


def cli_process(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``asyncdepo ARGV...`` as a child process (its own interpreter, signals and exit status), output as text."""
    return subprocess.run([sys.executable, "-m", "asyncdepo.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def tree_digests(root: Path) -> dict[str, str]:
    """rel path -> sha256 of every regular file under root (part files excluded)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.name.endswith(".asyncdepo-part"):
            out[p.relative_to(root).as_posix()] = sha256_of(p)
    return out


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """40 small files in nested directories, 3 multi-chunk files, an empty file."""
    root = tmp_path / "data"
    for i in range(40):
        p = root / f"d{i % 4}" / f"small_{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(1000 + 37 * i))
    for i in range(3):
        (root / f"big_{i}.bin").write_bytes(os.urandom(3 * (1 << 20) + 12345 * i))
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
async def tus_server(tmp_path: Path):
    """A tus simulator in the test's event loop; ``server.faults`` injects faults."""
    faults = FaultInjector()
    async with SimServer(tus.build_app(tmp_path / "tus-store", faults, None)) as server:
        server.store = tmp_path / "tus-store"  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def threaded_tus(tmp_path: Path) -> Iterator[ThreadedSim]:
    """A tus simulator in its own thread (for CLI runs that start their own loop)."""
    faults = FaultInjector()
    store = tmp_path / "tus-store"
    with ThreadedSim(lambda: tus.build_app(store, faults, None)) as sim:
        sim.faults = faults  # type: ignore[attr-defined]
        sim.store = store  # type: ignore[attr-defined]
        yield sim


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


def upload_bytes(faults: FaultInjector) -> int:
    """Body bytes a tus simulator received for uploads: PATCHes plus creation-with-upload POSTs."""
    return faults.total_bytes("PATCH") + faults.total_bytes("POST")


def tus_args(**kw: object) -> argparse.Namespace:
    """The tus simulator's options as its command line would give them, with ``kw`` changed."""
    parser = argparse.ArgumentParser()
    tus.add_arguments(parser)
    ns = parser.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to a simulator directly (30 s per request at most)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture(autouse=True)
def _private_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every push and pull is a journaled job: a test that names no journal (and the subprocesses it starts)
    writes it under a temporary XDG_STATE_HOME, never into the home directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy_from_the_developer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every HTTP session honours the proxy environment: a developer's own proxy variables (either case) must
    not send the tests' loopback traffic (and the subprocesses they start) through a proxy."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
