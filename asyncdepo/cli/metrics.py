"""``--metrics-port``: the run's counters in the Prometheus exposition format (prometheus-client).

The rclone accounting pattern: workers only add to :class:`~asyncdepo.accounting.Stats`; each reporter gets
a :class:`MetricsSink` that keeps the latest stats snapshot (handed to it on every tick, in the event
loop) and counts what only events tell (failed files and their bytes, the time of the last success). The
HTTP server is prometheus-client's, in a daemon thread; a scrape reads what the sinks hold under a lock
held only to copy a few numbers, so it never waits for the loop and the loop never waits for it.

One exporter per process (PDIS pushes several datasets, each with its own reporter: their figures add up).

Metrics (all prefixed ``asyncdepo_``):

=========================================  =======  ===========================================================
``files_sent_total``                       counter  files confirmed by the target (pull: received and checked)
``files_skipped_total``                    counter  files that needed no transfer (unchanged, or already there)
``files_failed_total``                     counter  item failures, including ones a later retry mended
``files_failed_now``                       gauge    files failed now (what the report lists)
``bytes_sent_total``                       counter  bytes on the wire (re-sent and compressed bytes included)
``bytes_done_total``                       counter  bytes of the files confirmed or skipped
``bytes_failed_total``                     counter  sizes of the files that failed (when known)
``retries_total{reason}``                  counter  retries at any level, by the retry loop's reason
``files_in_flight``                        gauge    files being sent now
``requests_in_flight``                     gauge    requests in flight now
``queue_depth``                            gauge    files found and waiting for a worker
``watch_pending_files``                    gauge    (``--watch``) files seen and not yet settled
``watch_wakeups_total``                    counter  (``--watch``) times the watch woke up (no polling loop)
``watch_scans_total``                      counter  (``--watch``) walks of the whole source
``last_success_timestamp_seconds``         gauge    Unix time of the last file confirmed (0: none yet)
=========================================  =======  ===========================================================

Plus prometheus-client's ``process_*`` metrics (resident memory, CPU seconds, open files).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from asyncdepo.errors import UsageError
from asyncdepo.events import Event, ItemDone, ItemFailed, Sink

_COUNTERS = (  # snapshot key -> (metric name, help)
    ("files_done", "files_sent", "Files confirmed by the target (for a pull: received and checked)."),
    ("files_skipped", "files_skipped", "Files that needed no transfer (unchanged, or the target has them)."),
    ("bytes_sent", "bytes_sent", "Bytes on the wire, re-sent and compressed bytes included."),
    ("bytes_done", "bytes_done", "Bytes of the files confirmed or skipped."),
)
_GAUGES = (
    ("files_failed", "files_failed_now", "Files failed now (the report's failures)."),
    ("in_flight", "files_in_flight", "Files being sent now."),
    ("requests_in_flight", "requests_in_flight", "Requests in flight now."),
)


_EXTRA_HELP = {
    "watch_pending_files": "Files seen by the watch and not yet settled.",
    "watch_wakeups_total": "Times the watch woke up (events, files due, rescans).",
    "watch_scans_total": "Walks of the whole source by the watch.",
}


class MetricsSink(Sink):
    """What one reporter contributes: its latest snapshot and the figures its events tell."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter
        self.snapshot: dict[str, Any] = {}
        self.failed_files = 0
        self.failed_bytes = 0
        self.last_success = 0.0
        self.gauges: dict[str, float] = {}
        self._extra: list[tuple[str, Callable[[], float]]] = []

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        """Also publish ``asyncdepo_<name>`` as ``fn()`` (called on each tick, in the event loop)."""
        self._extra.append((name, fn))

    def counter(self, name: str, fn: Callable[[], float]) -> None:
        """Also publish the counter ``asyncdepo_<name>_total`` as ``fn()`` (called on each tick)."""
        self._extra.append((name + "_total", fn))

    def emit(self, event: Event) -> None:
        if isinstance(event, ItemDone):
            with self._exporter.lock:
                self.last_success = time.time()
        elif isinstance(event, ItemFailed):
            with self._exporter.lock:
                self.failed_files += 1
                self.failed_bytes += max(0, getattr(event, "size", 0) or 0)

    def tick(self, snapshot: dict[str, Any]) -> None:
        extra = {name: float(fn()) for name, fn in self._extra}
        with self._exporter.lock:
            self.snapshot = snapshot
            self.gauges = extra


