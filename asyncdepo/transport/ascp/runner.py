"""Run IBM Aspera's ``ascp`` as a child process, for any archive: argv, secrets, progress, errors, cleanup.

Contract (what a caller may rely on):

* **argv** is a list built by :func:`build_argv`; no shell is involved, so paths with spaces, quotes or
  leading dashes are passed as they are (a local path starting with ``-`` gets a ``./`` prefix). ``-k``
  is always passed (also on the first run: ascp can only resume what a ``-k`` run started).
* **Secrets** travel only in the child's environment: ``ASPERA_SCP_PASS`` (password), ``ASPERA_SCP_TOKEN``
  (transfer token; real ascp reads it from there, ``-W`` is never used because it would put the token on
  the command line) and ``ASPERA_SCP_COOKIE``. Inherited values of those variables are removed, so what
  ascp sees is exactly :class:`AscpSecrets`. Secrets never appear in argv, in progress events nor in
  exception messages (ascp's text is scrubbed of them as well).
* **One session** (:func:`run_once`) returns an :class:`AscpResult` or raises from ``asyncdepo.errors``:
  ``AuthError`` (bad password/token), ``TransientError`` (network, timeouts, stalls, retryable FASP codes,
  death by a signal), ``PermanentError`` (missing paths, usage errors, other FASP codes), each carrying
  ascp's own message, the FASP code when known and the exit status in ``.status``; ``UsageError`` before
  any process starts (binary not found, bad options).
* **Retries** (:func:`transfer`) rerun transient failures with the same ``-k``, so ascp resumes the
  partial files; waits follow the backoff policy (full jitter). ascp never retries by itself.
* **Progress**: ``on_progress(AscpProgress)`` is called in the event loop, from the task reading ascp's
  output; it must be quick. ``file`` is the file's path as ascp names it, relative to the transfer root
  (send: relative to the parent of the source argument, e.g. ``set1/img_001.mrc``; recv: relative to the
  destination directory); absolute paths (management frames) are made relative to those roots when they
  lie under them. ``bytes`` is what the destination holds of that file, a resumed prefix included;
  ``delta`` is the growth of ``bytes`` since the previous event for that file within one
  :func:`run_once`/:func:`transfer` call (never negative; the deltas of a file add up to its size);
  ``total`` is its size when known; ``rate_bps`` is ascp's rate in bits per second; ``done`` marks the
  file's last event. Precision: from the console, ascp prints whole KB/MB, so ``bytes`` is exact only at
  ``done`` when the local copy can be stat'ed (send: the source, recv: the written file); with
  ``management_port=True`` the numbers come from ascp's management frames and are exact throughout.
* **Stalls**: no progress for ``stall_timeout`` seconds (from the start, or since the last byte or file)
  stops the child and raises ``TransientError``.
* **Cancellation** (anyio): the child is sent SIGTERM (to its process group: it runs in a session of its
  own, so a terminal's Ctrl-C reaches only us), waited for ``grace`` seconds, then SIGKILLed, and always
  reaped — shielded, as anyio's ``Process.aclose`` does. No child outlives :func:`run_once`.

This module holds the options, the command line and the public entry points; the child process's
lifecycle (spawn, pipes, management port, stall watchdog, reaping) is :mod:`asyncdepo.transport.ascp.session`,
and the parsing of what ascp says is :mod:`asyncdepo.transport.ascp.console`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from asyncdepo import errors
from asyncdepo.transport.ascp import console as P
from asyncdepo.transport.ascp.options import (
    _KNOWN_LOCATIONS,
    _POLICIES,
    _RATE,
    NO_SECRETS,
    SECRET_ENV,
    AscpOptions,
    AscpProgress,
    AscpResult,
    AscpSecrets,
)
from asyncdepo.transport.ascp.session import SessionOutcome, run_session
from asyncdepo.transport.pacer import OnRetry, Pacer, RetryPolicy

__all__ = (
    "SECRET_ENV", "AscpOptions", "AscpProgress", "AscpResult", "AscpSecrets", "ProgressCallback",
    "build_argv", "check_ascp", "resolve_ascp", "run_once", "transfer",
)

ProgressCallback = Callable[[AscpProgress], None]


# -- argv, environment, binary -------------------------------------------------------------------------

def build_argv(
    opts: AscpOptions,
    sources: Sequence[str],
    dest: str,
    *,
    pair_list: Path | None = None,
    token: bool = False,
    file_list: Path | None = None,
    management_port: int | None = None,
) -> list[str]:
    """The ascp command line for one session, as a list (``argv[0]`` is ``opts.ascp`` as given).

    ``sources``/``dest`` are local paths and remote paths (``user@host:path``, or plain paths when
    ``opts.host`` is set: ``--mode``, ``--host`` and ``--user`` then say which side is remote).
    ``pair_list`` is a ``--file-pair-list`` file (source and destination lines alternate; ``dest`` is the
    directory the destinations are relative to) and ``file_list`` a ``--file-list`` file; with either,
    ``sources`` must be empty. ``token`` says the session authenticates with a transfer token: nothing is
    added, the token goes in ``ASPERA_SCP_TOKEN`` (the flag exists so callers state it and so a ``-W``
    smuggled into ``extra`` is refused either way). ``management_port`` adds ``-M port``.

    :raises errors.UsageError: bad option values, nothing to transfer, both sources and a list,
        or a secret-carrying flag (``-W``) in ``opts.extra``.
    """
    _validate(opts)
    if (pair_list is not None or file_list is not None) and sources:
        raise errors.UsageError("give either source paths or a file list to ascp, not both")
    if pair_list is not None and file_list is not None:
        raise errors.UsageError("give either --file-list or --file-pair-list to ascp, not both")
    if not sources and pair_list is None and file_list is None:
        raise errors.UsageError("nothing to transfer: no source paths given to ascp")
    if not dest:
        raise errors.UsageError("no destination given to ascp")
    argv = [opts.ascp, "-P", str(opts.tcp_port)]
    if opts.udp_port is not None:
        argv += ["-O", str(opts.udp_port)]
    if opts.rate:
        argv += ["-l", opts.rate]
    if opts.min_rate:
        argv += ["-m", opts.min_rate]
    if opts.policy:
        argv.append(f"--policy={opts.policy}")
    argv += [flag for on, flag in ((opts.fair, "-Q"), (opts.no_encryption, "-T"), (opts.create_dir, "-d"),
                                   (opts.preserve_times, "-p")) if on]
    argv += ["-k", str(opts.resume)]
    if opts.key_file:
        argv += ["-i", opts.key_file]
    argv += ["-L-"] if opts.log_dir == "-" else ["-L", opts.log_dir]
    if opts.host:
        argv += [f"--mode={opts.mode}", f"--host={opts.host}"]
    if opts.user:
        argv.append(f"--user={opts.user}")
    if management_port is not None:
        argv += ["-M", str(management_port)]
    argv += list(opts.extra)
    if file_list is not None:
        argv.append(f"--file-list={file_list}")
    if pair_list is not None:
        argv.append(f"--file-pair-list={pair_list}")
    argv += [_no_dash(s) for s in sources]
    argv.append(_no_dash(dest))
    return argv


def _no_dash(path: str) -> str:
    # A path starting with "-" would be read as an option; "./-x" names the same (relative) file.
    return "./" + path if path.startswith("-") else path


def _validate(opts: AscpOptions) -> None:
    if opts.mode not in ("send", "recv"):
        raise errors.UsageError(f"ascp mode must be 'send' or 'recv', not {opts.mode!r}")
    if opts.resume not in (0, 1, 2, 3):
        raise errors.UsageError(f"ascp resume level (-k) must be 0, 1, 2 or 3, not {opts.resume!r}")
    for name, value in (("rate", opts.rate), ("min_rate", opts.min_rate)):
        if value is not None and not _RATE.match(value):
            raise errors.UsageError(f"ascp {name} must look like 200M, 500K or 1G, not {value!r}")
    for name, port in (("tcp_port", opts.tcp_port), ("udp_port", opts.udp_port)):
        if port is not None and not 0 < port < 65536:
            raise errors.UsageError(f"ascp {name} must be a port number, not {port!r}")
    if opts.policy is not None and opts.policy not in _POLICIES:
        raise errors.UsageError(f"ascp policy must be one of {', '.join(_POLICIES)}, not {opts.policy!r}")
    if opts.stall_timeout <= 0 or opts.grace < 0:
        raise errors.UsageError("ascp stall_timeout must be > 0 and grace >= 0")
    if any(x.startswith("-W") for x in opts.extra):
        raise errors.UsageError("do not pass -W to ascp: give the token as AscpSecrets(token=...); "
                                "it travels in ASPERA_SCP_TOKEN, never on the command line")


def _child_env(secrets: AscpSecrets) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    for name, value in zip(SECRET_ENV, secrets.values()):
        if value is not None:
            env[name] = value
    return env


def resolve_ascp(name: str) -> str:
    """The absolute path of the ascp binary ``name`` (a path, or a name looked up on PATH and then in
    Aspera's usual install locations).

    :raises errors.UsageError: not found, or not executable.
    """
    found = shutil.which(name)
    if found:
        return os.path.abspath(found)
    if name == "ascp":
        for candidate in _KNOWN_LOCATIONS:
            path = os.path.expanduser(candidate)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    if os.path.exists(name):
        raise errors.UsageError(f"ascp at {name} is not an executable file",
                                hint=f"check its permissions (chmod +x {name})")
    raise errors.UsageError(f"ascp not found: {name!r}", hint=(
        "install IBM Aspera Connect or the Aspera CLI (it provides ascp), or give the path of ascp"))


def check_ascp(opts: AscpOptions) -> str:
    """Pre-flight: resolve ``opts.ascp`` and run it without arguments; returns its absolute path.

    A real ascp prints ``Usage: ascp ...`` and exits 112 (some versions 0). This is blocking (up to
    20 s); from async code call it with ``anyio.to_thread.run_sync``.

    :raises errors.UsageError: not found, not runnable, or it does not answer like ascp.
    """
    path = resolve_ascp(opts.ascp)
    try:
        done = subprocess.run([path], stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
                              env=_child_env(AscpSecrets()), check=False)
    except subprocess.TimeoutExpired:
        raise errors.UsageError(f"{path} did not answer within 20 s when run without arguments") from None
    except OSError as exc:
        raise errors.UsageError(f"cannot run {path}: {exc.strerror or exc}") from None
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    if "usage:" in text.lower() or done.returncode == P.USAGE_EXIT:
        return path
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no output")
    raise errors.UsageError(f"{path} does not answer like ascp (exit status {done.returncode}: {first[:200]})",
                            hint="give the path of IBM Aspera's ascp binary")


# -- progress bookkeeping ------------------------------------------------------------------------------

class _Tracker:
    """Per-file progress shared by the attempts of one transfer.

    ascp moves one file at a time per session, so only the current file's high-water mark is kept:
    memory does not grow with the number of files. A file resumed by the next attempt continues from
    the mark, so its deltas still add up to its size.
    """

    def __init__(self, on_progress: ProgressCallback | None) -> None:
        self._cb = on_progress
        self.name: str | None = None
        self.high = 0
        self.done = False

    def report(self, name: str, nbytes: int, total: int | None, rate: float | None, done: bool) -> int | None:
        """Record one observation; returns the delta, or None when it told nothing new."""
        fresh = name != self.name
        if fresh:
            self.name, self.high, self.done = name, 0, False
        elif self.done:
            return None  # the 100% line redrawn, or a frame after STOP
        delta = max(0, nbytes - self.high)
        if not (fresh or delta or done):
            return None
        self.high = max(self.high, nbytes)
        self.done = done
        if self._cb is not None:
            self._cb(AscpProgress(file=name, bytes=nbytes, delta=delta, total=total, rate_bps=rate, done=done))
        return delta


# -- one session ---------------------------------------------------------------------------------------

async def _attempt(
    opts: AscpOptions,
    sources: Sequence[str],
    dest: str,
    secrets: AscpSecrets,
    tracker: _Tracker,
    pair_list: Path | None,
    file_list: Path | None,
) -> SessionOutcome:
    binary = resolve_ascp(opts.ascp)

    def make_argv(port: int | None) -> list[str]:
        return build_argv(dataclasses.replace(opts, ascp=binary), sources, dest, pair_list=pair_list,
                          token=secrets.token is not None, file_list=file_list, management_port=port)

    return await run_session(opts, sources, dest, make_argv, _child_env(secrets), secrets.values(),
                             tracker.report)


# -- public entry points -------------------------------------------------------------------------------

async def run_once(
    opts: AscpOptions,
    sources: Sequence[str],
    dest: str,
    *,
    secrets: AscpSecrets = NO_SECRETS,
    on_progress: ProgressCallback | None = None,
    pair_list: Path | None = None,
    file_list: Path | None = None,
) -> AscpResult:
    """Run one ascp session to the end and return what it moved.

    :raises errors.UsageError: ascp not found or bad options (before any process starts).
    :raises errors.AuthError: ascp failed to authenticate.
    :raises errors.TransientError: network failure, retryable FASP code, stall, death by a signal.
    :raises errors.PermanentError: any other failure (missing path, usage, non-retryable FASP code).
    """
    started = time.monotonic()
    out = await _attempt(opts, sources, dest, secrets, _Tracker(on_progress), pair_list, file_list)
    if out.error is not None:
        raise out.error
    return AscpResult(bytes=out.bytes, files=out.files, seconds=time.monotonic() - started,
                      partial=out.partial, attempts=1)


async def transfer(
    opts: AscpOptions,
    sources: Sequence[str],
    dest: str,
    *,
    secrets: AscpSecrets = NO_SECRETS,
    on_progress: ProgressCallback | None = None,
    on_retry: OnRetry | None = None,
    attempts: int = 5,
    pair_list: Path | None = None,
    pacer: Pacer | None = None,
    file_list: Path | None = None,
) -> AscpResult:
    """:func:`run_once`, rerun by the pacer after transient failures (ascp resumes: ``-k`` stays set) up to
    ``attempts`` sessions in all.

    The waits are the pacer's (default: full jitter, base 1 s, cap 30 s); ``on_retry`` hears each retry
    as a :class:`~asyncdepo.transport.pacer.RetryEvent`. Progress deltas continue across attempts (a resumed
    file is not counted twice).

    :raises: as :func:`run_once`; a transient error only once the attempts are used up.
    """
    if attempts < 1:
        raise errors.UsageError("attempts must be at least 1")
    pacer = (pacer or Pacer(RetryPolicy(base=1.0, cap=30.0))).derive(attempts=attempts)
    tracker = _Tracker(on_progress)
    started = time.monotonic()
    moved = files = sessions = 0

    async def session() -> SessionOutcome:
        nonlocal moved, files, sessions
        sessions += 1
        out = await _attempt(opts, sources, dest, secrets, tracker, pair_list, file_list)
        moved += out.bytes
        files += out.files
        if out.error is not None:
            raise out.error
        return out

    out = await pacer.call(session, on_retry=on_retry)
    return AscpResult(bytes=moved, files=files, seconds=time.monotonic() - started, partial=out.partial,
                      attempts=sessions)
