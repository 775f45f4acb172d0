"""``asyncdepo pull immport PATH... OUTDIR [--study SDY1] [--via https|ascp]``: fetch ImmPort shared data.

Routes: ``https`` (default) hands :class:`ImmportAdapter` to the generic engine (``asyncdepo.pull``):
concurrent DRS lookups and ranged GETs, Range resume of ``*.asyncdepo-part`` files, md5 checked against the
manifest, temporary name then rename, files already present with the right md5 skipped. ``ascp`` runs
:func:`pull_via_ascp` below: many files per ascp session through ``--file-pair-list``, ``-k 2``, md5
checks afterwards, the same temporary names (each route resumes the other's partial files).

The password comes from ``ASYNCDEPO_IMMPORT_PASSWORD`` or a prompt, never from the command line; the
user from ``--user`` or ``ASYNCDEPO_IMMPORT_USER``. Unlike ImmPort's reference tool, which exits 0
whatever ascp did, the exit status is non-zero when any file could not be fetched or verified, and the
report lists those files (exit statuses: :mod:`asyncdepo.cli.common`).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from asyncdepo.adapters.immport import ASPERA_HOST, Endpoints, ImmportAdapter, Secret, immport_path
from asyncdepo.cli import common
from asyncdepo.config import EngineConfig
from asyncdepo.contract import RemoteItem
from asyncdepo.engine.pull import pull
from asyncdepo.engine.report import RunReport
from asyncdepo.engine.source import selected
from asyncdepo.errors import (
    AuthError,
    Cancelled,
    DepoError,
    IntegrityError,
    TransientError,
    UsageError,
    is_transient,
)
from asyncdepo.events import ItemDone, ItemFailed, ItemRetrying, ItemSkipped, JobFinished, Reporter
from asyncdepo.transport.pacer import RetryEvent, reason_of

if TYPE_CHECKING:  # the ascp runner is imported only by the ascp route (it costs start-up time on https)
    from asyncdepo.transport.ascp.runner import AscpOptions, AscpProgress

PART = ".asyncdepo-part"  # the engine's temporary suffix (engine.pull.PART)
ASPERA_USER = "databrowser"
PASSWORD_ENV, USER_ENV = "ASYNCDEPO_IMMPORT_PASSWORD", "ASYNCDEPO_IMMPORT_USER"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncdepo pull immport",
        usage="%(prog)s [PATH ...] OUTDIR [--study SDY] [--via https|ascp] [--user U] [--server URL] [options]",
        description="Fetch ImmPort shared data (files, directories or whole studies) with md5 checks, resume "
        "and a non-zero exit status when anything failed.")
    p.add_argument("targets", nargs="+", metavar="PATH ... OUTDIR",
                   help="ImmPort paths (/SDY1/ResultFiles/..., a directory, /SDY1), then the output directory")
    p.add_argument("--study", metavar="SDY", help="fetch every file of this study (its file manifest)")
    p.add_argument("--via", choices=("https", "ascp"), default="https",
                   help="https: DRS + ranged GETs (default); ascp: IBM Aspera sessions")
    p.add_argument("--user", default=os.environ.get(USER_ENV),
                   help=f"ImmPort user name (default ${USER_ENV}); the password is read from ${PASSWORD_ENV} "
                   "or prompted for")
    p.add_argument("--server", metavar="URL", help="one base URL for ImmPort's auth, API and query services "
                   "(e.g. the simulator's); default: ImmPort's own")
    p.add_argument("--drs", choices=("s3", "stream"), default="s3", help="DRS access method (https route)")
    a = p.add_argument_group("ascp route")
    a.add_argument("--ascp", default="ascp", metavar="PATH", help="the ascp executable (default: ascp on PATH)")
    a.add_argument("--aspera-host", default=ASPERA_HOST, help=f"Aspera server (default {ASPERA_HOST})")
    a.add_argument("--aspera-port", type=int, default=33001, help="ascp -P/-O port (33001)")
    a.add_argument("--aspera-key", metavar="FILE", help="ascp -i key (asperaweb_id_dsa.openssh from ImmPort's "
                   "download tool)")
    a.add_argument("--rate", help="ascp target rate -l, e.g. 200M")
    a.add_argument("--stall-timeout", type=float, default=120.0, help="stop ascp after this many seconds "
                   "without progress, then resume (120)")
    a.add_argument("--batch-files", type=int, default=1000, help="files per ascp session (1000)")
    common.add_engine_options(p, journal=False)
    return p


def read_password() -> Secret:
    """The password from ``ASYNCDEPO_IMMPORT_PASSWORD``, else a prompt on a terminal.

    :raises UsageError: neither is available (e.g. in a script with no terminal).
    """
    value = os.environ.get(PASSWORD_ENV)
    if value is None:
        if not sys.stdin.isatty():
            raise UsageError(f"no ImmPort password: set {PASSWORD_ENV} (it is never taken from the command line)")
        value = getpass.getpass("ImmPort password: ")
    return Secret(value)


# -- the ascp route ----------------------------------------------------------------------------------------
def _dest(out: Path, rel: str) -> Path:
    path = (out / rel).resolve()
    if not str(path).startswith(str(out) + os.sep):
        raise UsageError(f"remote path {rel!r} would land outside {out}")
    return path


async def _present(dest: Path, item: RemoteItem) -> bool:
    """True when ``dest`` already holds ``item`` (same size, and md5 when the archive published one)."""
    from asyncdepo.digests import hash_file

    try:
        if item.size is not None and dest.stat().st_size != item.size:
            return False
    except FileNotFoundError:
        return False
    want = item.digests.get("md5")
    return want is None or (await hash_file(dest, ("md5",)))["md5"] == want


async def _verify(out: Path, item: RemoteItem) -> None:
    """Check what ascp delivered under the temporary name, then rename it into place.

    :raises TransientError: missing or short (ascp did not finish it; a rerun resumes it).
    :raises IntegrityError: the md5 differs from the manifest's (the temporary file is deleted).
    """
    from asyncdepo.digests import hash_file

    dest = _dest(out, item.rel)
    part = dest.with_name(dest.name + PART)
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        raise TransientError("ascp did not deliver it") from None
    if item.size is not None and size != item.size:
        raise TransientError(f"ascp delivered {size} of {item.size} bytes")
    want = item.digests.get("md5")
    if want is not None:
        got = (await hash_file(part, ("md5",)))["md5"]
        if got != want:
            part.unlink()
            raise IntegrityError(f"md5 mismatch (archive says {want}, received data has {got})")
    os.replace(part, dest)


async def pull_via_ascp(adapter: ImmportAdapter, outdir: Path | str, opts: AscpOptions, *,
                        config: EngineConfig | None = None, reporter: Reporter | None = None,
                        batch_files: int = 1000) -> RunReport:
    """Fetch what ``adapter.list_remote()`` yields into ``outdir`` with ascp.

    Up to ``batch_files`` files go in one session through a ``--file-pair-list`` (source: the ImmPort
    path; destination: ``rel`` + PART under ``outdir``), with one Aspera token covering exactly those
    paths and ``opts.resume`` (``-k 2``) so partial files resume; ``transfer`` reruns sessions that failed
    transiently. Then each file's size and md5 are checked against the manifest and it is renamed into
    place. Files already present with the right md5 are skipped. Files that failed transiently, or whose
    md5 differed, go into up to ``config.retries`` more sessions; what still fails is in ``failures``.

    :raises AuthError: the login or the Aspera token was refused (nothing could succeed then).
    """
    from asyncdepo.transport.ascp.runner import AscpSecrets, transfer

    config = config or EngineConfig()
    reporter = reporter or Reporter()
    stats = reporter.stats
    out = Path(outdir).absolute().resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport(ok=False, job_id="pull-ascp")
    started = time.monotonic()
    sizes: dict[str, int] = {}
    hashing = anyio.Semaphore(max(2, os.cpu_count() or 2))

    def on_progress(p: AscpProgress) -> None:
        rel = p.file.removesuffix(PART)
        if rel not in stats.active:
            stats.item_in(rel, sizes.get(rel, p.total or -1))
        reporter.progress(rel, p.delta)

    def on_retry(event: RetryEvent) -> None:
        stats.retried(event.reason)
        reporter.emit(ItemRetrying(rel="(ascp session)", attempt=event.attempt, error=str(event.error),
                                   delay=round(event.delay, 3), reason=event.reason))

    def failed(item: RemoteItem, err: DepoError) -> None:
        stats.failed()
        report.failures.append((item.rel, str(err).splitlines()[0]))
        reporter.emit(ItemFailed(rel=item.rel, error=err.describe(), transient=is_transient(err)))

    async def session(pending: list[RemoteItem]) -> None:
        for round_ in range(1 + config.retries):
            token = await adapter.aspera_token([immport_path(i.rel) for i in pending])
            session_error: DepoError | None = None
            with tempfile.TemporaryDirectory(prefix="asyncdepo-ascp-") as tmp:
                pairs = Path(tmp) / "pairs.txt"
                lines = []
                for item in pending:
                    _dest(out, item.rel).parent.mkdir(parents=True, exist_ok=True)
                    lines += [immport_path(item.rel), item.rel + PART]
                pairs.write_text("\n".join(lines) + "\n")
                try:
                    await transfer(opts, [], str(out), secrets=AscpSecrets(token=token), on_progress=on_progress,
                                   on_retry=on_retry, attempts=config.request_attempts, pair_list=pairs)
                except AuthError:
                    raise
                except DepoError as exc:  # what did arrive is still checked and kept
                    session_error = exc
            retry: list[tuple[RemoteItem, DepoError]] = []

            async def check(item: RemoteItem, err_then: DepoError | None, last: bool,
                            retry: list[tuple[RemoteItem, DepoError]]) -> None:
                async with hashing:  # md5s in parallel, a few at a time (hashlib releases the GIL)
                    try:
                        await _verify(out, item)
                    except DepoError as exc:
                        err = exc if err_then is None or isinstance(exc, IntegrityError) else err_then
                        if is_transient(err) and not last:
                            retry.append((item, err))
                        else:
                            failed(item, err)
                    else:
                        stats.done(sizes[item.rel])
                        reporter.emit(ItemDone(rel=item.rel, size=sizes[item.rel], sent=sizes[item.rel],
                                               digests=dict(item.digests)))
                    finally:
                        stats.item_out(item.rel)

            async with anyio.create_task_group() as tg:  # at most batch_files tasks
                for item in pending:
                    tg.start_soon(check, item, session_error, round_ == config.retries, retry)
            if not retry:
                return
            for item, err in retry:
                stats.retried(reason_of(err))
                reporter.emit(ItemRetrying(rel=item.rel, attempt=round_ + 1, error=str(err), delay=0.0))
            pending = [item for item, _ in retry]

    try:
        async with adapter:
            batch: list[RemoteItem] = []
            async for item in adapter.list_remote():
                if not selected(item.rel, config.include, config.exclude):
                    continue
                stats.found(item.size)
                if await _present(_dest(out, item.rel), item):
                    stats.skipped(item.size or 0)
                    reporter.emit(ItemSkipped(rel=item.rel, size=item.size or 0, reason="already present"))
                    continue
                sizes[item.rel] = item.size or 0
                batch.append(item)
                if len(batch) >= batch_files:
                    await session(batch)
                    batch = []
            if batch:
                await session(batch)
    finally:
        report.files_done, report.files_skipped = stats.files_done, stats.files_skipped
        report.files_failed = len(report.failures)
        report.bytes, report.bytes_sent, report.retries = stats.bytes_done, stats.bytes_sent, stats.retries
        report.seconds = round(time.monotonic() - started, 3)
        report.ok = not report.failures
        report.summary = {"route": "ascp", **await adapter.finish(report.ok)}
        reporter.emit(JobFinished(job=report.job_id, report=report.to_json()))
    return report


# -- the command ---------------------------------------------------------------------------------------------
def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _adapter(args: argparse.Namespace) -> tuple[ImmportAdapter, str]:
    """The adapter and OUTDIR from the command line; checks everything local and reads the password.

    :raises UsageError: nothing to pull, no user, no password.
    """
    *paths, outdir = args.targets
    if not paths and not args.study:
        raise UsageError("nothing to pull: give ImmPort paths before OUTDIR, or --study SDYnnn")
    if not args.user:
        raise UsageError(f"no ImmPort user: give --user or set {USER_ENV}")
    endpoints = Endpoints.single(args.server) if args.server else Endpoints()
    adapter = ImmportAdapter(user=args.user, password=read_password(), paths=paths, study=args.study,
                             endpoints=endpoints, drs=args.drs)
    return adapter, outdir


def ascp_rate(rate: str | None, bwlimit: float | None) -> str | None:
    """ascp's ``-l`` (bits/s): ``--rate`` as given, else ``--bwlimit`` (bytes/s) in kilobits, so the
    engine's one limit also holds on the ascp route."""
    if rate:
        return rate
    return f"{max(1, round(bwlimit * 8 / 1000))}K" if bwlimit else None


