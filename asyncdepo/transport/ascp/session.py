"""One ascp child process from spawn to reap: pipes, management port, stall watchdog, terminate/kill.

:func:`run_session` is the lifecycle behind :func:`asyncdepo.transport.ascp.runner.run_once` and ``transfer``
(whose docstring states the user-facing contract); it knows nothing of argv or secrets beyond what it is
handed. Contract:

* It opens a ``127.0.0.1`` listener on an ephemeral port when ``opts.management_port`` is set (never
  reachable from outside), asks ``make_argv(port)`` for the command line (``port`` is None without the
  listener; errors from it propagate, the listener is closed), and starts ``argv`` with ``env`` in a
  session of its own, stdin from /dev/null.
* stdout, stderr and the management connection are drained concurrently into an
  :class:`ascp_parse.SessionAccount`; each observation goes to ``report`` (which returns the delta it
  counted), and every observation that tells something new pushes the stall deadline forward.
* No progress for ``opts.stall_timeout`` seconds stops the child; the outcome then carries a
  ``TransientError``. An exception raised by ``report`` (a progress callback) propagates as it is.
* However the session ends (exit, stall, error, cancellation), the child's process group gets SIGTERM,
  ``opts.grace`` seconds, then SIGKILL, and the child is always reaped and the listener closed, shielded
  from cancellation. No child outlives :func:`run_session`, nor the process that started it: ascp is
  started through a few lines of Python (:data:`_WITH_PARENT`) that ask Linux to SIGKILL it when its parent
  dies (``PR_SET_PDEATHSIG``) and then exec it, so a client killed with SIGKILL takes its ascp with it and a
  resumed run never races an old ascp over the same files (anyio's ``open_process`` has no pre-exec hook,
  and one in the parent is unsafe with threads). The wrapper costs one Python start-up (~20 ms) per session.
* It returns a :class:`SessionOutcome`: bytes moved, files completed, partial, and the classified error
  (None on exit status 0), with ``hide`` scrubbed from ascp's text.

:raises errors.UsageError: the binary cannot be started (not executable, wrong architecture).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteReceiveStream, Process, SocketAttribute, SocketListener

from asyncdepo import errors
from asyncdepo.transport.ascp import console as P

if TYPE_CHECKING:
    from asyncdepo.transport.ascp.options import AscpOptions

__all__ = ("SessionOutcome", "run_session")


#: the start of the line the wrapper prints when ascp cannot be executed (then it exits 127)
_CANNOT_RUN = "asyncdepo: cannot run "

#: run as ``python -S -c _WITH_PARENT PARENT_PID ASCP ARGS...``: die with the parent (Linux), then exec ascp.
#: The parent may have died before the request took effect: then the parent id is no longer ``PARENT_PID``.
_WITH_PARENT = f"""
import ctypes, os, signal, sys
prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
if prctl is not None and prctl(1, signal.SIGKILL) == 0 and os.getppid() != int(sys.argv[1]):
    os._exit(137)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write({_CANNOT_RUN!r} + sys.argv[2] + ": " + (exc.strerror or str(exc)) + "\\n")
    os._exit(127)
