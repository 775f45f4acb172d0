"""The metrics endpoint (``--metrics-port``) during a one-shot push held by the simulator, and after a pull:
scraped over HTTP, parsed with prometheus-client's parser, compared with the stats and the report."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.local import LocalAdapter
from asyncdepo.adapters.tus import TusAdapter
from asyncdepo.cli.metrics import MetricsExporter
from asyncdepo.engine.pull import pull
from asyncdepo.errors import UsageError
from asyncdepo.events import Reporter

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _v(m: Samples, name: str) -> float:
    return m[name][()]


@pytest.fixture
def exporter() -> MetricsExporter:
    ex = MetricsExporter(0)  # the system picks a free port
    yield ex  # type: ignore[misc]
    ex.close()


async def test_scraped_while_the_push_is_held_then_equal_to_the_report(tus_server, dataset: Path, journal: Path,
                                                                       exporter: MetricsExporter) -> None:
    cfg = EngineConfig(transfers=3, chunk_size=1 << 20)
    reporter = Reporter([exporter.sink()])
    faults = tus_server.faults
    faults.add("POST * status=429 retry-after=0 first=2")  # two retries, reason 429
    faults.add("PATCH * stall first=0")  # the multi-chunk files hold every request slot
    held = anyio.Event()
    faults.on_stall.append(lambda n: held.set() if n >= cfg.transfers else None)
    result = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            result.append(await push(dataset, TusAdapter(f"tus+{tus_server.url}/files/"), cfg, reporter=reporter,
                                     journal_path=journal))

        tg.start_soon(run)
        with anyio.fail_after(120):  # a guard against a hang, not a wait for tasks
            await held.wait()
        reporter.tick()  # what the ticker does a few times a second
        snap = reporter.stats.snapshot()
        m = await anyio.to_thread.run_sync(_scrape, exporter.port)
        assert _v(m, "asyncdepo_files_in_flight") == snap["in_flight"] == cfg.transfers
        assert _v(m, "asyncdepo_requests_in_flight") == cfg.transfers
        assert _v(m, "asyncdepo_files_sent_total") == snap["files_done"] < 44
        assert _v(m, "asyncdepo_bytes_sent_total") == snap["bytes_sent"]
        assert _v(m, "asyncdepo_queue_depth") == (snap["files_total"] - snap["files_done"] - snap["in_flight"]
                                                  - snap["files_skipped"] - snap["files_failed"])
        assert m["asyncdepo_retries_total"][(("reason", "429"),)] == 2
        faults.clear()
        faults.release_stalls()
    report = result[0]
    assert report.ok, report.failures
    m = await anyio.to_thread.run_sync(_scrape, exporter.port)
    assert _v(m, "asyncdepo_files_sent_total") == report.files_done == 44
    assert _v(m, "asyncdepo_bytes_sent_total") == report.bytes_sent
    assert _v(m, "asyncdepo_bytes_done_total") == report.bytes
    assert sum(m["asyncdepo_retries_total"].values()) == report.retries
    assert _v(m, "asyncdepo_files_failed_now") == report.files_failed == 0
    assert _v(m, "asyncdepo_files_in_flight") == 0 and _v(m, "asyncdepo_queue_depth") == 0
    assert _v(m, "asyncdepo_last_success_timestamp_seconds") > 0


async def test_pull_counters_equal_the_report(tmp_path: Path, dataset: Path, journal: Path,
                                              exporter: MetricsExporter) -> None:
    archive = tmp_path / "archive"
    assert (await push(dataset, LocalAdapter(f"file://{archive}"), journal_path=journal)).ok
    reporter = Reporter([exporter.sink()])
    report = await pull(LocalAdapter(f"file://{archive}"), tmp_path / "back", EngineConfig(), reporter=reporter,
                        journal_path=tmp_path / "pull.sqlite")
    assert report.ok
    m = await anyio.to_thread.run_sync(_scrape, exporter.port)
    assert _v(m, "asyncdepo_files_sent_total") == report.files_done == 44
    assert _v(m, "asyncdepo_bytes_sent_total") == report.bytes_sent


def test_a_port_in_use_is_a_usage_error(exporter: MetricsExporter) -> None:
    with pytest.raises(UsageError, match=f"--metrics-port {exporter.port}"):
        MetricsExporter(exporter.port)
