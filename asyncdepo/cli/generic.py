"""The archive-neutral commands: push/pull to URL targets, resume, status, jobs, sim."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import anyio

from asyncdepo.cli import common
from asyncdepo.errors import Cancelled, DepoError, UsageError
from asyncdepo.events import printable, printable_tree

SECRET_ENV = {"tus+http": "ASYNCDEPO_TUS_TOKEN", "tus+https": "ASYNCDEPO_TUS_TOKEN"}

EPILOG = """\
targets:
  file:///DIR                      a local directory (files appear only when complete)
  tus+http://HOST:PORT/files/      a tus 1.0.0 server (token, if any, from ASYNCDEPO_TUS_TOKEN)
  s3://BUCKET/PREFIX               S3 or compatible (--endpoint-url; AWS_* credentials / profiles)
archives:
  asyncdepo push pdis DIR --pdb 1ABC          asyncdepo push gypsum DIR PROJECT/ASSET/VERSION
  asyncdepo push empiar TOKEN DEPOSITION.json DATA
  asyncdepo pull gypsum PROJECT/ASSET[/VERSION] DIR    asyncdepo pull immport PATH... OUTDIR
  (each has --help)
"""



def _s3_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("S3 (credentials from the AWS environment variables or --profile)")
    group.add_argument("--endpoint-url", help="S3 endpoint (e.g. http://127.0.0.1:9000)")
    group.add_argument("--region", help="S3 region (default: AWS_REGION, the profile's, or us-east-1)")
    group.add_argument("--profile", help="AWS profile name")
    group.add_argument("--s3-checksum", default="crc64nvme", choices=("crc64nvme", "crc32c", "crc32", "none"),
                       help="checksum sent with every body and part, verified by S3, and the whole object's, "
                            "composed from the parts' (default crc64nvme; crc32c/crc32 for S3-compatible "
                            "servers without CRC-64/NVME)")
    group.add_argument("--s3-md5", action="store_true",
                       help="also send Content-MD5 with every body (endpoints that demand it); costs an md5 "
                            "of every byte (~0.6 GB/s a core)")

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncdepo", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Push scientific datasets into public archives and pull them back: concurrent, "
                    "resumable after any crash, verified by digest end to end.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    push = sub.add_parser("push", help="send a directory or file to a target URL (or an archive)",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                          description="Send SOURCE to TARGET. Re-running the same command resumes: files "
                                      "done and unchanged are skipped, partial ones continue where the "
                                      "server stopped.")
    push.add_argument("source", type=Path, help="directory or file to send")
    push.add_argument("target", help="target URL (file://, tus+http://, s3://)")
    _s3_options(push)
    common.add_engine_options(push)
    common.add_cluster_options(push)
    common.add_watch_options(push)

    pull = sub.add_parser("pull", help="fetch from a target URL (or an archive) into a directory")
    pull.add_argument("source", help="URL to fetch from (file://, s3://)")
    pull.add_argument("outdir", type=Path, help="directory to write into")
    _s3_options(pull)
    common.add_engine_options(pull)

    res = sub.add_parser("resume", help="continue an interrupted or failed job",
                         description="Run a job's recorded command again. Cluster flags given here replace "
                                     "the recorded ones (a job started on one node may resume on a cluster, "
                                     "and back).")
    res.add_argument("job", help="job id (a unique prefix is enough; see `asyncdepo jobs`)")
    res.add_argument("--journal", metavar="PATH")
    common.add_cluster_options(res)

    st = sub.add_parser("status", help="per-state counts and failures of a job")
    st.add_argument("job")
    st.add_argument("--journal", metavar="PATH")
    st.add_argument("--json", action="store_true")

    jobs = sub.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--journal", metavar="PATH")
    jobs.add_argument("--json", action="store_true")

    # sim hands the rest of the line to its own parser; its own -h/--help is kept here so
    # that `asyncdepo sim --help` answers (exit 0) instead of being refused as an unknown option
    sim = sub.add_parser("sim", help="run a local simulator of an archive (tus, pdis, gypsum, empiar, "
                                     "globus, immport)", add_help=False)
    sim.add_argument("-h", "--help", action="store_true", dest="wants_help")
    sim.add_argument("name", nargs="?")
    sim.add_argument("rest", nargs=argparse.REMAINDER)

    return p


def make_adapter(url: str, args: argparse.Namespace, config: Any = None, *, secrets_from_env: bool = True) -> Any:
    """The adapter for a target URL; raises UsageError naming the known schemes. ``secrets_from_env``
    False: no token from the environment (a cluster's worker gets the coordinator's in the handoff)."""
    from asyncdepo import adapters as base

    scheme = url.split("://", 1)[0] if "://" in url else ""
    factory = base.lookup(scheme)
    if factory is None:
        raise UsageError(f"unknown target {url!r}; use one of: "
                         + ", ".join(f"{s}://" for s in base.schemes()),
                         hint="archives have their own commands: asyncdepo push pdis|gypsum|empiar --help")
    secrets = {}
    env = SECRET_ENV.get(scheme)
    if env and secrets_from_env and os.environ.get(env):
        secrets["token"] = os.environ[env]
    kw: dict[str, Any] = {}
    if scheme == "s3":
        kw = {"endpoint_url": args.endpoint_url, "region": args.region, "profile": args.profile,
              "checksum": getattr(args, "s3_checksum", "crc64nvme"), "md5": getattr(args, "s3_md5", False)}
    return factory(url, config, secrets, **kw)


@dataclasses.dataclass(frozen=True)
class TargetRecipe:
    """How a worker of a cluster builds its copy of a URL target's adapter: the URL and the public S3
    options (pickled into the tasks, so nothing secret); credentials come in the adapter's handoff."""

    url: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    def __call__(self, config: Any) -> Any:
        args = argparse.Namespace(endpoint_url=self.endpoint_url, region=self.region, profile=self.profile)
        return make_adapter(self.url, args, config, secrets_from_env=False)


