"""``asyncdepo login pdis``, ``asyncdepo push pdis DIR... | --each PARENT``, ``asyncdepo pdis submissions|
status|delete|equipment`` — the Protein Diffraction Image Server from the command line.

Token: ``asyncdepo login pdis`` exchanges an email and a password (asked with getpass, or read from
``ASYNCDEPO_PDIS_PASSWORD``; never from argv) for the API token and keeps it in
``$XDG_CONFIG_HOME/asyncdepo/pdis-token`` (mode 0600, JSON ``{server: token}``). ``ASYNCDEPO_PDIS_TOKEN``
overrides the file. The server is ``--server`` or ``ASYNCDEPO_PDIS_SERVER`` (default proteindiffraction.org).

Push: the metadata is validated before any byte is sent (exit 2, naming the field); the token and the
synchrotron/beamline ids are checked with ``GET equipment/`` (exit 3 on a refused token); then each dataset
is one engine job (tar -> zstd -> multipart upload -> submit), at most ``--transfers`` at once, each with its
own progress line and result. ``--wait`` polls each submission to a terminal status and prints what it
means and what to do next. Exit: 0 all submitted (and published with --wait); 1 a dataset failed; 2 bad
usage; 3 auth; 4 the archive refused (an error status such as error_no_data, a conflict); 130 interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson

from asyncdepo.adapters.pdis import (
    DEFAULT_SERVER,
    STATUSES,
    Metadata,
    PdisAdapter,
    PdisClient,
    normalize_server,
)
from asyncdepo.cli import common
from asyncdepo.cli.pdis_token import load_token, save_token, token_path
from asyncdepo.errors import AuthError, Cancelled, DepoError, UsageError
from asyncdepo.events import Event, ItemFailed, ItemRetrying, JsonSink, Message, Reporter, Sink

PASSWORD_ENV, SERVER_ENV, EMAIL_ENV = "ASYNCDEPO_PDIS_PASSWORD", "ASYNCDEPO_PDIS_SERVER", "ASYNCDEPO_PDIS_EMAIL"


# -- output ------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


class _Board:
    """One live line per dataset on a terminal (rich), or nothing when not a terminal."""

    def __init__(self, names: list[str], live: bool) -> None:
        self.rows: dict[str, str] = {n: "waiting" for n in names}
        self.console: Any = None
        self.live: Any = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self.console = Console(stderr=True)
            self.live = Live("", console=self.console, refresh_per_second=4)
            self.live.start()

    def print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self, name: str, text: str) -> None:
        self.rows[name] = text
        if self.live is not None:
            from rich.table import Table

            table = Table.grid(padding=(0, 2))
            for n, row in self.rows.items():
                table.add_row(n, row)
            self.live.update(table)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


class _DatasetSink(Sink):
    """A dataset's events: messages/failures printed with its name, its row redrawn on each tick."""

    def __init__(self, board: _Board, name: str) -> None:
        self.board, self.name = board, name

    def emit(self, event: Event) -> None:
        if isinstance(event, Message):
            self.board.print(f"{self.name}: {event.text}")
        elif isinstance(event, ItemFailed):
            self.board.print(f"{self.name}: failed: {event.error.splitlines()[0]}")
        elif isinstance(event, ItemRetrying):
            self.board.print(f"{self.name}: retrying (attempt {event.attempt}): {event.error}")

    def tick(self, snap: dict[str, Any]) -> None:
        self.board.update(self.name, f"{_size(snap['bytes_done'])} read, {_size(snap['bytes_sent'])} sent, "
                          f"{_size(snap['rate'])}/s, files {snap['files_total']}")


class _DatasetJson(JsonSink):
    """JSON lines tagged with the dataset's name."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stdout)
        self.name = name

    def emit(self, event: Event) -> None:
        self._write({**event.to_json(), "dataset": self.name})

    def tick(self, snapshot: dict[str, Any]) -> None:
        self._write({"event": "snapshot", "dataset": self.name, **snapshot})


def describe_status(status: str) -> str:
    meaning, next_action, _, _ = STATUSES.get(status, ("unknown status", "contact PDIS support", True, False))
    return f"{status}: {meaning}; next: {next_action}"


def _run(main: Callable[[], Any]) -> Any:
    """``common.run`` with a task group's error unwrapped to the DepoError inside it (for error_exit)."""
    try:
        return common.run(main)
    except BaseExceptionGroup as group:
        leaf: BaseException | None = group.split(DepoError)[0]
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if leaf is not None:
            raise leaf from None
        raise


# -- login ---------------------------------------------------------------------------------------------------
def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, metavar="URL",
                   help=f"PDIS API base URL (default ${SERVER_ENV} or {DEFAULT_SERVER})")


