"""What every command shares: engine options, the reporter for the chosen output, running a coroutine
with Ctrl-C handling, and turning errors into one message and an exit status.

Exit statuses: 0 everything done; 1 some items failed (the report lists them: a source that vanished, a
directory that could not be read and a full disk included); 2 bad usage or input (nothing was sent);
3 authentication or permission refused; 4 a permanent refusal by the archive (quota, conflict, validation);
5 a transient failure that outlasted the retries; 6 the job is running in another process (its lock is
held; the message names the holder); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from asyncdepo import config as cfgmod
from asyncdepo.config import EngineConfig
from asyncdepo.errors import (
    AuthError,
    Cancelled,
    DepoError,
    JobLockedError,
    PermanentError,
    TransientError,
    UsageError,
)
from asyncdepo.events import JsonSink, LogSink, Reporter, Sink, printable

T = TypeVar("T")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_REFUSED, EXIT_TRANSIENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_LOCKED = 6


def add_engine_options(parser: argparse.ArgumentParser, *, journal: bool = True) -> None:
    """The engine's option table as flags, plus --json / --quiet / --journal."""
    cfgmod.add_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="write one JSON object per event and periodic "
                     "snapshots to stdout instead of a progress display")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress display; only the final report")
    out.add_argument("-v", "--verbose", action="store_true", help="log retries and details to stderr")
    if journal:
        out.add_argument("--journal", metavar="PATH",
                         help="resume journal (default $XDG_STATE_HOME/asyncdepo/journal.sqlite)")
    add_metrics_options(out)


def add_metrics_options(group: Any) -> None:
    """``--metrics-port`` / ``--metrics-addr`` on a parser or argument group."""
    group.add_argument("--metrics-port", type=_port, metavar="PORT",
                       help="serve Prometheus metrics (files and bytes sent and failed, retries by reason, in "
                            "flight, queue depth, last success) on http://ADDR:PORT/metrics while the command "
                            "runs")
    group.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                       help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0 for every "
                            "interface)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r} (0-65535)")
    return port


def add_watch_options(parser: argparse.ArgumentParser) -> None:
    """``--watch`` and how it decides that a file is complete (see docs/beamline.md)."""
    w = parser.add_argument_group("beamline mode (watch the source and send files as they are complete)")
    w.add_argument("--watch", action="store_true",
                   help="send what exists, then keep running and send new or changed files once complete; "
                        "SIGTERM or Ctrl-C stops it (files in flight finish first)")
    w.add_argument("--settle", type=_seconds("settle"), default=5.0, metavar="SECONDS",
                   help="a file is complete once its size and mtime held this long (default 5)")
    w.add_argument("--ready", metavar="GLOB",
                   help="a file is complete once a marker matching GLOB is beside it and at least as new: "
                        "'*.done' (scan_01.h5.done releases scan_01.h5) or DONE (releases its directory); "
                        "markers are never sent, and --settle does not apply")
    w.add_argument("--rescan", type=_seconds("rescan"), default=300.0, metavar="SECONDS",
                   help="walk the whole source this often, for events the file system did not deliver "
                        "(network file systems: make it short) (default 300)")
    w.add_argument("--stop-timeout", type=_seconds("stop-timeout"), default=60.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long files in flight may take to finish before they are cut "
                        "short and left to the journal (default 60)")


def _seconds(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}: not a number of seconds: {text!r}") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"--{name}: not a number of seconds: {text!r}")
        return value

    return parse


def watch_of(args: argparse.Namespace) -> Any:
    """The :class:`~asyncdepo.engine.watch.Watch` that ``--watch`` asks for, or None.

    :raises UsageError: a value the watch cannot use.
    """
    if not getattr(args, "watch", False):
        return None
    from asyncdepo.engine.watch import Watch, WatchOptions

    return Watch(WatchOptions(settle=args.settle, ready=args.ready, rescan=args.rescan,
                              stop_timeout=args.stop_timeout))


def publish_watch(reporter: Reporter, watch: Any) -> None:
    """Add the watch's files waiting to settle, wake-ups and scans to the metrics (with --metrics-port)."""
    metrics = sys.modules.get("asyncdepo.cli.metrics")  # loaded only when --metrics-port was given
    for sink in reporter.sinks:
        if metrics is not None and isinstance(sink, metrics.MetricsSink):
            sink.gauge("watch_pending_files", lambda: len(watch.pending))
            sink.counter("watch_wakeups", lambda: watch.wakeups)
            sink.counter("watch_scans", lambda: watch.scans)


def refuse_watch(args: argparse.Namespace, why: str, hint: str) -> None:
    """For archives that take a dataset in one closing step: ``--watch`` is a usage error saying so.

    :raises UsageError: when ``--watch`` was given.
    """
    if getattr(args, "watch", False):
        raise UsageError(f"watch mode does not apply: {why}", hint=hint)


def metrics_exporter(args: argparse.Namespace) -> Any:
    """The process's metrics endpoint when ``--metrics-port`` was given (started on first use), else None.

    :raises UsageError: the port cannot be bound.
    """
    port = getattr(args, "metrics_port", None)
    if port is None:
        return None
    from asyncdepo.cli import metrics

    return metrics.exporter(port, getattr(args, "metrics_addr", "127.0.0.1") or "127.0.0.1")