def _push(args: argparse.Namespace, argv: list[str]) -> int:
    from asyncdepo.engine.journal import job_id
    from asyncdepo.engine.scheduler import push, target_identity

    config = common.engine_config(args)
    adapter = make_adapter(args.target, args, config)
    watch = common.watch_of(args)
    if watch is not None and common.cluster_options(args) is not None:
        raise UsageError("--watch runs on this machine, where the files appear: it cannot be spread over a "
                         "cluster", hint="drop --scheduler / --local-cluster")
    reporter = common.make_reporter(args)
    if watch is not None:
        common.publish_watch(reporter, watch)
    jid = job_id("push", str(args.source.absolute()), target_identity(adapter, config))
    # the command that resumes this job, with the source made absolute (resume may run elsewhere)
    stored = ["push", *argv]
    if str(args.source) in stored:
        stored[stored.index(str(args.source))] = str(args.source.absolute())
    cluster = common.cluster_options(args)
    try:
        if cluster is not None:
            from asyncdepo.engine.cluster import push_on_cluster

            recipe = TargetRecipe(args.target, getattr(args, "endpoint_url", None), getattr(args, "region", None),
                                  getattr(args, "profile", None))
            report = common.run(lambda: push_on_cluster(args.source, adapter, config, recipe, cluster,
                                                        reporter=reporter, argv=stored), reporter)
        else:
            # a watch runs for days: progress and metrics are refreshed every 5 s rather than twice a second
            report = common.run(lambda: push(args.source, adapter, config, reporter=reporter, argv=stored,
                                             watch=watch, tick=5.0 if watch else 0.5),
                                reporter, on_signal=watch.stop if watch else None)
    except Cancelled:
        print(f"\ninterrupted; the journal holds the progress. Resume with:\n  asyncdepo resume {jid}",
              file=sys.stderr)
        return common.EXIT_INTERRUPTED
    if report.interrupted:  # a watch stopped before the files in flight could finish
        common.print_report(report, json_out=args.json)
        print("stopped with files in flight; the journal keeps what they sent: run the same command again "
              f"(or asyncdepo resume {jid}) to go on", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    return common.print_report(report, json_out=args.json, resume_hint=f"asyncdepo resume {jid}")


def _pull(args: argparse.Namespace, argv: list[str]) -> int:
    from asyncdepo.engine.journal import job_id
    from asyncdepo.engine.pull import pull

    config = common.engine_config(args)
    adapter = make_adapter(args.source, args, config)
    if not adapter.features.pull:
        raise UsageError(f"{args.source}: this target cannot be pulled from")
    reporter = common.make_reporter(args)
    out = args.outdir.absolute()
    jid = job_id("pull", adapter.describe(), str(out))
    # the command that resumes this job, with OUTDIR made absolute (resume may run elsewhere)
    stored = ["pull", *argv]
    if str(args.outdir) in stored:
        stored[len(stored) - 1 - stored[::-1].index(str(args.outdir))] = str(out)
    try:
        report = common.run(lambda: pull(adapter, out, config, reporter=reporter, argv=stored), reporter)
    except Cancelled:
        print(f"\ninterrupted; the journal holds the progress. Resume with:\n  asyncdepo resume {jid}",
              file=sys.stderr)
        return common.EXIT_INTERRUPTED
    return common.print_report(report, json_out=args.json, resume_hint=f"asyncdepo resume {jid}")


async def _journal(path: str | None) -> Any:
    from asyncdepo.engine.journal import Journal

    return await Journal.open(Path(path) if path else None)


def _jobs(args: argparse.Namespace) -> int:
    import orjson

    async def main() -> list[dict[str, Any]]:
        j = await _journal(args.journal)
        try:
            return await j.jobs()  # type: ignore[no-any-return]
        finally:
            await j.close()

    rows = anyio.run(main)
    if args.json:
        print(orjson.dumps(printable_tree(rows)).decode())
        return 0
    if not rows:
        print("no jobs yet")
    for r in rows:
        print(f"{r['id']}  {r['state']:<11} {r['done']}/{r['items']} done  {r['kind']} {printable(r['source'])} -> "
              f"{r['target']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import orjson

    async def main() -> tuple[Any, Any]:
        j = await _journal(args.journal)
        try:
            row = await j.job(args.job)
            if row is None:
                raise UsageError(f"no job {args.job!r} (or the prefix is ambiguous); see `asyncdepo jobs`")
            return row, await j.status(row["id"])
        finally:
            await j.close()

    row, st = anyio.run(main)
    if args.json:
        print(orjson.dumps(printable_tree({"job": row, **st})).decode())
        return 0 if not st["failures"] else 1
    print(f"job {row['id']} ({row['state']}): {row['kind']} {printable(row['source'])} -> {row['target']}")
    for state, c in sorted(st["counts"].items()):
        print(f"  {state:<8} {c['files']:>8} files {c['bytes'] / 1e6:>12,.1f} MB")
    for f in st["failures"]:
        print(f"  failed: {printable(f['rel'])}: {printable(f['error'])}" + (" (transient)" if f["transient"] else ""))
    return 0 if not st["failures"] else 1


def _resume(args: argparse.Namespace) -> int:
    async def main() -> Any:
        j = await _journal(args.journal)
        try:
            return await j.job(args.job)
        finally:
            await j.close()

    row = anyio.run(main)
    if row is None:
        raise UsageError(f"no job {args.job!r} (or the prefix is ambiguous); see `asyncdepo jobs`")
    if row["kind"] not in ("push", "pull"):
        import importlib

        from asyncdepo.cli import ARCHIVES

        module = importlib.import_module(ARCHIVES[row["kind"]]) if row["kind"] in ARCHIVES else None
        fn = getattr(module, "resume_job", None)
        if fn is None:
            raise UsageError(f"job {row['id']} ({row['kind']}) cannot be resumed by this version")
        given = common.cluster_argv(args)
        if not given:
            return int(fn(row))
        import inspect

        if "cluster" not in inspect.signature(fn).parameters:  # the archive's command takes no cluster flags
            raise UsageError(f"job {row['id']} ({row['kind']}) runs on one node: resume it without "
                             "--scheduler / --local-cluster")
        return int(fn(row, cluster=given))
    argv = list(row["argv"])
    if not argv:
        raise UsageError(f"job {row['id']} has no recorded command; run the original {row['kind']} again")
    if args.journal and "--journal" not in argv:
        argv += ["--journal", args.journal]
    given = common.cluster_argv(args)
    if given:
        argv = common.without_cluster_flags(argv) + given
    print("resuming: asyncdepo " + " ".join(argv), file=sys.stderr)
    from asyncdepo.cli import main as cli_main

    return cli_main(argv)


def _sim(args: argparse.Namespace) -> int:
    from asyncdepo.sim import server

    names = ", ".join(sorted(server.SIMULATORS))
    if not args.name or args.wants_help:
        print(f"usage: asyncdepo sim NAME --port P --root DIR [--fault RULE ...]\nsimulators: {names}\n"
              "(asyncdepo sim NAME --help for a simulator's own options)")
        return 0 if args.wants_help else 2
    try:
        module = server.load(args.name)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    p = argparse.ArgumentParser(prog=f"asyncdepo sim {args.name}",
                                description=(module.__doc__ or "").split("\n\n")[0])
    server.add_common_arguments(p)
    module.add_arguments(p)
    return server.serve_forever(args.name, p.parse_args(args.rest))


def main(argv: list[str]) -> int:
    parser = _parser()
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            return _push(args, argv[1:])
        if args.command == "pull":
            return _pull(args, argv[1:])
        if args.command == "jobs":
            return _jobs(args)
        if args.command == "status":
            return _status(args)
        if args.command == "resume":
            return _resume(args)
        if args.command == "sim":
            return _sim(args)
    except DepoError as exc:
        return common.error_exit(exc)
    parser.print_help()
    return 2