"""


@dataclasses.dataclass
class SessionOutcome:
    """What one session moved, and its failure (None when ascp exited 0)."""

    bytes: int
    files: int
    partial: bool
    error: errors.DepoError | None


class _Session:
    """One ascp child: its pipes and management socket feed a :class:`ascp_parse.SessionAccount`;
    every observation that tells something new pushes the stall deadline forward."""

    def __init__(self, opts: AscpOptions, sources: Sequence[str], dest: str, report: P.Report) -> None:
        self.opts = opts
        send = opts.mode == "send" if opts.host else _is_remote(dest)
        # the local directories ascp's names are relative to (and where their copies can be stat'ed)
        roots = (list(dict.fromkeys(Path(os.path.abspath(s)).parent for s in sources))[:64] if send
                 else [Path(os.path.abspath(dest))])
        self.account = P.SessionAccount(self._report, send=send, roots=roots, management=opts.management_port)
        self.report = report
        self.stall_scope = anyio.CancelScope()  # entered by run_session before anything can report
        self.accept_scope = anyio.CancelScope()
        self.connected = anyio.Event()
        self._last: tuple[str, int, bool] | None = None
        self.cannot_run: str | None = None  # why the wrapper could not exec ascp

    def touch(self) -> None:
        self.stall_scope.deadline = anyio.current_time() + self.opts.stall_timeout

    def _report(self, name: str, nbytes: int, total: int | None, rate: float | None, done: bool) -> int | None:
        if (name, nbytes, done) != self._last:
            # ascp is moving: also when ``report`` has nothing new to tell (a file completed by an
            # earlier attempt and sent again from 0 after a -k 0 rerun)
            self._last = (name, nbytes, done)
            self.touch()
        return self.report(name, nbytes, total, rate, done)

    async def pump_stdout(self, stream: ByteReceiveStream) -> None:
        splitter = P.LineSplitter()
        async for chunk in stream:
            for text, term in splitter.feed(chunk):
                self.account.stdout_line(text, term)
            self.account.stdout_pending(splitter.pending)  # ascp's latest redraw ends only with the next
        for text, term in splitter.flush():
            self.account.stdout_line(text, term)

    async def pump_stderr(self, stream: ByteReceiveStream) -> None:
        splitter = P.LineSplitter()
        async for chunk in stream:
            for text, _ in splitter.feed(chunk):
                self._stderr_line(text)
        for text, _ in splitter.flush():
            self._stderr_line(text)

    def _stderr_line(self, text: str) -> None:
        if text.startswith(_CANNOT_RUN):
            self.cannot_run = text[len(_CANNOT_RUN):]
        else:
            self.account.stderr_line(text)

    async def serve_mgmt(self, listener: SocketListener) -> None:
        with self.accept_scope:
            conn = await listener.accept()
        if self.accept_scope.cancelled_caught:
            return
        self.connected.set()
        splitter = P.LineSplitter()
        async with conn:
            while True:
                try:
                    chunk = await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    break  # ascp closed the port, or died mid-frame: its exit status and console say why
                # outside the try: an error of the progress callback (an OSError too) is the caller's, not ascp's
                for text, _ in splitter.feed(chunk):
                    self.account.mgr_line(text)

    async def wait_exit(self, proc: Process) -> None:
        await proc.wait()
        if self.opts.management_port and not self.connected.is_set():
            # ascp connects first thing, so a connection made before it exited is already queued;
            # a short wait picks it up, and a session that never connected does not hang us.
            with anyio.move_on_after(0.5):
                await self.connected.wait()
            self.accept_scope.cancel()

    def outcome(self, returncode: int | None, hide: Iterable[str | None]) -> SessionOutcome:
        a = self.account
        return SessionOutcome(a.moved, a.completed, a.partial, a.failure(returncode, hide))


def _is_remote(path: str) -> bool:
    # "[user@]host:path" (not "./a:b", "/a:b" or a Windows drive "C:\\x")
    head, sep, _ = path.partition(":")
    return bool(sep) and len(head) > 1 and "/" not in head and "\\" not in head


async def _reap(proc: Process, grace: float) -> None:
    """SIGTERM, wait ``grace``, SIGKILL, wait; then close the pipes. Call shielded."""
    if proc.returncode is None:
        _signal_group(proc, signal.SIGTERM)
        with anyio.move_on_after(grace):
            await proc.wait()
    if proc.returncode is None:
        _signal_group(proc, signal.SIGKILL)
        await proc.wait()
    await proc.aclose()


def _signal_group(proc: Process, sig: signal.Signals) -> None:
    # The child leads its own session (start_new_session), so its group id is its pid; signalling the
    # group also stops anything it spawned. Only done while it is unreaped, so the id cannot be reused.
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


async def run_session(
    opts: AscpOptions,
    sources: Sequence[str],
    dest: str,
    make_argv: Callable[[int | None], list[str]],
    env: dict[str, str],
    hide: Iterable[str | None],
    report: P.Report,
) -> SessionOutcome:
    """Run one ascp child to its end (see the module docstring); ``argv[0]`` names it in errors.

    :raises errors.UsageError: the process cannot be started, or ``make_argv`` refuses the options.
    """
    session = _Session(opts, sources, dest, report)
    listener: SocketListener | None = None
    try:
        port = None
        if opts.management_port:
            multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            (only,) = multi.listeners  # one socket, on 127.0.0.1: never reachable from outside
            assert isinstance(only, SocketListener)
            listener = only
            port = listener.extra(SocketAttribute.local_port)
        argv = make_argv(port)
        wrapped = [sys.executable, "-S", "-c", _WITH_PARENT, str(os.getpid()), *argv]
        proc = await anyio.open_process(wrapped, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            with session.stall_scope as stall_scope:
                session.touch()
                try:
                    async with anyio.create_task_group() as tg:
                        assert proc.stdout is not None and proc.stderr is not None
                        tg.start_soon(session.pump_stdout, proc.stdout)
                        tg.start_soon(session.pump_stderr, proc.stderr)
                        if listener is not None:
                            tg.start_soon(session.serve_mgmt, listener)
                        tg.start_soon(session.wait_exit, proc)
                except BaseExceptionGroup as group:  # an on_progress callback failed: surface it as it is
                    if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                        raise group.exceptions[0] from None
                    raise
        finally:
            with anyio.CancelScope(shield=True):
                await _reap(proc, opts.grace)
    finally:
        if listener is not None:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
    if session.cannot_run is not None and proc.returncode == 127:  # not executable, wrong architecture
        raise errors.UsageError(f"cannot run {session.cannot_run}")
    if stall_scope.cancelled_caught:
        return SessionOutcome(session.account.moved, session.account.completed, False, errors.TransientError(
            f"ascp made no progress for {opts.stall_timeout:g} s and was stopped",
            hint="the network or the server may be stalled; a rerun resumes (-k)"))
    return session.outcome(proc.returncode, hide)
