"""``asyncdepo push SRC TARGET --watch`` as a process: kill -9 and restart sends nothing twice (bytes and
requests counted at the tus simulator), a file rewritten while the watcher was down is sent again,
SIGTERM ends cleanly with exit 0; ``--metrics-port`` is scraped while the watch runs and parsed with
prometheus-client's parser, and its counters match the snapshot and the final report.

The tests wait on the process's JSON events (read by a thread into a queue), never on time."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import upload_bytes

GUARD = 60  # seconds: a guard against a hang, never a wait for work to happen


class Watcher:
    """A ``push --watch --json`` process whose stdout events are read into a queue."""

    def __init__(self, head: list[str], journal: Path, *extra: str) -> None:
        """``asyncdepo push HEAD... --watch --json ...`` (HEAD: ``SRC URL``, or ``gypsum SRC P/A/V``)."""
        cmd = [sys.executable, "-m", "asyncdepo.cli", "push", *head, "--watch", "--json",
               "--journal", str(journal), "--settle", "0.2", "--rescan", "1", "--chunk-size", "1M", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(orjson.loads(line))
        self.events.put({"event": "eof"})

    def until(self, cond: Callable[[dict[str, Any]], bool], what: str, *, past: bool = False) -> dict[str, Any]:
        """The first event (from now on; with ``past``, also among those already read) for which ``cond``
        holds."""
        for ev in self.seen if past else []:
            if cond(ev):
                return ev
        deadline = time.monotonic() + GUARD
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} within {GUARD} s; seen {self.seen[-5:]}") from None
            self.seen.append(ev)
            if ev["event"] == "eof":
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"the watcher ended before {what}: {err}")
            if cond(ev):
                return ev

    def done(self, rels: set[str]) -> None:
        left = set(rels)
        while left:
            ev = self.until(lambda e: e["event"] == "item_done" and e["rel"] in left, f"item_done for {left}")
            left.discard(ev["rel"])

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, dict[str, Any]]:
        self.proc.send_signal(sig)
        finished = self.until(lambda e: e["event"] == "job_finished", "job_finished")
        return self.proc.wait(timeout=GUARD), finished["report"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=GUARD)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for w in made:
        w.kill()


def _url(sim: Any) -> str:
    return f"tus+http://127.0.0.1:{sim.server.port}/files/"


def test_kill_9_and_restart_sends_nothing_twice_and_a_rewrite_again(tmp_path: Path, journal: Path,
                                                                    threaded_tus, watchers) -> None:
    src = tmp_path / "beam"
    (src / "run1").mkdir(parents=True)
    files = {f"run1/f{i}.raw": os.urandom(50_000 + i) for i in range(5)}
    files["big.raw"] = os.urandom(3 * (1 << 20) + 7)  # several chunks
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    w = Watcher([str(src), _url(threaded_tus)], journal)
    watchers.append(w)
    w.done(set(files))
    w.until(lambda e: e["event"] == "message" and e["text"].startswith("watching"), "the watching message",
            past=True)
    (src / "later.raw").write_bytes(later := os.urandom(20_000))
    w.done({"later.raw"})
    sent = upload_bytes(threaded_tus.faults)
    assert sent == sum(map(len, files.values())) + len(later)
    w.proc.send_signal(signal.SIGKILL)
    w.kill()

    # while it is down: one file is rewritten; then a new watcher on the same journal
    (src / "run1" / "f2.raw").write_bytes(redo := os.urandom(33_333))
    threaded_tus.call(threaded_tus.faults.reset_counters)
    requests: list[str] = []
    threaded_tus.faults.on_request.append(lambda route, n: requests.append(route))
    w2 = Watcher([str(src), _url(threaded_tus)], journal)
    watchers.append(w2)
    w2.done({"run1/f2.raw"})
    w2.until(lambda e: e["event"] == "message" and e["text"].startswith("watching"), "the watching message",
            past=True)
    (src / "new.raw").write_bytes(new := os.urandom(10_000))
    w2.done({"new.raw"})
    rc, report = w2.stop()
    assert rc == 0, w2.proc.stderr.read() if w2.proc.stderr else ""
    assert report["ok"] and report["files_done"] == 2 and report["files_failed"] == 0
    # only the rewritten file and the new one crossed the wire, one creation each
    assert upload_bytes(threaded_tus.faults) == len(redo) + len(new)
    assert sum(1 for r in requests if r.startswith("POST")) == 2
    store = threaded_tus.store / "complete"
    assert (store / "run1" / "f2.raw").read_bytes() == redo
    assert (store / "new.raw").read_bytes() == new
    assert (store / "big.raw").read_bytes() == files["big.raw"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {labels: value} of every sample on the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _one(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return metrics[name][()]


def test_metrics_endpoint_while_watching_matches_snapshot_and_report(tmp_path: Path, journal: Path,
                                                                     threaded_tus, watchers) -> None:
    src = tmp_path / "beam"
    src.mkdir()
    files = {f"f{i}.raw": os.urandom(30_000 + i) for i in range(6)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    faults = threaded_tus.faults
    threaded_tus.call(lambda: faults.add("POST * status=503 first=3"))  # retried, reason 5xx
    threaded_tus.call(lambda: faults.add("POST * status=422 first=1"))  # then one file refused for good
    port = _free_port()
    w = Watcher([str(src), _url(threaded_tus)], journal, "--metrics-port", str(port))
    watchers.append(w)
    failed = w.until(lambda e: e["event"] == "item_failed", "the refused file")
    snap = w.until(lambda e: e["event"] == "snapshot" and e["files_done"] == len(files) - 1, "a snapshot of all")
    m = _scrape(port)
    assert _one(m, "asyncdepo_files_sent_total") == snap["files_done"]
    sent = sum(len(d) for rel, d in files.items() if rel != failed["rel"])
    assert _one(m, "asyncdepo_bytes_sent_total") == snap["bytes_sent"] == sent
    assert m["asyncdepo_retries_total"][(("reason", "5xx"),)] == snap["retries_by_reason"]["5xx"] == 3
    assert _one(m, "asyncdepo_files_failed_total") == 1 == _one(m, "asyncdepo_files_failed_now")
    assert _one(m, "asyncdepo_bytes_failed_total") == len(files[failed["rel"]])
    assert _one(m, "asyncdepo_files_in_flight") == 0 and _one(m, "asyncdepo_queue_depth") == 0
    assert _one(m, "asyncdepo_last_success_timestamp_seconds") > 0
    assert _one(m, "asyncdepo_watch_pending_files") == 0
    assert _one(m, "process_resident_memory_bytes") > 0
    rc, report = w.stop()
    assert rc == 1  # a file failed: listed in the report
    assert report["files_done"] == _one(m, "asyncdepo_files_sent_total")
    assert report["bytes_sent"] == _one(m, "asyncdepo_bytes_sent_total")
    assert report["retries"] == sum(m["asyncdepo_retries_total"].values())
    assert report["files_failed"] == _one(m, "asyncdepo_files_failed_now")
    assert [f["rel"] for f in report["failures"]] == [failed["rel"]]
    with pytest.raises(OSError):  # the endpoint is gone with the command
        _scrape(port)


def test_watch_is_refused_by_archives_with_one_closing_step(tmp_path: Path, capsys) -> None:
    from asyncdepo.cli import main as cli_main

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.img").write_bytes(b"x")
    rc = cli_main(["push", "pdis", str(tmp_path / "d"), "--pdb", "1ABC", "--watch"])
    err = capsys.readouterr().err
    assert rc == 2 and "watch mode does not apply" in err and "PDIS" in err
    rc = cli_main(["push", "empiar", "tok", str(tmp_path / "dep.json"), str(tmp_path / "d"), "--watch"])
    err = capsys.readouterr().err
    assert rc == 2 and "watch mode does not apply" in err and "EMPIAR deposition is submitted once" in err