def _server(args: argparse.Namespace) -> str:
    return normalize_server(args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER)


def login_main(argv: list[str]) -> int:
    """``asyncdepo login pdis [--server URL] [--email EMAIL]``."""
    p = argparse.ArgumentParser(prog="asyncdepo login pdis", description="Exchange email + password for the "
                                f"PDIS API token and store it (0600) in {token_path()}. The password is asked "
                                f"for, or read from ${PASSWORD_ENV}; never give it on the command line.")
    _server_arg(p)
    p.add_argument("--email", help=f"account email (default ${EMAIL_ENV}, else asked)")
    args = p.parse_args(argv)
    try:
        server = _server(args)
        email = args.email or os.environ.get(EMAIL_ENV) or input("PDIS email: ").strip()
        from_env = bool(os.environ.get(PASSWORD_ENV))
        password = os.environ.get(PASSWORD_ENV) or getpass.getpass("PDIS password: ")
        if not email or not password:
            raise UsageError("an email and a password are needed")

        async def main() -> str:
            async with PdisClient(server, None) as client:
                try:
                    return await client.login(email, password)
                except AuthError as exc:  # say where the refused password came from
                    where = f"${PASSWORD_ENV}" if from_env else "the password typed at the prompt"
                    exc.hint = (f"check the email ({email}) and {where}"
                                + (f"; unset {PASSWORD_ENV} to be asked instead" if from_env else
                                   f"; it may also be given in {PASSWORD_ENV}"))
                    raise

        token = _run(main)
        path = save_token(server, token)
    except Cancelled:
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        return common.error_exit(exc)
    print(f"logged in to {server} as {email}; token stored in {path}", file=sys.stderr)
    return 0


# -- push ----------------------------------------------------------------------------------------------------
def _push_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncdepo push pdis", description="Stream each dataset directory to PDIS "
                                "as tar -> zstd (no temporary archive), verify the server's md5, submit the "
                                "metadata and, with --wait, follow it to a terminal status.")
    p.add_argument("datasets", nargs="*", type=Path, metavar="DIR", help="dataset directories (one submission each)")
    p.add_argument("--each", type=Path, metavar="PARENT", help="one dataset per subdirectory of PARENT")
    _server_arg(p)
    meta = p.add_argument_group("metadata (checked before any byte is sent)")
    meta.add_argument("--pdb", metavar="CODE", help="4-character PDB ID, or 'auto' for the id PDIS detects")
    meta.add_argument("--dataset-type", choices=("pdb", "other"), default="pdb")
    meta.add_argument("--title", help="project title (>= 10 characters; required without --pdb)")
    meta.add_argument("--authors", help="author list, e.g. 'Smith J., Doe A.' (required without --pdb)")
    meta.add_argument("--synchrotron-id", type=int, metavar="ID", help="see `asyncdepo pdis equipment`")
    meta.add_argument("--beamline-id", type=int, metavar="ID", help="with --synchrotron-id")
    meta.add_argument("--equipment-other", metavar="TEXT", help="free-text equipment (instead of the ids)")
    p.add_argument("--level", type=int, default=None, help="zstd level (default 3)")
    p.add_argument("--wait", action="store_true", help="poll each submission until a terminal status")
    p.add_argument("--poll-interval", type=float, default=5.0, metavar="S",
                   help="first polling interval, x1.5 per poll up to 60 s (default 5)")
    p.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="give up waiting after S s")
    common.add_engine_options(p)
    common.add_cluster_options(p)  # accepted, to say clearly why they do not apply
    common.add_watch_options(p)
    return p


def _datasets(args: argparse.Namespace) -> list[Path]:
    dirs = [d.absolute() for d in args.datasets]
    if args.each is not None:
        if not args.each.is_dir():
            raise UsageError(f"--each {args.each}: not a directory")
        dirs += sorted(d.absolute() for d in args.each.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise UsageError("no dataset given: name directories, or --each PARENT")
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"{d}: not a directory")
        if not any(p.is_file() for p in d.rglob("*")):  # lazy: stops at the first file
            raise UsageError(f"{d}: no files to send", hint="PDIS needs the diffraction images of the dataset")
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise UsageError("two datasets have the same directory name; PDIS would see the same file name")
    return dirs


def _metadata(args: argparse.Namespace) -> Metadata:
    meta = Metadata(pdb_code=args.pdb, dataset_type=args.dataset_type, project_title=args.title,
                    project_authors=args.authors, synchrotron_id=args.synchrotron_id,
                    beamline_id=args.beamline_id, equipment_other=args.equipment_other)
    meta.validate()
    return meta


