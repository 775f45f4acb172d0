"""A stand-in for IBM Aspera's ``ascp`` (``asyncdepo-sim-ascp``), for tests, benchmarks and the demo.

It takes ascp's command line, moves files between local paths and a storage directory that plays the
server, and talks like ascp: ``\\r``-redrawn progress lines, ``Completed:``/``Partial Completion:``,
``Session Stop  (Error: ...)``, ``ascp: ..., exiting.``, management frames on ``-M``, real exit statuses
(0 success, 1 failure, 112 usage). It reads no stdin and never prints a secret.

Flags (as ascp): ``-P port -O port -l rate -m rate --policy=P -Q -T -d -p -q -v -k 0|1|2|3 -L dir|-L-
-i key -W token -M port --mode=send|recv --host=H --user=U --file-list=F --file-pair-list=F
--overwrite=never|always|diff|diff+older|older --file-checksum=X -A/--version -h/--help``; short flags
combine (``-QTd``, ``-k3``, ``-L-``); ``-h``/``-A`` print the usage/version and exit 0. Anything else is
a usage error. Paths: ``[user@]host:path`` or,
with ``--host``, plain paths whose side ``--mode`` says. A pair list alternates source and destination
lines; destinations are relative to the target argument.

Behaviour (paths, copying, resume, throttling) and the environment it reads (storage root, password,
token URL, faults, counters) are described in :mod:`asyncdepo.sim.ascp_transfer`, which runs the
session; :mod:`asyncdepo.sim.ascp_output` formats what it prints. This module is the command line:
argv -> :class:`Args` -> one :class:`Session` -> exit status.

Lifetime: like real ascp it lives on when its client is killed (the client starts it in a session of its
own) and finishes what it can; a stand-in held by a fault (``stall``, ``wedge``) ends once its client is gone
(:mod:`asyncdepo.sim.ascp_client` says how that is seen, without a busy loop), so killed test runs leave no
stand-in behind.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence

from asyncdepo.sim.ascp_client import ClientWatch
from asyncdepo.sim.ascp_output import Manager, err, fmt_size, out, progress_line
from asyncdepo.sim.ascp_transfer import STALLED, Args, Dropped, Job, Session, SessionError, Usage

# FASP error 27, as ascp describes it (the stand-in writes its own text: it shares nothing with the client)
PARTIAL_FAILURE = "Some individual files failed"

# the stand-in's own names, and those of ascp_output and ascp_transfer (re-exported)
__all__ = (
    "LONG_ARG", "LONG_FLAG", "SHORT_ARG", "SHORT_FLAG", "USAGE", "USAGE_EXIT", "VERSION", "Args", "Dropped",
    "Info", "Job", "Manager", "Session", "SessionError", "Usage", "err", "fmt_size", "main", "out",
    "parse_args", "progress_line",
)

USAGE = ("Usage: ascp [-{ATdpqv}] [-{Q|QQ}] [-l max_rate] [-m min_rate] [-k {0|1|2|3}] [-i key_file]\n"
         "            [-L log_dir] [-M mgmt_port] [-O fasp_port] [-P ssh_port] [--mode=send|recv]\n"
         "            [--host=host] [--user=user] [--file-list=file] [--file-pair-list=file]\n"
         "            [[user@]host:]source... [[user@]host:]target")
USAGE_EXIT = 112
VERSION = "IBM Aspera ascp version 4.4.0 (asyncdepo stand-in)"
SHORT_ARG = set("POlmkLiWM")
SHORT_FLAG = set("QTdpqvAh")
LONG_ARG = {"mode", "host", "user", "file-list", "file-pair-list", "overwrite", "file-checksum", "policy"}
LONG_FLAG = {"help", "version"}
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([KMGkmg]?)$")


class Info(Exception):
    """``-h``/``--help`` (usage) or ``-A``/``--version``: print it on stdout, exit 0."""


def parse_args(argv: Sequence[str]) -> Args:
    """ascp's command line -> Args. :raises Usage: unknown flags, missing or bad values."""
    a = Args()
    it = iter(argv)
    rest: list[str] = []
    for tok in it:
        if tok == "--":
            rest.extend(it)
            break
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            if name in LONG_FLAG and not eq:
                raise Info(USAGE if name == "help" else VERSION)
            if name not in LONG_ARG:
                raise Usage(f"ascp: unrecognized option '{tok}'")
            if not eq:
                value = next(it, None) or _missing(tok)
            _long(a, name, value)
        elif tok.startswith("-") and len(tok) > 1:
            i = 1
            while i < len(tok):
                ch = tok[i]
                if ch in SHORT_ARG:
                    value = tok[i + 1:] or next(it, None) or _missing("-" + ch)
                    _short(a, ch, value)
                    break
                if ch not in SHORT_FLAG:
                    raise Usage(f"ascp: invalid option -- '{ch}'")
                if ch in "Ah":
                    raise Info(USAGE if ch == "h" else VERSION)
                a.quiet |= ch == "q"
                a.create_dir |= ch == "d"
                a.preserve |= ch == "p"
                i += 1
        else:
            rest.append(tok)
    a.paths = rest
    return a


