"""One contract suite over every URL-scheme adapter (file://, tus, S3 on moto), skipping by Features.

What every adapter promises the engine (adapters/base.py): a pushed tree lands byte for byte; a re-run
sends nothing for unchanged files and re-sends a changed one; a resumable target reopened from a
writer's journaled ``state()`` knows what it already holds; ``abort`` leaves no file behind; a pull
target gives the tree back unchanged. Archive adapters (gypsum, pdis, empiar, immport) orchestrate
their own APIs and have their own suites.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from asyncdepo.adapters.local import LocalAdapter
from asyncdepo.adapters.s3.adapter import S3Adapter
from asyncdepo.adapters.tus import TusAdapter
from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Chunk, Item
from asyncdepo.digests import digest_bytes
from asyncdepo.engine.pull import pull
from asyncdepo.engine.scheduler import push
from asyncdepo.sim import tus
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.server import SimServer

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

pytest_plugins = ["tests.adapters.s3_servers"]

PART = 5 << 20  # S3's smallest part, so one chunk size serves every target


@dataclass
class Target:
    make: Callable[[EngineConfig], Adapter]
    stored: Callable[[], dict[str, bytes]]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".asyncdepo-part")}


@pytest.fixture(params=["file", "tus", "s3"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    if request.param == "file":
        out = tmp_path / "out"
        yield Target(lambda cfg: LocalAdapter(f"file://{out}", cfg), lambda: _tree(out) if out.exists() else {})
    elif request.param == "tus":
        store = tmp_path / "tus"
        async with SimServer(tus.build_app(store, FaultInjector(), None)) as server:
            yield Target(lambda cfg: TusAdapter(f"tus+{server.url}/files/", cfg),
                         lambda: _tree(store / "complete"))
    else:
        s3: S3TestServer = request.getfixturevalue("moto_server")
        bucket = s3.new_bucket()

        def stored() -> dict[str, bytes]:
            client = s3.client()
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
            return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

        yield Target(lambda cfg: S3Adapter(f"s3://{bucket}", cfg, s3.secrets, endpoint_url=s3.endpoint_url),
                     stored)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for i in range(7):
        p = root / f"d{i % 2}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(100 * i + 1))
    (root / "empty").write_bytes(b"")
    (root / "big.raw").write_bytes(os.urandom(2 * PART + 777))
    return root


async def test_push_lands_byte_for_byte_and_rerun_sends_nothing(target: Target, tree: Path,
                                                               tmp_path: Path) -> None:
    cfg = EngineConfig(transfers=4, chunk_size=PART)
    first = await push(tree, target.make(cfg), cfg, journal_path=tmp_path / "j")
    assert first.ok, first.failures
    assert target.stored() == _tree(tree)
    again = await push(tree, target.make(cfg), cfg, journal_path=tmp_path / "j")
    assert again.ok and again.files_done == 0 and again.bytes_sent == 0
    assert again.files_skipped == len(_tree(tree))
    (tree / "d1" / "f1.bin").write_bytes(b"changed")
    third = await push(tree, target.make(cfg), cfg, journal_path=tmp_path / "j")
    assert third.ok and third.files_done == 1 and third.bytes_sent == len(b"changed")
    assert target.stored() == _tree(tree)


def _first_chunk(data: bytes, digests: tuple[str, ...], multipart: bool) -> Chunk:
    body = data[:PART]
    return Chunk(offset=0, data=memoryview(body), last=False, part_number=1 if multipart else 0,
                 digests=digest_bytes(body, digests))


async def test_reopen_from_journaled_state_knows_what_the_server_holds(target: Target, tree: Path) -> None:
    cfg = EngineConfig(chunk_size=PART)
    p = tree / "big.raw"
    data = p.read_bytes()
    st = p.stat()
    item = Item(str(p), "big.raw", st.st_size, st.st_mtime_ns)
    async with target.make(cfg) as adapter:
        f = adapter.features
        if not f.resumable:
            pytest.skip("target cannot say what it holds")
        writer = await adapter.open_item(item, None)
        chunk = _first_chunk(data, f.chunk_digests, f.multipart)
        if f.multipart:
            writer.parts[1] = await writer.write_part(chunk)
        else:
            await writer.write(chunk)
        saved = writer.state()
    async with target.make(cfg) as adapter:
        reopened = await adapter.open_item(item, saved)
        if adapter.features.multipart:
            assert set(reopened.parts) == {1}
        else:
            assert reopened.confirmed == PART
        await reopened.abort()
    assert "big.raw" not in target.stored()


async def test_pull_gives_the_tree_back(target: Target, tree: Path, tmp_path: Path) -> None:
    cfg = EngineConfig(transfers=4, chunk_size=PART)
    adapter = target.make(cfg)
    if not adapter.features.pull:
        pytest.skip("target cannot be pulled from")
    assert (await push(tree, adapter, cfg, journal_path=tmp_path / "j")).ok
    out = tmp_path / "back"
    report = await pull(target.make(cfg), out, cfg)
    assert report.ok, report.failures
    assert _tree(out) == _tree(tree)