class _Collector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        ex = self._exporter
        with ex.lock:  # copy, then build outside the lock
            rows = [(dict(s.snapshot), s.failed_files, s.failed_bytes, s.last_success, dict(s.gauges))
                    for s in ex.sinks]

        def total(key: str) -> float:
            return float(sum(r[0].get(key, 0) or 0 for r in rows))

        for key, name, text in _COUNTERS:
            yield CounterMetricFamily(f"asyncdepo_{name}", text, value=total(key))
        yield CounterMetricFamily("asyncdepo_files_failed", "Item failures, including ones a later retry mended.",
                                  value=sum(r[1] for r in rows))
        yield CounterMetricFamily("asyncdepo_bytes_failed", "Sizes of the files that failed (when known).",
                                  value=sum(r[2] for r in rows))
        retries = CounterMetricFamily("asyncdepo_retries", "Retries at any level, by reason.", labels=["reason"])
        reasons: dict[str, float] = {}
        for r in rows:
            for reason, n in (r[0].get("retries_by_reason") or {}).items():
                reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            retries.add_metric([reason or "other"], n)
        yield retries
        for key, name, text in _GAUGES:
            yield GaugeMetricFamily(f"asyncdepo_{name}", text, value=total(key))
        waiting = sum(max(0, (s.get("files_total", 0) - s.get("files_done", 0) - s.get("files_skipped", 0)
                              - s.get("files_failed", 0) - s.get("in_flight", 0))) for s, *_ in rows)
        yield GaugeMetricFamily("asyncdepo_queue_depth", "Files found and waiting for a worker.", value=waiting)
        names = sorted({n for r in rows for n in r[4]})
        for name in names:
            value = sum(r[4].get(name, 0.0) for r in rows)
            text = _EXTRA_HELP.get(name, name.replace("_", " "))
            if name.endswith("_total"):
                yield CounterMetricFamily(f"asyncdepo_{name[:-len('_total')]}", text, value=value)
            else:
                yield GaugeMetricFamily(f"asyncdepo_{name}", text, value=value)
        yield GaugeMetricFamily("asyncdepo_last_success_timestamp_seconds",
                                "Unix time of the last file confirmed (0: none yet).",
                                value=max([r[3] for r in rows] or [0.0]))


class MetricsExporter:
    """The process's HTTP endpoint (``/metrics``, any path) on ``addr:port``; :meth:`sink` for each reporter.

    :raises UsageError: the port cannot be bound (in use, or not allowed).
    """

    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        self.lock = threading.Lock()
        self.sinks: list[MetricsSink] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port {port}: cannot listen on {addr}:{port} ({exc.strerror or exc})",
                             hint="choose a free port, or another --metrics-addr") from None
        self.port = int(self._server.server_address[1])

    def sink(self) -> MetricsSink:
        s = MetricsSink(self)
        with self.lock:
            self.sinks.append(s)
        return s

    def close(self) -> None:
        """Stop serving (the port is free again when this returns)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


_exporter: MetricsExporter | None = None


def exporter(port: int, addr: str = "127.0.0.1") -> MetricsExporter:
    """The process's exporter, started on first use."""
    global _exporter
    if _exporter is None:
        _exporter = MetricsExporter(port, addr)
    return _exporter


def shutdown() -> None:
    """Stop the process's exporter, if one was started (the command is over)."""
    global _exporter
    if _exporter is not None:
        ex, _exporter = _exporter, None
        ex.close()