async def _pull(args: argparse.Namespace, adapter: ImmportAdapter, outdir: str, config: EngineConfig,
                reporter: Reporter) -> RunReport:
    opts = None
    if args.via == "ascp":
        from asyncdepo.transport.ascp.runner import AscpOptions, check_ascp

        opts = AscpOptions(ascp=args.ascp, mode="recv", host=args.aspera_host, user=ASPERA_USER,
                           key_file=args.aspera_key, tcp_port=args.aspera_port, udp_port=args.aspera_port,
                           resume=2, rate=ascp_rate(args.rate, config.bwlimit), management_port=True,
                           stall_timeout=args.stall_timeout)
        binary = await anyio.to_thread.run_sync(check_ascp, opts)  # a missing ascp fails before the login
        opts = dataclasses.replace(opts, ascp=binary)
    async with adapter:
        await adapter.authenticate()  # a wrong password is reported before anything else happens
        if opts is not None:
            return await pull_via_ascp(adapter, outdir, opts, config=config, reporter=reporter,
                                       batch_files=args.batch_files)
        return await pull(adapter, outdir, config, reporter=reporter)


def pull_main(argv: Sequence[str]) -> int:
    """``asyncdepo pull immport ...``; returns the exit status (see ``asyncdepo.cli.common``)."""
    args = build_parser().parse_args(list(argv))
    try:
        config = common.engine_config(args)
        adapter, outdir = _adapter(args)
    except DepoError as exc:
        return common.error_exit(exc)
    reporter = common.make_reporter(args, title="ImmPort")
    outcome: list[RunReport | DepoError] = []

    async def main() -> None:
        try:
            outcome.append(await _pull(args, adapter, outdir, config, reporter))
        except BaseException as exc:  # returned, not raised: task groups would wrap it
            inner = _unwrap(exc)
            if not isinstance(inner, DepoError):
                raise
            outcome.append(inner)

    try:
        common.run(main, reporter)
    except Cancelled:
        print("\ninterrupted; run the same command again to continue (partial files resume)", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        return common.error_exit(exc)
    result = outcome[0]
    if isinstance(result, DepoError):
        return common.error_exit(result)
    return common.print_report(result, json_out=args.json, resume_hint="run the same command again")

