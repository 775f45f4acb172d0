"""``asyncdepo pull immport PATH... OUTDIR [--study SDY1] [--via https|ascp]``: fetch ImmPort shared data.

Both routes run in the engine (``asyncdepo.pull``) as a journaled job of kind ``pull``: ``asyncdepo jobs``
lists it, ``asyncdepo status JOB`` shows it, ``asyncdepo resume JOB`` continues it; progress, ``--json``,
``--bwlimit``, the report and the exit statuses are those of every pull. ``https`` (default): concurrent DRS
lookups and ranged GETs, Range resume of ``*.asyncdepo-part`` files. ``ascp``: sessions of ``--batch-files``
files, each one ascp receive over a ``--file-pair-list`` with ``-k 2`` (see
:mod:`asyncdepo.adapters.immport_ascp`), retried through the engine's pacer. Either way each file's md5 is
checked against the manifest, it is written under a temporary name and renamed into place, and files already
present with the right md5 are skipped.

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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from asyncdepo.adapters.immport import ASPERA_HOST, Endpoints, ImmportAdapter, Secret
from asyncdepo.cli import common
from asyncdepo.config import EngineConfig
from asyncdepo.engine.pull import pull
from asyncdepo.engine.report import RunReport
from asyncdepo.errors import Cancelled, DepoError, UsageError
from asyncdepo.events import Reporter

if TYPE_CHECKING:  # the ascp runner is imported only by the ascp route (it costs start-up time on https)
    from asyncdepo.transport.ascp.runner import AscpOptions

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
    common.add_engine_options(p)
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


# -- the command ---------------------------------------------------------------------------------------------
def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _adapter(args: argparse.Namespace, opts: AscpOptions | None = None) -> tuple[ImmportAdapter, str]:
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
                             endpoints=endpoints, drs=args.drs, ascp=opts, session_files=args.batch_files)
    return adapter, outdir


async def _pull(args: argparse.Namespace, adapter: ImmportAdapter, outdir: str, config: EngineConfig,
                reporter: Reporter, argv: list[str]) -> RunReport:
    async with adapter:
        await adapter.authenticate()  # a wrong password is reported before anything else happens
        return await pull(adapter, outdir, config, reporter=reporter, argv=argv)


def _ascp_options(args: argparse.Namespace) -> AscpOptions | None:
    """The ascp route's options, with ascp found and answering (checked before the login), or None."""
    if args.via != "ascp":
        return None
    from asyncdepo.transport.ascp.runner import AscpOptions, check_ascp

    opts = AscpOptions(ascp=args.ascp, mode="recv", host=args.aspera_host, user=ASPERA_USER,
                       key_file=args.aspera_key, tcp_port=args.aspera_port, udp_port=args.aspera_port,
                       resume=2, rate=args.rate, management_port=True, stall_timeout=args.stall_timeout)
    return dataclasses.replace(opts, ascp=check_ascp(opts))


def stored_argv(argv: Sequence[str], outdir: str) -> list[str]:
    """The command that resumes this pull (``asyncdepo resume JOB``), OUTDIR made absolute; secret-free (the
    password is never on the command line)."""
    out = list(argv)
    for i in range(len(out) - 1, -1, -1):
        if out[i] == outdir:
            out[i] = str(Path(outdir).absolute())
            break
    return ["pull", "immport", *out]


def pull_main(argv: Sequence[str]) -> int:
    """``asyncdepo pull immport ...``; returns the exit status (see ``asyncdepo.cli.common``)."""
    args = build_parser().parse_args(list(argv))
    try:
        config = common.engine_config(args)
        opts = _ascp_options(args)  # a missing ascp fails before the login
        adapter, outdir = _adapter(args, opts)
    except DepoError as exc:
        return common.error_exit(exc)
    reporter = common.make_reporter(args, title="ImmPort")
    outcome: list[RunReport | DepoError] = []
    stored = stored_argv(argv, outdir)

    async def main() -> None:
        try:
            outcome.append(await _pull(args, adapter, outdir, config, reporter, stored))
        except BaseException as exc:  # returned, not raised: task groups would wrap it
            inner = _unwrap(exc)
            if not isinstance(inner, DepoError):
                raise
            outcome.append(inner)

    try:
        common.run(main, reporter)
    except Cancelled:
        print("\ninterrupted; run the same command again, or `asyncdepo resume JOB` (see `asyncdepo jobs`), to "
              "continue (partial files resume)", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        return common.error_exit(exc)
    result = outcome[0]
    if isinstance(result, DepoError):
        return common.error_exit(result)
    return common.print_report(result, json_out=args.json, resume_hint=f"asyncdepo resume {result.job_id}")
