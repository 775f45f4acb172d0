"""``asyncdepo push|pull gypsum ...`` and ``asyncdepo gypsum COMMAND ...``.

The GitHub token comes from ``ASYNCDEPO_GYPSUM_TOKEN`` or ``GITHUB_TOKEN`` (never from argv); the server
from ``--server``, else ``ASYNCDEPO_GYPSUM_URL``, else https://gypsum.artifactdb.com. Session files of
uploads kept for resume live next to the journal (``<journal dir>/gypsum-sessions``, 0600).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import orjson

from asyncdepo.adapters.gypsum.adapter import GypsumAdapter
from asyncdepo.adapters.gypsum.api import GypsumClient
from asyncdepo.adapters.gypsum.checks import parse_target
from asyncdepo.adapters.gypsum.session import SessionStore
from asyncdepo.cli import common
from asyncdepo.errors import Cancelled, DepoError, UsageError

DEFAULT_SERVER = "https://gypsum.artifactdb.com"
T = TypeVar("T")


def token_from_env() -> str | None:
    return os.environ.get("ASYNCDEPO_GYPSUM_TOKEN") or os.environ.get("GITHUB_TOKEN") or None


def server_of(args: argparse.Namespace) -> str:
    return str(args.server or os.environ.get("ASYNCDEPO_GYPSUM_URL") or DEFAULT_SERVER)


def session_store(args: argparse.Namespace) -> SessionStore:
    from asyncdepo.engine.journal import default_path

    journal = Path(args.journal) if getattr(args, "journal", None) else default_path()
    return SessionStore(journal.parent / "gypsum-sessions")


def unwrap(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (errors raised inside task groups arrive wrapped)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _engine_run(fn: Callable[[], Awaitable[T]], reporter: Any, on_signal: Callable[[], None] | None = None) -> T:
    """``common.run`` with DepoErrors unwrapped from exception groups."""
    try:
        return common.run(fn, reporter, on_signal=on_signal)
    except BaseExceptionGroup as eg:
        leaf = unwrap(eg)
        if isinstance(leaf, DepoError):
            raise leaf from None
        raise


def _server_option(p: argparse.ArgumentParser, extra: dict[str, Any] | None = None) -> None:
    p.add_argument("--server", metavar="URL", help=f"gypsum REST URL (default $ASYNCDEPO_GYPSUM_URL or {DEFAULT_SERVER})",
                   **(extra or {}))


def _group_options(p: argparse.ArgumentParser, extra: dict[str, Any]) -> None:
    _server_option(p, extra)
    p.add_argument("--journal", metavar="PATH", help="journal whose directory holds the session files (abort)",
                   **extra)


# -- push / pull ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GypsumRecipe:
    """How a worker of a cluster builds its copy of the adapter (pickled into the tasks: nothing secret);
    the upload session and its token come in the handoff, so the worker PUTs files and never starts,
    completes or aborts the upload."""

    server: str
    project: str
    asset: str
    version: str

    def __call__(self, config: Any) -> GypsumAdapter:
        return GypsumAdapter(self.server, self.project, self.asset, self.version)


def push_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="asyncdepo push gypsum",
        description="Upload DIR as a new version of a gypsum asset: md5 of every file first (in parallel), "
                    "quota checked, then concurrent presigned PUTs; unchanged files of the latest version "
                    "become links. On failure or Ctrl-C the upload is aborted (the project is never left "
                    "locked) unless --keep-for-resume; re-running resumes a kept upload. With --watch: what "
                    "exists goes as VERSION, then each batch of new or changed files as VERSION-2, "
                    "VERSION-3... each one the whole dataset (unchanged files linked to the version before); "
                    "..latest names the newest.")
    p.add_argument("source", type=Path, help="directory to upload")
    p.add_argument("target", help="PROJECT/ASSET/VERSION")
    _server_option(p)
    p.add_argument("--probation", action="store_true", help="upload on probation (an owner approves it later)")
    p.add_argument("--no-dedup", action="store_true", help="upload every file, even unchanged ones")
    p.add_argument("--keep-for-resume", action="store_true",
                   help="on failure or Ctrl-C keep the partial upload (and the project lock) to resume it")
    common.add_engine_options(p)
    common.add_cluster_options(p)
    common.add_watch_options(p)
    try:
        args = p.parse_args(argv)
        project, asset, version = parse_target(args.target, need_version=True)
        cluster = common.cluster_options(args)
        watch = common.watch_of(args)
        if watch is not None and cluster is not None:
            raise UsageError("--watch runs on this machine, where the files appear: it cannot be spread over a "
                             "cluster", hint="drop --scheduler / --local-cluster")
        config = common.engine_config(args)
        if config.compress is not None:
            raise UsageError("gypsum stores files as they are: --compress cannot be used")
        token = token_from_env()
        if not token:
            raise UsageError("no GitHub token", hint="set ASYNCDEPO_GYPSUM_TOKEN or GITHUB_TOKEN")
        reporter = common.make_reporter(args, title=f"gypsum {args.target}")
        adapter = GypsumAdapter(server_of(args), project, asset, version, token=token, probation=args.probation,
                                dedup=not args.no_dedup, keep_for_resume=args.keep_for_resume,
                                sessions=session_store(args), reporter=reporter, watch=watch is not None)
        if watch is not None:
            common.publish_watch(reporter, watch)
    except DepoError as exc:
        return common.error_exit(exc)
    except ValueError as exc:
        return common.error_exit(UsageError(str(exc)))
    from asyncdepo.engine.journal import job_id
    from asyncdepo.engine.scheduler import push, target_identity

    stored = ["push", "gypsum", *[str(args.source.absolute()) if a == str(args.source) else a for a in argv]]
    try:
        if cluster is not None:
            from asyncdepo.engine.cluster import push_on_cluster

            recipe = GypsumRecipe(server_of(args), project, asset, str(version))
            report = _engine_run(lambda: push_on_cluster(args.source, adapter, config, recipe, cluster,
                                                         reporter=reporter, argv=stored), reporter)
        else:
            # a watch runs for days: progress and metrics are refreshed every 5 s rather than twice a second
            report = _engine_run(lambda: push(args.source, adapter, config, reporter=reporter, argv=stored,
                                              watch=watch, tick=5.0 if watch else 0.5),
                                 reporter, on_signal=watch.stop if watch else None)
    except Cancelled:
        if watch is not None:
            print("\ninterrupted; a version being uploaded stays open (the project locked): run the same command "
                  f"again to complete it, or discard it with asyncdepo gypsum abort {adapter.project}/"
                  f"{adapter.asset}/{adapter.version}", file=sys.stderr)
            return common.EXIT_INTERRUPTED
        kept = args.keep_for_resume
        print("\ninterrupted; " + ("the upload is kept: run the same command again to resume it"
                                   if kept else "the upload was aborted and the project unlocked"), file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        return common.error_exit(exc)
    jid = job_id("push", str(args.source.absolute()), target_identity(adapter, config))
    if report.interrupted:  # a watch stopped while a version was being uploaded
        common.print_report(report, json_out=args.json)
        print(f"stopped with version {adapter.version} open (the project stays locked): run the same command "
              f"again to complete it, or discard it with asyncdepo gypsum abort {adapter.project}/{adapter.asset}/"
              f"{adapter.version}", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    hint = ("the same command (kept uploads resume)" if args.keep_for_resume or watch is not None
            else f"asyncdepo resume {jid}")
    return common.print_report(report, json_out=args.json, resume_hint=hint)


def pull_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="asyncdepo pull gypsum",
        description="Download a version (the latest by default) concurrently; partial files resume with "
                    "HTTP Range; every file is checked against the manifest's md5.")
    p.add_argument("target", help="PROJECT/ASSET[/VERSION]")
    p.add_argument("outdir", type=Path, help="directory to write into")
    _server_option(p)
    common.add_engine_options(p)
    try:
        args = p.parse_args(argv)
        project, asset, version = parse_target(args.target, need_version=False)
        config = common.engine_config(args)
        reporter = common.make_reporter(args, title=f"gypsum {args.target}")
        adapter = GypsumAdapter(server_of(args), project, asset, version, token=token_from_env(), reporter=reporter)
    except DepoError as exc:
        return common.error_exit(exc)
    except ValueError as exc:
        return common.error_exit(UsageError(str(exc)))
    from asyncdepo.engine.pull import pull

    # the command `asyncdepo resume JOB` reruns: OUTDIR made absolute (the token stays in the environment)
    stored = ["pull", "gypsum", *(str(args.outdir.absolute()) if a == str(args.outdir) else a for a in argv)]
    try:
        report = _engine_run(lambda: pull(adapter, args.outdir, config, reporter=reporter, argv=stored), reporter)
    except Cancelled:
        print("\ninterrupted; run the same command again, or `asyncdepo resume JOB` (see `asyncdepo jobs`), to "
              "continue (partial files resume)", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except DepoError as exc:
        return common.error_exit(exc)
    return common.print_report(report, json_out=args.json, resume_hint=f"asyncdepo resume {report.job_id}")


# -- asyncdepo gypsum COMMAND ------------------------------------------------------------------------------
def _uploader(spec: str) -> dict[str, Any]:
    """``ID[,asset=A][,version=V][,until=ISO-DATE][,trusted]`` -> an uploader entry."""
    first, *rest = spec.split(",")
    entry: dict[str, Any] = {"id": first}
    for part in rest:
        key, eq, value = part.partition("=")
        if key == "trusted" and not eq:
            entry["trusted"] = True
        elif key in ("asset", "version", "until") and value:
            entry[key] = value
        else:
            raise UsageError(f"--uploader {spec!r}: expected ID[,asset=A][,version=V][,until=DATE][,trusted]")
    return entry


def _quota_values(args: argparse.Namespace) -> dict[str, float]:
    return {k: v for k, v in (("baseline", args.baseline), ("growth_rate", args.growth_rate),
                              ("year", args.year)) if v is not None}


def _group_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asyncdepo gypsum", description="Inspect and administer a gypsum server.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    sub.add_parser("ls", help="projects, assets, versions or files").add_argument("path", nargs="?", default="")
    sub.add_parser("versions", help="versions of an asset, latest marked").add_argument("target", help="PROJECT/ASSET")
    m = sub.add_parser("manifest", help="a version's manifest (JSON)")
    m.add_argument("target", help="PROJECT/ASSET[/VERSION]")
    for name, text in (("usage", "bytes used by a project"), ("quota", "a project's quota (JSON)"),
                       ("permissions", "a project's owners and uploaders (JSON)"),
                       ("unlock", "clear a stale upload lock (administrators)")):
        sub.add_parser(name, help=text).add_argument("project")
    for name, text in (("approve", "approve a probational version (owners)"),
                       ("reject", "reject (delete) a probational version"),
                       ("abort", "abort an upload kept for resume (uses its session file)")):
        sub.add_parser(name, help=text).add_argument("target", help="PROJECT/ASSET/VERSION")
    c = sub.add_parser("create", help="create a project (administrators)")
    c.add_argument("project")
    c.add_argument("--owner", action="append", default=[], required=True, help="owner login or org (repeatable)")
    c.add_argument("--uploader", action="append", default=[], type=_uploader,
                   help="ID[,asset=A][,version=V][,until=DATE][,trusted] (repeatable)")
    for q in (c, sq := sub.add_parser("set-quota", help="change a project's quota (administrators)")):
        q.add_argument("--baseline", type=float, help="bytes at the start year")
        q.add_argument("--growth-rate", type=float, help="bytes added each year")
        q.add_argument("--year", type=int, help="start year")
    sq.add_argument("project")
    sp = sub.add_parser("set-permissions", help="add owners/uploaders (owners; --replace to overwrite)")
    sp.add_argument("project")
    sp.add_argument("--owner", action="append", help="owner login or org (repeatable)")
    sp.add_argument("--uploader", action="append", type=_uploader, help="uploader spec, as for create")
    sp.add_argument("--replace", action="store_true", help="replace the lists instead of adding to them")
    common.anywhere(p, sub, _group_options)  # --server and --journal before or after the command
    return p


async def _ls(c: GypsumClient, path: str) -> list[str]:
    prefix = path.strip("/") + "/" if path.strip("/") else None
    depth = len(path.strip("/").split("/")) if path.strip("/") else 0
    keys = await c.list_keys(prefix, recursive=depth >= 3)
    out = [k[len(prefix or ""):] for k in keys]
    return [k for k in out if not k.split("/")[-1].startswith("..") or depth >= 3]


async def _group(args: argparse.Namespace, c: GypsumClient) -> Any:
    cmd = args.cmd
    if cmd == "ls":
        return await _ls(c, args.path)
    if cmd == "versions":
        project, asset, _ = parse_target(args.target + "/x", need_version=True)
        latest = (await c.fetch_json(f"{project}/{asset}/..latest") or {}).get("version")
        # numbers in names compare as numbers: a watch's run1, run1-2, ..., run1-10 in the order it made them
        names = sorted((v.rstrip("/") for v in await _ls(c, f"{project}/{asset}") if v.endswith("/")),
                       key=lambda v: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", v)])
        return [f"{v}  (latest)" if v == latest else v for v in names]
    if cmd == "manifest":
        project, asset, version = parse_target(args.target, need_version=False)
        adapter = GypsumAdapter(c.base, project, asset, version, client=c)
        v = await adapter.resolve_version()
        return await c.fetch_json(f"{project}/{asset}/{v}/..manifest")
    if cmd in ("usage", "quota", "permissions"):
        found = await c.fetch_json(f"{args.project}/..{cmd}")
        if found is None:
            raise UsageError(f"gypsum project '{args.project}' does not exist")
        return found.get("total") if cmd == "usage" else found
    if cmd in ("approve", "reject"):
        await c.probation(cmd, *parse_target(args.target, need_version=True))  # type: ignore[arg-type]
        return f"{cmd}d {args.target}"
    if cmd == "unlock":
        await c.unlock(args.project)
        return f"unlocked {args.project}"
    if cmd == "create":
        await c.create_project(args.project, args.owner, args.uploader, _quota_values(args))
        return f"created {args.project}"
    if cmd == "set-quota":
        values = _quota_values(args)
        if not values:
            raise UsageError("give at least one of --baseline, --growth-rate, --year")
        await c.set_quota(args.project, values)
        return await c.fetch_json(f"{args.project}/..quota")
    if cmd == "set-permissions":
        perms: dict[str, Any] = {}
        old = {} if args.replace else (await c.fetch_json(f"{args.project}/..permissions") or {})
        if args.owner:
            perms["owners"] = list(dict.fromkeys([*old.get("owners", []), *args.owner]))
        if args.uploader:
            perms["uploaders"] = [*old.get("uploaders", []), *args.uploader]
        if not perms:
            raise UsageError("give --owner and/or --uploader")
        await c.set_permissions(args.project, perms)
        return await c.fetch_json(f"{args.project}/..permissions")
    if cmd == "abort":
        project, asset, version = parse_target(args.target, need_version=True)
        adapter = GypsumAdapter(c.base, project, asset, version, client=c, sessions=session_store(args))
        await adapter.find_session()
        if adapter.session is None:
            raise UsageError(f"no upload of {args.target} kept for resume on this machine (or it already ended)",
                             hint=f"an administrator can clear a stale lock: asyncdepo gypsum unlock {project}")
        with anyio.CancelScope(shield=True):
            await adapter.finish(False)
        return f"aborted {args.target}"
    raise UsageError(f"unknown command {cmd!r}")  # pragma: no cover


def _show(value: Any) -> None:
    if isinstance(value, list):
        print("\n".join(str(v) for v in value))
    elif isinstance(value, (dict, int)) or value is None:
        print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())
    else:
        print(value)


def group_main(argv: list[str]) -> int:
    """``asyncdepo gypsum COMMAND ...``; returns the exit status."""
    try:
        args = _group_parser().parse_args(argv)

        async def main() -> Any:
            async with GypsumClient(server_of(args), token_from_env()) as client:
                return await _group(args, client)

        _show(_run(main))
        return 0
    except BaseExceptionGroup as eg:
        leaf = unwrap(eg)
        if not isinstance(leaf, DepoError):
            raise
        return common.error_exit(leaf)
    except DepoError as exc:
        return common.error_exit(exc)
    except ValueError as exc:
        return common.error_exit(UsageError(str(exc)))


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)