def metrics_sink(args: argparse.Namespace) -> Any:
    """A metrics sink for one reporter when ``--metrics-port`` was given, else None.

    :raises UsageError: the port cannot be bound.
    """
    exporter = metrics_exporter(args)
    return exporter.sink() if exporter is not None else None


def anywhere(parser: argparse.ArgumentParser, sub: Any,
             add: Callable[[argparse.ArgumentParser, dict[str, Any]], None]) -> None:
    """Options a user may type before or after the subcommand (``asyncdepo gypsum --server URL create P`` and
    ``asyncdepo gypsum create P --server URL``): ``add(p, extra)`` adds them to ``p`` with ``**extra``; they
    go on ``parser`` as usual and on every subcommand of ``sub`` (its ``add_subparsers`` action, with every
    subcommand already added) with ``default=SUPPRESS``, so a value given after the subcommand wins and one
    given before it is kept."""
    add(parser, {})
    for child in dict.fromkeys(sub.choices.values()):
        add(child, {"default": argparse.SUPPRESS})


#: the cluster flags and whether each takes a value (``resume`` replaces a job's recorded ones with its own)
CLUSTER_FLAGS = {"--scheduler": True, "--local-cluster": True, "--max-requests": True, "--batch-files": True,
                 "--batch-size": True}


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """``--scheduler`` / ``--local-cluster`` and how a job is cut into batches (see docs/scale-out.md)."""
    g = parser.add_argument_group(
        "cluster (one job over many data movers on Dask distributed: pip install 'asyncdepo[dask]')",
        "This process keeps the walk and the journal; the workers send. The source must be readable at the "
        "same path on every worker. --transfers and the memory bound apply per worker, --bwlimit to the "
        "whole job.")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the job on the Dask cluster whose scheduler is at ADDRESS (tcp://HOST:8786)")
    g.add_argument("--local-cluster", metavar="N",
                   help="start a Dask LocalCluster of N worker processes on this machine and run the job on it")
    g.add_argument("--max-requests", metavar="N",
                   help="requests in flight to the target over all workers together (default: no job-wide cap "
                        "beyond --transfers per worker)")
    g.add_argument("--batch-files", metavar="N", help="most files handed to a worker at once (default 256)")
    g.add_argument("--batch-size", metavar="SIZE", help="most bytes handed to a worker at once (default 1G)")


def cluster_argv(args: argparse.Namespace) -> list[str]:
    """The cluster flags given on a command line, as argv (for the command a job records, or ``resume``'s)."""
    out: list[str] = []
    for flag in CLUSTER_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            out += [flag, str(value)]
    return out


def without_cluster_flags(argv: list[str]) -> list[str]:
    """``argv`` without its cluster flags (and their values)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in CLUSTER_FLAGS:
            skip = "=" not in arg and CLUSTER_FLAGS[name]
            continue
        out.append(arg)
    return out


def cluster_options(args: argparse.Namespace) -> Any:
    """The ``ClusterOptions`` the flags ask for, or None to run on this node; raises UsageError."""
    from asyncdepo.config import parse_size

    scheduler, local = getattr(args, "scheduler", None), getattr(args, "local_cluster", None)
    extra = [f for f in ("max_requests", "batch_files", "batch_size") if getattr(args, f, None) is not None]
    if scheduler is None and local is None:
        if extra:
            raise UsageError(f"--{extra[0].replace('_', '-')} applies to a cluster only",
                             hint="add --scheduler ADDRESS or --local-cluster N")
        return None
    if scheduler is not None and local is not None:
        raise UsageError("give --scheduler or --local-cluster, not both")

    def whole(name: str, value: Any) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{name} must be a whole number, not {value!r}") from None
        if n < 1:
            raise UsageError(f"--{name} must be at least 1")
        return n

    from asyncdepo.engine.cluster_setup import ClusterOptions

    opts = ClusterOptions(scheduler=scheduler, local_workers=whole("local-cluster", local) if local else 0)
    if args.max_requests is not None:
        opts = dataclasses.replace(opts, max_requests=whole("max-requests", args.max_requests))
    if args.batch_files is not None:
        opts = dataclasses.replace(opts, batch_files=whole("batch-files", args.batch_files))
    if args.batch_size is not None:
        opts = dataclasses.replace(opts, batch_bytes=whole("batch-size", parse_size(args.batch_size)))
    return opts


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from flags, ASYNCDEPO_* variables and the config file; raises UsageError."""
    return cfgmod.load(args)


def setup_logging(args: argparse.Namespace) -> None:
    """Log lines to stderr: -v shows retries and details (INFO), -q only errors (a failed file; retries and
    warnings are silent: the final report says what went wrong), otherwise warnings too. The level is set on
    the ``asyncdepo`` logger (every module of ours logs below it), so it holds for each command run in one
    process."""
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("asyncdepo").setLevel(
        logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)


def make_reporter(args: argparse.Namespace, title: str = "asyncdepo") -> Reporter:
    """JSON lines with --json; rich progress on a terminal; log lines otherwise (see :func:`setup_logging`);
    and metrics with --metrics-port (first, so a snapshot is in the metrics before any other output shows it).

    :raises UsageError: the metrics port cannot be bound.
    """
    setup_logging(args)
    sinks: list[Sink] = []
    metrics = metrics_sink(args)
    if metrics is not None:
        sinks.append(metrics)
    if getattr(args, "json", False):
        sinks.append(JsonSink(sys.stdout))
    elif not getattr(args, "quiet", False) and sys.stderr.isatty():
        from asyncdepo.cli.render import RichSink

        sinks.append(RichSink(title=title))
    else:
        sinks.append(LogSink())
    return Reporter(sinks)


def error_exit(exc: BaseException) -> int:
    """Print ``exc`` as a person should see it and return the exit status for it."""
    if isinstance(exc, Cancelled):
        print(f"\nasyncdepo: {exc.describe()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, DepoError):
        print(f"asyncdepo: error: {printable(exc.describe())}", file=sys.stderr)
        if isinstance(exc, JobLockedError):
            return EXIT_LOCKED
        if isinstance(exc, UsageError):
            return EXIT_USAGE
        if isinstance(exc, AuthError):
            return EXIT_AUTH
        if isinstance(exc, PermanentError):
            return EXIT_REFUSED
        if isinstance(exc, TransientError):
            return EXIT_TRANSIENT
        return EXIT_FAILED
    raise exc


def run(main: Callable[[], Awaitable[T]], reporter: Reporter | None = None,
        on_signal: Callable[[], None] | None = None) -> T:
    """Run ``main`` on uvloop when available; SIGINT/SIGTERM cancel it cleanly and raise
    :class:`~asyncdepo.errors.Cancelled`. With ``on_signal`` the first signal calls it instead (a
    graceful stop: ``main`` is expected to return soon) and only a second one cancels.

    The coroutine's own ``finally`` blocks (shielded cleanups) run before this returns.
    """
    interrupted = False

    async def wrapper() -> T:
        nonlocal interrupted
        result: list[T] = []
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal interrupted
                graceful: list[Callable[[], None]] = [on_signal] if on_signal is not None else []
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        if graceful:
                            graceful.pop()()  # the first signal: a graceful stop
                            continue
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            async def body() -> None:
                result.append(await main())
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            tg.start_soon(body)
        if interrupted or not result:
            raise Cancelled("interrupted; the journal holds what is needed to resume")
        return result[0]

    backend_options: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:  # pragma: no cover
        pass
    # everything imported so far lives until exit: move it out of the collector's sight, so the full
    # collections a long run triggers do not walk aiohttp's and our modules again and again while holding
    # the GIL that the transfer threads need (measured: a fifth of the loop thread's time in a pull)
    gc.freeze()
    try:
        return anyio.run(wrapper, backend_options=backend_options)
    except BaseExceptionGroup as eg:
        # the task group wraps what main raised; callers want the error itself
        leaf: BaseException = eg
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        raise leaf from None
    finally:
        if reporter is not None:
            reporter.close()
        metrics = sys.modules.get("asyncdepo.cli.metrics")  # loaded only when --metrics-port was given
        if metrics is not None:
            metrics.shutdown()


def print_report(report: Any, *, json_out: bool = False, resume_hint: str | None = None) -> int:
    """The final report on stderr (stdout JSON with --json), and the exit status for it."""
    if json_out:
        return EXIT_OK if report.ok else EXIT_FAILED
    secs = report.seconds
    limit = getattr(report, "bwlimit", None)
    # MB = 10^6 bytes everywhere in the report; --bwlimit is in binary units (60M = 62.9 MB/s), so it is
    # shown converted next to the rate it bounds
    held = f"; --bwlimit {limit / 1e6:,.1f} MB/s" if limit else ""
    lines = [
        (f"job {report.job_id}: {report.files_done} sent, {report.files_skipped} skipped, "
         f"{report.files_failed} failed; {report.bytes / 1e6:,.1f} MB in {secs:.2f} s "
         f"({report.mb_per_s:,.1f} MB/s on the wire{held}), {report.retries} retries"),
    ]
    for rel, err in report.failures[:20]:
        lines.append(f"  failed: {printable(rel)}: {printable(err)}")
    if len(report.failures) > 20:
        lines.append(f"  ... and {len(report.failures) - 20} more (asyncdepo status {report.job_id})")
    for key, value in (report.summary or {}).items():
        lines.append(f"  {key}: {value}")
    for name, w in sorted(getattr(report, "workers", {}).items()):
        lines.append(f"  worker {name}: {w['files']} files, {w['bytes'] / 1e6:,.1f} MB "
                     f"({w['bytes_sent'] / 1e6:,.1f} MB on the wire) in {w['batches']} batches"
                     + (f", {w['failed']} failed" if w["failed"] else ""))
    if not report.ok and resume_hint:
        lines.append(f"to retry the failed items: {resume_hint}")
    print("\n".join(lines), file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED
