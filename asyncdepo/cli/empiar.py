"""``asyncdepo push empiar TOKEN DEPOSITION_JSON DATA``: a drop-in for the ``empiar-depositor`` command.

The reference tool's options are accepted with the same meaning (so switching is a change of one word), plus
our own. Every check runs before the first request: the deposition JSON against the schema (field-level
messages), the image-set folders under DATA (present, not empty), the thumbnail (a PNG of at least 400 x 400),
the rights lists (a malformed entry is an error), ascp (found and answering like ascp) and the secrets.

Secrets (never on a child's command line, never in the journal or the output):

* ``TOKEN`` — the EMPIAR API token. Give ``-`` to read it from ``EMPIAR_TOKEN`` (or a prompt): the journal
  records ``-``, so ``asyncdepo resume`` never needs the token on a command line.
* ``-p [PASSWORD]`` — basic auth: ``TOKEN`` is then the EMPIAR username. As in the reference tool a value may
  follow ``-p``, but it is visible to other users of the machine; ``-p`` alone reads ``EMPIAR_PASSWORD`` or
  prompts. The journal records ``-p`` without a value.
* ``EMPIAR_TRANSFER_PASS`` — the Aspera transfer password, handed to ascp as ``ASPERA_SCP_PASS`` in its
  environment (prompted for on a terminal when unset).
* ``GLOBUS_TRANSFER_TOKEN`` — a Globus Transfer API access token, needed with ``-g``.

The deposition runs as an engine job of kind ``empiar`` (:class:`~asyncdepo.adapters.empiar.adapter.EmpiarAdapter`):
every file is journaled as it is sent, ``asyncdepo jobs`` lists the job and ``asyncdepo status JOB`` shows it;
progress, ``--json``, ``--bwlimit``, the report and the exit statuses are those of every push
(:mod:`asyncdepo.cli.common`).

Resume: the journal (``--journal``) keeps the entry id and directory and which files were sent; running the
same command again, or ``asyncdepo resume JOB`` (which calls :func:`resume_job`), re-deposits that entry and
sends only what is missing (a partial file continues with ascp ``-k 3``). ``-r ENTRY_ID ENTRY_DIR`` names the
entry explicitly, as in the reference tool; ``--new`` starts another entry.

On a cluster (``--scheduler ADDRESS`` or ``--local-cluster N``, see docs/scale-out.md) this process creates
the entry, uploads the thumbnail, grants rights and submits; the workers run the ascp sessions (the same
ascp path and DATA at the same path on every worker; the transfer password reaches them outside the task
graph) and this process sends by Globus (``-g``) what their ascp could not.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson

from asyncdepo import errors
from asyncdepo.adapters.empiar import adapter as EA
from asyncdepo.adapters.empiar import depositor as E
from asyncdepo.adapters.empiar import schema
from asyncdepo.adapters.globus import DEFAULT_BASE as GLOBUS_BASE
from asyncdepo.adapters.globus import GlobusClient
from asyncdepo.cli import common
from asyncdepo.config import EngineConfig
from asyncdepo.engine.journal import default_path as default_journal
from asyncdepo.engine.report import RunReport
from asyncdepo.errors import Cancelled
from asyncdepo.events import Reporter
from asyncdepo.transport.ascp import runner as A

VERSION = "asyncdepo empiar (compatible with empiar-depositor 1.6b30)"
RIGHTS = {"1": "owner", "2": "view", "3": "view and edit", "4": "view, edit and submit"}
DEV_SERVERS = {"development": ("https://wwwdev.ebi.ac.uk/pdbe/emdb/external_test/master", "tmp/andrii"),
               "development_local": ("https://127.0.0.1:8001", "tmp/andrii")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncdepo push empiar", description="Deposit a dataset into EMPIAR: create (or re-deposit) the "
        "entry, upload the thumbnail, send the image sets with ascp (Globus as fallback), grant rights, submit.")
    p.add_argument("token", metavar="TOKEN", help="EMPIAR API token ('-': read EMPIAR_TOKEN or prompt); "
                   "with -p, the EMPIAR username")
    p.add_argument("json_input", metavar="DEPOSITION_JSON", type=Path, help="the deposition JSON")
    p.add_argument("data", metavar="DATA", type=Path, help="folder holding the image-set directories")
    ref = p.add_argument_group("empiar-depositor options")
    ref.add_argument("-p", "-password", "--password", nargs="?", const=True, default=None, dest="password",
                     help="basic auth: TOKEN is the username; the password is read from EMPIAR_PASSWORD or "
                     "prompted for (a value after -p is accepted but visible to other users)")
    ref.add_argument("-a", "-ascp", "--ascp", default=None, help="the ascp executable (default: ascp on PATH or "
                     "in Aspera's install folders)")
    ref.add_argument("-g", "--globus", metavar="ENDPOINT_ID", help="your Globus endpoint (UUID) holding DATA: used "
                     "when ascp is unavailable or fails (needs GLOBUS_TRANSFER_TOKEN)")
    ref.add_argument("-f", "--globus-force-login", action="store_true", help="accepted for compatibility; "
                     "no effect (the Globus token comes from GLOBUS_TRANSFER_TOKEN)")
    ref.add_argument("-e", "--entry-thumbnail", type=Path, help="thumbnail: a PNG of at least 400 x 400")
    ref.add_argument("-gu", "--grant-rights-usernames", metavar="USER:RIGHTS,...")
    ref.add_argument("-ge", "--grant-rights-emails", metavar="EMAIL:RIGHTS,...")
    ref.add_argument("-go", "--grant-rights-orcids", metavar="ORCID:RIGHTS,...",
                     help="rights: 1 owner (only one), 2 view, 3 view+edit, 4 view+edit+submit")
    ref.add_argument("-r", "--resume", nargs=2, metavar=("ENTRY_ID", "ENTRY_DIR"),
                     help="continue an existing entry: re-deposit its metadata and resume the transfer")
    ref.add_argument("-s", "--stop-submit", action="store_true", help="upload but do not submit")
    ref.add_argument("-i", "--ignore-certificate", action="store_true", help="do not verify TLS certificates")
    ref.add_argument("-v", "--version", action="version", version=VERSION)
    ref.add_argument("-d", "--development", action="store_true", help=argparse.SUPPRESS)
    ref.add_argument("-dl", "--development-local", action="store_true", help=argparse.SUPPRESS)
    ref.add_argument("-o", "--output-id-dir", action="store_true", help=argparse.SUPPRESS)
    own = p.add_argument_group("asyncdepo options")
    own.add_argument("--server", default=None, help=f"EMPIAR server (default {E.DEFAULT_SERVER})")
    common.add_metrics_options(own)
    own.add_argument("--transfers", type=int, default=4, help="sessions at once (4; per worker on a cluster); a "
                     "session sends the files of one image set (up to 1000)")
    own.add_argument("--ascp-host", default=E.ASCP_HOST, help=f"ascp user@host (default {E.ASCP_HOST})")
    own.add_argument("--ascp-port", type=int, default=33001, help="ascp TCP port, -P (33001)")
    own.add_argument("--rate", default="200M", help="ascp target rate, -l (200M)")
    own.add_argument("--attempts", type=int, default=5, help="sessions for a batch of files before they fail "
                     "(5; with -g the last goes by Globus)")
    own.add_argument("--bwlimit", metavar="RATE", help="cap the whole run's rate, e.g. 100M (bytes/s): each "
                     "of the sessions at once gets its share as ascp's -l (when below --rate); Globus has no "
                     "such limit")
    own.add_argument("--retries", default="0", metavar="K", help="after the run, send again the files that "
                     "failed transiently, up to K more rounds (0)")
    own.add_argument("--stall-timeout", type=float, default=120.0, help="stop ascp after this many seconds "
                     "without progress (then retry with resume)")
    own.add_argument("--upload-prefix", default=None, help="folder of the upload areas on the ascp host (upload)")
    own.add_argument("--globus-server", default=GLOBUS_BASE, help=f"Globus Transfer API ({GLOBUS_BASE})")
    own.add_argument("--globus-endpoint", default=E.EMPIAR_GLOBUS_ENDPOINT, help="EMPIAR's Globus endpoint")
    own.add_argument("--globus-poll", type=float, default=5.0, help="seconds between Globus task polls")
    own.add_argument("--new", action="store_true", help="create a new entry even if the journal has one for "
                     "this JSON and DATA")
    own.add_argument("--journal", metavar="PATH", help="resume journal (default $XDG_STATE_HOME/asyncdepo/...)")
    own.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a progress display")
    own.add_argument("-q", "--quiet", action="store_true", help="only the final report")
    own.add_argument("--verbose", action="store_true", help="log details to stderr")
    common.add_watch_options(p)
    common.add_cluster_options(p)
    return p


# -- local checks (no network) ------------------------------------------------------------------------------
def parse_rights(text: str | None, flag: str) -> dict[str, str]:
    """``"alice:2,bob:3"`` -> ``{"alice": "2", "bob": "3"}``.

    :raises UsageError: an entry without ``:``, an empty name, rights outside 1-4, a name given twice.
    """
    out: dict[str, str] = {}
    if text is None:
        return out
    for part in text.split(","):
        who, sep, rights = part.strip().rpartition(":")
        if not sep or not who.strip():
            raise errors.UsageError(f"{flag}: {part.strip()!r} is not NAME:RIGHTS", hint="e.g. -gu alice:2,bob:3")
        if rights.strip() not in RIGHTS:
            raise errors.UsageError(f"{flag}: rights for {who.strip()!r} must be 1 (owner), 2 (view), 3 (view and "
                                    f"edit) or 4 (view, edit and submit), not {rights.strip()!r}")
        if who.strip() in out:
            raise errors.UsageError(f"{flag}: {who.strip()!r} is given twice")
        out[who.strip()] = rights.strip()
    return out


def check_thumbnail(path: Path) -> None:
    """:raises UsageError: missing, not a PNG, or smaller than 400 x 400."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise errors.UsageError(f"thumbnail {path}: {exc.strerror or exc}") from None
    size = schema.png_size(head)
    if size is None:
        raise errors.UsageError(f"thumbnail {path} is not a PNG image", hint="EMPIAR takes a PNG of >= 400 x 400")
    if min(size) < schema.MIN_THUMBNAIL:
        raise errors.UsageError(f"thumbnail {path} is {size[0]} x {size[1]}; EMPIAR needs at least 400 x 400")


def load_deposition(path: Path) -> dict[str, Any]:
    """Read and validate the deposition JSON. :raises UsageError | ValidationError:"""
    try:
        doc = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise errors.UsageError(f"deposition JSON {path}: {exc.strerror or exc}") from None
    except orjson.JSONDecodeError as exc:
        raise errors.UsageError(f"deposition JSON {path} is not valid JSON: {exc}") from None
    return dict(schema.validate(doc))


def _secret(env: str, prompt: str, what: str) -> str:
    value = os.environ.get(env)
    if value:
        return value
    if sys.stdin.isatty():
        value = getpass.getpass(prompt)
        if value:
            return value
    raise errors.UsageError(f"no {what}: set {env}")


def credentials(args: argparse.Namespace) -> E.Credentials:
    if args.password is not None:
        if args.password is not True:
            print("asyncdepo: warning: a password after -p is visible to other users; use -p alone with "
                  "EMPIAR_PASSWORD or the prompt", file=sys.stderr)
            return E.Credentials(username=args.token, password=str(args.password))
        return E.Credentials(username=args.token,
                             password=_secret("EMPIAR_PASSWORD", "EMPIAR password: ", "EMPIAR password"))
    if args.token == "-":
        return E.Credentials(token=_secret("EMPIAR_TOKEN", "EMPIAR API token: ", "EMPIAR API token"))
    return E.Credentials(token=args.token)


def resume_argv(args: argparse.Namespace, journal: Path) -> list[str]:
    """The secret-free command that continues this deposition (stored in the journal)."""
    out: list[str] = []
    if args.password is not None:
        out.append("-p")
    for flag, value in (("-a", args.ascp), ("-g", args.globus), ("-gu", args.grant_rights_usernames),
                        ("-ge", args.grant_rights_emails), ("-go", args.grant_rights_orcids),
                        ("--server", args.server), ("--upload-prefix", args.upload_prefix),
                        ("--bwlimit", args.bwlimit)):
        if value is not None:
            out += [flag, str(value)]
    if args.entry_thumbnail is not None:
        out += ["-e", str(args.entry_thumbnail.absolute())]
    out += [f for f, on in (("-s", args.stop_submit), ("-i", args.ignore_certificate)) if on]
    out += ["--transfers", str(args.transfers), "--ascp-host", args.ascp_host, "--ascp-port", str(args.ascp_port),
            "--rate", args.rate, "--attempts", str(args.attempts), "--stall-timeout", str(args.stall_timeout),
            "--globus-server", args.globus_server, "--globus-endpoint", args.globus_endpoint,
            "--globus-poll", str(args.globus_poll), "--retries", str(args.retries), "--journal", str(journal)]
    out += common.cluster_argv(args)
    token = args.token if args.password is not None else "-"
    return [*out, "--", token, str(args.json_input.absolute()), str(args.data.absolute())]