def push_main(argv: list[str]) -> int:
    """``asyncdepo push pdis DIR... [--each PARENT] --pdb CODE [...] [--wait]``."""
    args = _push_parser().parse_args(argv)
    try:
        common.refuse_watch(args, "PDIS takes each dataset as one archive, packed and submitted once",
                            hint="push the dataset when it is complete, e.g. from the beamline's end-of-run "
                                 "hook: asyncdepo push pdis DIR --pdb CODE")
        if common.cluster_options(args) is not None:
            raise UsageError("PDIS takes each dataset as one packed upload (a tar.zst stream), which runs on "
                             "one node: it cannot be split over a cluster",
                             hint="run the push without --scheduler / --local-cluster")
        dirs = _datasets(args)
        meta = _metadata(args)
        server = _server(args)
        token = load_token(server)
        config = common.engine_config(args)
        level = args.level or (config.compress[1] if config.compress else 3)
        if not 1 <= level <= 22:
            raise UsageError("--level must be 1-22")
        config = config.replace(compress=("zstd", level))
        metrics = common.metrics_exporter(args)  # started before anything is sent
    except DepoError as exc:
        return common.error_exit(exc)
    # each dataset gets a reporter of its own below (common.make_reporter would start a second live display)
    common.setup_logging(args)
    board = _Board([d.name for d in dirs], live=not args.json and not args.quiet and sys.stderr.isatty())
    stored = ["push", "pdis", *[str(a) for a in argv]]
    results: dict[str, dict[str, Any]] = {}

    async def one(client: PdisClient, root: Path, limiter: anyio.CapacityLimiter) -> None:
        from asyncdepo.engine.scheduler import push

        name = root.name
        sinks: list[Sink] = [_DatasetJson(name)] if args.json else [_DatasetSink(board, name)]
        if metrics is not None:
            sinks.insert(0, metrics.sink())  # one endpoint: the datasets' figures add up
        reporter = Reporter(sinks)
        adapter = PdisAdapter(client, meta, on_message=reporter.message)
        res: dict[str, Any] = {"dataset": name, "exit": 0}
        results[name] = res
        try:
            async with limiter:
                report = await push(root, adapter, config, reporter=reporter, argv=stored)
            res.update(adapter.result, job=report.job_id, seconds=report.seconds, bytes_sent=report.bytes_sent)
            if not report.ok:
                if adapter.error is not None:  # submit refused: keep its class (exit status) and hint
                    raise adapter.error
                res.update(exit=common.EXIT_FAILED, error="; ".join(e for _, e in report.failures) or "failed")
                return
            board.update(name, f"{adapter.result.get('status')} ({_size(adapter.result.get('size', 0))} tar)")
            if args.wait and adapter.result.get("token"):
                def seen(status: str, _: dict[str, Any]) -> None:
                    board.update(name, status)
                    reporter.message(describe_status(status))

                sub = await client.wait_for(adapter.result["token"], interval=args.poll_interval,
                                            timeout=args.wait_timeout, on_status=seen)
                res["status"] = sub.get("status")
                if not STATUSES.get(str(sub.get("status")), ("", "", True, False))[3]:
                    res["exit"] = common.EXIT_REFUSED
        except DepoError as exc:
            res.update(exit=_exit_code(exc), error=exc.describe())

    async def main() -> None:
        async with PdisClient(server, token) as client:
            meta.check_equipment(await client.equipment())  # the token works, the ids exist
            limiter = anyio.CapacityLimiter(max(1, config.transfers))
            async with anyio.create_task_group() as tg:
                for root in dirs:
                    tg.start_soon(one, client, root, limiter)

    try:
        _run(main)
    except Cancelled:
        board.close()
        print("\ninterrupted; run the same command again to continue (uploads done are not repeated)",
              file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        board.close()
        return common.error_exit(exc)
    board.close()
    return _print_results(results, dirs, args.json)


def _exit_code(exc: DepoError) -> int:
    from asyncdepo.errors import PermanentError, TransientError

    if isinstance(exc, UsageError):
        return common.EXIT_USAGE
    if isinstance(exc, AuthError):
        return common.EXIT_AUTH
    if isinstance(exc, PermanentError):
        return common.EXIT_REFUSED
    if isinstance(exc, TransientError):
        return common.EXIT_TRANSIENT
    return common.EXIT_FAILED


def _print_results(results: dict[str, dict[str, Any]], dirs: list[Path], json_out: bool) -> int:
    code = 0
    for root in dirs:
        res = results.get(root.name, {"dataset": root.name, "exit": common.EXIT_FAILED, "error": "not run"})
        code = max(code, int(res["exit"]))
        if json_out:
            print(orjson.dumps({"event": "pdis_result", **res}).decode(), flush=True)
            continue
        if res.get("error"):
            print(f"{root.name}: FAILED: {res['error']}", file=sys.stderr)
            if res.get("token"):
                print(f"  submission {res['token']} ({res.get('status')})", file=sys.stderr)
            continue
        line = (f"{root.name}: submission {res.get('token')} (tar md5 {res.get('md5')}, {_size(res.get('size', 0))}"
                f", PDB {res.get('pdbid') or '-'})")
        print(line, file=sys.stderr)
        print(f"  {describe_status(str(res.get('status')))}", file=sys.stderr)
    return code


# -- pdis submissions | status | delete | equipment ----------------------------------------------------------
def _group_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncdepo pdis", description="Manage PDIS submissions.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (("submissions", "list your submissions, newest first"),
                       ("status", "one submission's status, meaning and next action"),
                       ("delete", "delete a submission (only uploaded, validated or error_no_data)"),
                       ("equipment", "synchrotrons and beamlines with their ids")):
        sp = sub.add_parser(name, help=text, description=text)
        if name in ("status", "delete"):
            sp.add_argument("token", help="the submission's upload token")
        if name == "status":
            sp.add_argument("--wait", action="store_true", help="poll until a terminal status")
            sp.add_argument("--poll-interval", type=float, default=5.0, metavar="S")
            sp.add_argument("--wait-timeout", type=float, default=None, metavar="S")
    common.anywhere(p, sub, _group_options)  # --server and --json before or after the command
    return p


def _group_options(p: argparse.ArgumentParser, extra: dict[str, Any]) -> None:
    p.add_argument("--server", metavar="URL", help=f"PDIS API base URL (default ${SERVER_ENV} or {DEFAULT_SERVER})",
                   **({"default": None} | extra))
    p.add_argument("--json", action="store_true", help="JSON on stdout", **({"default": False} | extra))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def group_main(argv: list[str]) -> int:
    """``asyncdepo pdis submissions|status|delete|equipment``."""
    args = _group_parser().parse_args(argv)
    out: Callable[[Any], None] = lambda obj: print(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode())
    try:
        server = _server(args)
        token = load_token(server)

        async def main() -> int:
            async with PdisClient(server, token) as client:
                return await _group_command(client, args, out)

        return int(_run(main))
    except Cancelled:
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        return common.error_exit(exc)


async def _group_command(client: PdisClient, args: argparse.Namespace, out: Callable[[Any], None]) -> int:
    if args.command == "equipment":
        data = await client.equipment()
        if args.json:
            out(data)
            return 0
        rows = [["SYNCHROTRON", "ID", "BEAMLINE", "BEAMLINE ID", "NAME"]]
        for s in data:
            rows.append([str(s.get("short")), str(s.get("id")), "", "", str(s.get("fullname") or "")])
            for b in s.get("beamlines", []):
                rows.append(["", "", str(b.get("short")), str(b.get("id")), str(b.get("fullname") or "")])
        print(_table(rows))
        return 0
    if args.command == "submissions":
        subs = await client.submissions()
        if args.json:
            out(subs)
        elif not subs:
            print("no submissions")
        else:
            rows = [["TOKEN", "STATUS", "PDB", "FILE", "INSERTED"]]
            rows += [[str(s.get("token")), str(s.get("status")), str(s.get("pdbid") or "-"),
                      str(s.get("original_filename")), str(s.get("inserted"))] for s in subs]
            print(_table(rows))
        return 0
    if args.command == "delete":
        await client.delete(args.token)
        out({"deleted": args.token}) if args.json else print(f"deleted submission {args.token}")
        return 0
    # status
    def seen(status: str, _: dict[str, Any]) -> None:
        if not args.json:
            print(describe_status(status), file=sys.stderr, flush=True)

    if args.wait:
        sub = await client.wait_for(args.token, interval=args.poll_interval, timeout=args.wait_timeout,
                                    on_status=seen)
    else:
        sub = await client.submission(args.token)
    status = str(sub.get("status"))
    if args.json:
        out(sub)
    else:
        if not args.wait:
            print(describe_status(status))
        print(f"  file {sub.get('original_filename')}  md5 {sub.get('md5hash')}  PDB {sub.get('pdbid') or '-'}")
        if sub.get("status_details"):
            print(f"  details: {sub['status_details']}")
    terminal, success = STATUSES.get(status, ("", "", True, False))[2:]
    return common.EXIT_REFUSED if terminal and not success else 0
