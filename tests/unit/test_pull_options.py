"""Engine options on pulls: ``--bwlimit`` (every byte received passes the run's token bucket, on both pull
routes), ``--include``/``--exclude``, ``--hash``, and ``--compress`` refused.

The bucket runs on a fake clock that only moves when the bucket sleeps, so the test asserts how much time
the limit imposed without waiting for it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter, Features, PlainGet, RemoteItem
from asyncdepo.engine.pull import pull
from asyncdepo.errors import UsageError
from asyncdepo.transport import httpget
from asyncdepo.transport.bandwidth import TokenBucket

FILES = {f"d/f{i}.bin": os.urandom(300_000 + 70_001 * i) for i in range(5)}
TOTAL = sum(map(len, FILES.values()))


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class Tally(TokenBucket):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.granted = 0

    async def acquire(self, n: int) -> None:
        await super().acquire(n)
        self.granted += n


class HttpAdapter(Adapter):
    """Files from a test server, by plain GET (threaded route) or by ``read`` (streamed route)."""

    name = "test-http"
    features = Features(pull=True, resumable=True)

    def __init__(self, base: str, plain: bool) -> None:
        self.base, self.plain = base, plain

    def describe(self) -> str:
        return f"test server {self.base}"

    async def open_item(self, item: Any, saved: Any) -> Any:
        raise NotImplementedError

    async def list_remote(self) -> AsyncIterator[RemoteItem]:
        for rel, data in FILES.items():
            yield RemoteItem(rel=rel, size=len(data), digests={"md5": hashlib.md5(data).hexdigest()}, ref=rel)

    async def plain_get(self, item: RemoteItem) -> PlainGet | None:
        return PlainGet(url=f"{self.base}/{item.ref}", what=f"GET {item.rel}") if self.plain else None

    async def read(self, item: RemoteItem, offset: int) -> AsyncIterator[bytes]:
        data = FILES[item.rel]
        for i in range(offset, len(data), 65536):
            yield data[i:i + 65536]


@pytest.fixture
async def server():
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=FILES[request.match_info["rel"]])

    app = web.Application()
    app.router.add_get("/{rel:.+}", serve)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    httpget.POOL.close()
    yield str(srv.make_url("")).rstrip("/")
    httpget.POOL.close()
    await srv.close()


@pytest.mark.parametrize("plain", [True, False], ids=["threaded-get", "streamed"])
async def test_bwlimit_paces_every_byte_of_a_pull(server: str, tmp_path: Path, plain: bool) -> None:
    fake = FakeTime()
    rate, burst = 100_000.0, 64 * 1024
    bucket = Tally(rate, burst, clock=fake.clock, sleep=fake.sleep)
    report = await pull(HttpAdapter(server, plain), tmp_path, EngineConfig(transfers=3), bucket=bucket)
    assert report.ok, report.failures
    for rel, data in FILES.items():
        assert (tmp_path / rel).read_bytes() == data
    assert bucket.granted >= TOTAL  # nothing was received without passing the bucket
    # and the limit cost the time it should (on the fake clock: the run itself took no real waiting)
    assert fake.now >= (TOTAL - burst) / rate - 1e-6


async def test_config_bwlimit_builds_the_bucket(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Tally] = []
    fake = FakeTime()

    def factory(rate: float) -> Tally:
        made.append(Tally(rate, clock=fake.clock, sleep=fake.sleep))
        return made[-1]

    monkeypatch.setattr("asyncdepo.engine.pull.TokenBucket", factory)
    report = await pull(HttpAdapter(server, True), tmp_path, EngineConfig(transfers=2, bwlimit=250_000.0))
    assert report.ok, report.failures
    assert [b.rate for b in made] == [250_000.0] and made[0].granted >= TOTAL


def test_bwlimit_caps_ascps_rate() -> None:
    from asyncdepo.transport.ascp.pairs import capped_rate, rate_bits

    assert capped_rate(None, 12_500_000.0) == "100000K"  # 12.5 MB/s = 100 Mbit/s
    assert capped_rate("300M", 12_500_000.0) == "100000K"  # --bwlimit is a cap: the lower rate holds
    assert capped_rate("50M", 12_500_000.0) == "50M"
    assert capped_rate("300M", None) == "300M" and capped_rate(None, None) is None
    assert rate_bits("2G") == 2e9 and rate_bits("500") == 500_000  # ascp's unit is kbit/s


async def test_include_and_exclude_filter_what_is_pulled(server: str, tmp_path: Path) -> None:
    config = EngineConfig(transfers=2, include=("d/f[0-3].bin",), exclude=("f2.bin",))
    report = await pull(HttpAdapter(server, True), tmp_path, config)
    assert report.ok and report.files_done == 3
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f0.bin", "f1.bin", "f3.bin"]


async def test_hash_adds_digests_to_what_is_reported(server: str, tmp_path: Path) -> None:
    from asyncdepo.events import CollectSink, ItemDone, Reporter

    sink = CollectSink()
    reporter = Reporter([sink])
    report = await pull(HttpAdapter(server, True), tmp_path, EngineConfig(hash=("md5", "sha256")),
                        reporter=reporter)
    assert report.ok
    done = {e.rel: e.digests for e in sink.events if isinstance(e, ItemDone)}
    assert {rel: d["sha256"] for rel, d in done.items()} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}


async def test_compress_is_refused_on_a_pull(server: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--compress applies to pushes"):
        await pull(HttpAdapter(server, True), tmp_path, EngineConfig(compress=("zstd", 3)))
    assert not any(tmp_path.iterdir())