def _missing(flag: str) -> str:
    raise Usage(f"ascp: option requires an argument -- '{flag}'")


def _short(a: Args, ch: str, value: str) -> None:
    if ch == "k":
        if value not in ("0", "1", "2", "3"):
            raise Usage(f"ascp: invalid resume level '{value}'")
        a.resume = int(value)
    elif ch == "l" or ch == "m":
        m = _RATE.match(value)
        if not m:
            raise Usage(f"ascp: invalid rate '{value}'")
        if ch == "l":
            a.rate_bps = float(m.group(1)) * {"": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2).upper()]
    elif ch in "POM":
        if not value.isdigit():
            raise Usage(f"ascp: invalid port '{value}'")
        if ch == "M":
            a.mgmt_port = int(value)
    elif ch == "L":
        a.log_dir = value
    elif ch == "W":
        a.token = value


def _long(a: Args, name: str, value: str) -> None:
    if name == "mode":
        if value not in ("send", "recv"):
            raise Usage(f"ascp: invalid mode '{value}'")
        a.mode = value
    elif name in ("host", "user"):
        setattr(a, name, value)
    elif name == "file-list":
        a.file_list = value
    elif name == "file-pair-list":
        a.pair_list = value
    elif name == "overwrite":
        if value not in ("never", "always", "diff", "diff+older", "older"):
            raise Usage(f"ascp: invalid overwrite policy '{value}'")
        a.overwrite = value
    elif name == "policy" and value not in ("fixed", "high", "fair", "low"):
        raise Usage(f"ascp: invalid policy '{value}'")


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one session like ascp; returns the exit status (0, 1, or 112 for usage)."""
    watch = ClientWatch()  # first: the parent is still the client
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        err(USAGE)
        return USAGE_EXIT
    try:
        a = parse_args(args)
        if not a.paths:
            raise Usage("ascp: no source or target given")
    except Info as exc:
        out(f"{exc}\n")
        return 0
    except Usage as exc:
        if str(exc):
            err(str(exc))
        err(USAGE)
        return USAGE_EXIT
    env = dict(os.environ)
    try:
        session = Session(a, env, watch)
    except OSError as exc:
        err(f"ascp: failed to connect to management port: {exc.strerror or exc}, exiting.")
        return 1
    if session.fires("wedge"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        session.hold()  # until the client is gone (or the hold limit): a wedged orphan must not live for ever
        err(f"ascp: {STALLED}, exiting.")
        return 1
    # SIGTERM ends the session like a lost connection would: counters are still written.
    signal.signal(signal.SIGTERM, _terminated)
    status = 1
    try:
        session.run()
        if not a.quiet or session.files or session.failed:
            session.summary()
        status = 1 if session.failed else 0
        session.mgr.send("DONE" if status == 0 else "ERROR", Code=27 if status else 0,
                         Description="" if status == 0 else PARTIAL_FAILURE)
    except Usage as exc:
        err(str(exc))
        err(USAGE)
        status = USAGE_EXIT
    except SessionError as exc:
        if exc.stop_line:
            if isinstance(exc, Dropped):
                out("\n")
            out(f"Session Stop  (Error: {exc})\n")
        err(f"ascp: {exc}, exiting.")
        session.mgr.send("ERROR", Code=exc.code, Description=str(exc))
        if isinstance(exc, Dropped):
            session.failed += 1
            session.summary()
    except SystemExit as exc:
        status = int(exc.code or 143)
    finally:
        session.counters(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