def _server(args: argparse.Namespace) -> tuple[str, str]:
    server, prefix = E.DEFAULT_SERVER, "upload"
    for name, (dev_server, dev_prefix) in DEV_SERVERS.items():
        if getattr(args, name):
            server, prefix = dev_server, dev_prefix
    return (args.server or server).rstrip("/"), args.upload_prefix or prefix


# -- the run ------------------------------------------------------------------------------------------------
def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's options for a deposition: ``--transfers`` sessions at once, ``--attempts`` sessions per
    batch of files, ``--retries`` rounds (0 unless given), ``--bwlimit``; compression and filters do not
    apply (EMPIAR takes DATA as it is)."""
    config = common.engine_config(args)
    journal = Path(args.journal).absolute() if args.journal else default_journal()
    return config.replace(transfers=args.transfers, request_attempts=args.attempts, compress=None, include=(),
                          exclude=(), journal_path=journal)


async def _forget_if_new(journal_path: Path, jid: str, args: argparse.Namespace,
                         entry: tuple[int, str] | None) -> None:
    """``--new``, or ``-r`` naming another entry than the journal's: the job starts over (every file goes to
    the new entry). Refuses a deposition the journal says was submitted.

    :raises ConflictError: already submitted (and neither ``--new`` nor another entry was asked for).
    :raises JobLockedError: another process runs this deposition now (nothing is forgotten under it).
    """
    from asyncdepo.engine.joblock import JobLock, lock_path
    from asyncdepo.engine.journal import Journal

    journal = await Journal.open(journal_path)
    try:
        lock = await anyio.to_thread.run_sync(JobLock.acquire, lock_path(journal.path, jid), jid)
        try:
            state = E.DepositState.from_json(await journal.job_state(jid))
            if args.new or (entry is not None and (state.entry_id, state.directory) != entry):
                await journal.forget(jid)
            elif state.phase == "submitted":
                raise errors.ConflictError(f"this deposition was already submitted as {state.empiar_id} (entry "
                                           f"{state.entry_id}, job {jid})", hint="add --new to create another entry")
        finally:
            lock.release()  # the run takes it again at once (push)
    finally:
        await journal.close()


async def _deposit(args: argparse.Namespace, reporter: Reporter) -> tuple[RunReport, str]:
    """Check everything, then run the deposition as an engine job (kind ``empiar``)."""
    from asyncdepo.engine.journal import job_id
    from asyncdepo.engine.scheduler import push, target_identity
    from asyncdepo.transport.httpbody import client_session

    server, prefix = _server(args)
    doc = load_deposition(args.json_input)
    layout = schema.resolve_layout(doc, args.data)
    if args.entry_thumbnail is not None:
        check_thumbnail(args.entry_thumbnail)
    rights = {k: parse_rights(v, f) for k, f, v in (
        ("u", "-gu", args.grant_rights_usernames), ("e", "-ge", args.grant_rights_emails),
        ("o", "-go", args.grant_rights_orcids)) if v}
    if sum(1 for grants in rights.values() for r in grants.values() if r == "1") > 1:
        raise errors.UsageError("rights: there can be only one owner (rights 1)")
    entry_arg = None
    if args.resume:
        if not args.resume[0].isdigit() or not args.resume[1].strip():
            raise errors.UsageError(f"-r: expected ENTRY_ID (a number) and ENTRY_DIR, not {' '.join(args.resume)}")
        entry_arg = (int(args.resume[0]), args.resume[1].strip())
    cluster = common.cluster_options(args)
    creds = credentials(args)
    config = engine_config(args)

    opts: A.AscpOptions | None = A.AscpOptions(
        ascp=args.ascp or "ascp", tcp_port=args.ascp_port, rate=args.rate, fair=True, no_encryption=True,
        create_dir=True, resume=3, stall_timeout=args.stall_timeout, management_port=True)
    try:
        assert opts is not None
        opts = dataclasses.replace(opts, ascp=await anyio.to_thread.run_sync(A.check_ascp, opts))
    except errors.UsageError as exc:
        if not args.globus:
            raise
        if cluster is not None:
            raise errors.UsageError(f"{exc}: on a cluster the workers send with ascp", hint="install ascp (at "
                                    "the same path on every worker), or run without --scheduler / --local-cluster "
                                    "to send everything by Globus") from None
        reporter.warning(f"{exc}; will use Globus instead")
        opts = None
    route = None
    if opts is not None:
        route = EA.AscpRoute(opts, A.AscpSecrets(password=_secret(
            "EMPIAR_TRANSFER_PASS", "EMPIAR transfer (Aspera) password: ", "Aspera transfer password")), args.ascp_host)
    globus_token = None
    if args.globus:
        globus_token = os.environ.get("GLOBUS_TRANSFER_TOKEN")
        if not globus_token:
            raise errors.UsageError("-g needs a Globus Transfer access token in GLOBUS_TRANSFER_TOKEN")
    if args.globus_force_login:
        reporter.message("-f has no effect: the Globus token comes from GLOBUS_TRANSFER_TOKEN")
    assert config.journal_path is not None

    ssl: Any = False if args.ignore_certificate else None
    async with client_session(ssl=ssl) as session:
        globus = None
        if args.globus and globus_token:
            client = GlobusClient(session, globus_token, base_url=args.globus_server, poll_interval=args.globus_poll)
            globus = EA.GlobusRoute(client, args.globus, args.globus_endpoint)
        dep = EA.Deposition(doc, args.json_input.absolute(), layout, args.entry_thumbnail, rights,
                            not args.stop_submit, prefix, entry_arg)
        adapter = EA.EmpiarAdapter(E.EmpiarApi(session, server, creds), dep, ascp=route, globus=globus,
                                   say=lambda level, text: reporter.message(text, level))
        jid = job_id("empiar", str(args.data.absolute()), target_identity(adapter, config))
        await _forget_if_new(config.journal_path, jid, args, entry_arg)
        stored = resume_argv(args, config.journal_path)
        if cluster is not None:
            from asyncdepo.engine.cluster import push_on_cluster

            assert route is not None
            recipe = EmpiarRecipe(adapter.server, dep.json_path, dataclasses.replace(layout, extras=()), prefix,
                                  route.opts, route.host)
            report = await push_on_cluster(args.data, adapter, config, recipe, cluster, reporter=reporter,
                                           journal_path=config.journal_path, argv=stored, kind="empiar")
        else:
            report = await push(args.data, adapter, config, reporter=reporter, journal_path=config.journal_path,
                                argv=stored, kind="empiar")
    return report, jid


@dataclasses.dataclass(frozen=True)
class EmpiarRecipe:
    """How a worker of a cluster builds its copy of the adapter (pickled into the tasks: nothing secret — no
    token, no deposition document, no grantees): the image sets' layout (the session groups), the upload
    folder's prefix and the ascp options and host. The entry's directory and the transfer password come in
    the handoff; the copy has no API and no Globus route (the coordinator keeps both)."""

    server: str
    json_path: Path
    layout: schema.Layout
    upload_prefix: str
    ascp: A.AscpOptions
    host: str

    def __call__(self, config: Any) -> EA.EmpiarAdapter:
        dep = EA.Deposition({}, self.json_path, self.layout, upload_prefix=self.upload_prefix)
        return EA.EmpiarAdapter(None, dep, ascp=EA.AscpRoute(self.ascp, A.AscpSecrets(), self.host),
                                server=self.server)


def push_main(argv: Sequence[str]) -> int:
    """``asyncdepo push empiar ...``; returns the exit status (see ``asyncdepo.cli.common``)."""
    args = build_parser().parse_args(list(argv))
    try:
        common.refuse_watch(args, "an EMPIAR deposition is submitted once, after all its image sets are uploaded",
                            hint="push the deposition when the experiment's data are complete, without --watch")
        reporter = common.make_reporter(args, title="EMPIAR")
    except errors.DepoError as exc:
        return common.error_exit(exc)
    outcome: list[tuple[RunReport, str] | errors.DepoError] = []

    async def main() -> None:
        try:
            outcome.append(await _deposit(args, reporter))
        except errors.DepoError as exc:  # returned, not raised: task groups would wrap it
            outcome.append(exc)

    try:
        common.run(main, reporter)
    except Cancelled:
        print("\ninterrupted; the journal holds the entry and what was sent. Run the same command again "
              "(or `asyncdepo resume JOB`, see `asyncdepo jobs`) to continue.", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except errors.DepoError as exc:  # common.run unwraps task-group errors
        return common.error_exit(exc)
    result = outcome[0]
    if isinstance(result, errors.DepoError):
        return common.error_exit(result)
    report, jid = result
    code = common.print_report(report, json_out=args.json, resume_hint=f"asyncdepo resume {jid}")
    summary = report.summary or {}
    if report.ok and not args.json:
        done = (f"submitted as {summary.get('empiar_id')}" if summary.get("phase") == "submitted"
                else "uploaded, not submitted")
        print(f"EMPIAR entry {summary.get('entry_id')} (directory {summary.get('directory')}): {done}; job {jid}",
              file=sys.stderr)
        if args.output_id_dir:
            print(f"{summary.get('entry_id')} {summary.get('directory')}")
    return code


def recorded_argv(job_row: Mapping[str, Any], cluster: Sequence[str] = ()) -> list[str]:
    """The command a journaled deposition records, with ``cluster`` (flags given to ``resume``) in place of
    the recorded cluster flags.

    :raises UsageError: the job has no recorded command.
    """
    argv = [str(a) for a in job_row.get("argv") or []]
    if not argv:
        raise errors.UsageError(f"job {job_row.get('id')} has no recorded command; run the original push again")
    if cluster:
        cut = argv.index("--") if "--" in argv else len(argv)
        argv = [*common.without_cluster_flags(argv[:cut]), *cluster, *argv[cut:]]
    return argv


def resume_job(job_row: Mapping[str, Any], cluster: Sequence[str] = ()) -> int:
    """Continue a journaled EMPIAR deposition (``asyncdepo resume JOB`` calls this for jobs of kind
    ``empiar``): reruns the recorded, secret-free command (:func:`recorded_argv`); the entry comes from the
    journal. ``cluster``: cluster flags given to ``resume``, which replace the recorded ones."""
    argv = recorded_argv(job_row, cluster)
    print("resuming: asyncdepo push empiar " + " ".join(argv), file=sys.stderr)
    return push_main(argv)
