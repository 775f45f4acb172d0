"""Whether the stand-in ascp's client is still there, and a wait that ends when it is not (no busy loop).

Why: the engine starts ascp in a session of its own (so a terminal's Ctrl-C reaches only the client, which
then stops ascp itself). When the client is SIGKILLed nothing reaches the child: a stand-in held at an
injected stall (or wedged) used to sleep for ever, and each run of the fault suite left dozens of them behind.
A held stand-in now waits on :meth:`ClientWatch.wait`, which returns once the client is gone or a generous
bound has passed, and the session then ends as a stalled FASP session does (the stand-in keeps its part file).
A transfer that is moving never asks: a session that can finish without its client finishes and exits, as
real ascp does (tests rely on that: a rerun finds such a session done or still going).

The client counts as gone when any of these, each reported by the kernel, happens:

* stdout or stderr is a pipe or socket and its reader went away (poll reports POLLERR or POLLHUP on our end):
  the client reads both, and they close when it dies;
* the management connection (``-M``) reaches its end (the client closed it, or died);
* the process that started the stand-in exited (its pidfd turns readable), which also covers a stand-in whose
  output goes to a file or a terminal.

All of them are waited on in one ``poll()``; nothing is checked on a clock. Linux only (pidfd needs 5.3; on
an older kernel the parent is simply not watched).
"""

from __future__ import annotations

import math
import os
import select
import socket
import stat
import time

__all__ = ("HOLD_LIMIT", "ClientWatch")

#: seconds a stand-in is held (stall, wedge) while its client seems alive: longer than any stall timeout a
#: test or a user gives the runner, short enough that a leaked stand-in does not live on for the day
HOLD_LIMIT = 300.0

_GONE = select.POLLERR | select.POLLHUP


class ClientWatch:
    """Watches the client of this process: the pipes of stdout/stderr, the parent, a management socket.

    Create it first thing in ``main`` (so the parent is still the client). ``wait(timeout, mgmt)`` blocks
    until the client is gone (True) or ``timeout`` seconds passed (False); ``mgmt`` is the management
    connection, when there is one (whatever the client writes on it is read and dropped).
    """

    def __init__(self) -> None:
        self._pipes = [fd for fd in (1, 2) if _is_stream(fd)]
        self._parent: int | None = None
        self._orphan = False
        ppid = os.getppid()
        if ppid > 1 and hasattr(os, "pidfd_open"):
            try:
                self._parent = os.pidfd_open(ppid)
            except OSError:  # gone already (ESRCH), or a kernel without pidfds
                self._parent = None
            # the parent may have died between getppid() and pidfd_open(): the pid could be another process
            self._orphan = os.getppid() != ppid

    def wait(self, timeout: float, mgmt: socket.socket | None = None) -> bool:
        """True once the client is gone, False when ``timeout`` seconds passed first."""
        if self._orphan:
            return True
        poller = select.poll()
        for fd in self._pipes:
            poller.register(fd, 0)  # POLLERR/POLLHUP are always reported: the reader went away
        if self._parent is not None:
            poller.register(self._parent, select.POLLIN)  # readable once the process exited
        mfd = mgmt.fileno() if mgmt is not None else -1
        if mgmt is not None and mfd >= 0:
            poller.register(mfd, select.POLLIN | select.POLLRDHUP)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd, ev in poller.poll(math.ceil(left * 1000)):
                if ev & select.POLLNVAL:  # closed under us: it tells nothing any more (and would wake us at once)
                    poller.unregister(fd)
                elif fd == mfd and mgmt is not None and not ev & (_GONE | select.POLLRDHUP):
                    got = _drain(mgmt)
                    if got is False:
                        return True
                    if got is None:  # nothing to read after all: stop watching it rather than wake at once again
                        poller.unregister(fd)
                    # every pass returns, reads what woke it or stops watching that descriptor: never a spin
                else:
                    return True


def _is_stream(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _drain(sock: socket.socket) -> bool | None:
    """Read away what the client sent on the management connection: True when something was read, False
    when the connection ended, None when there was nothing to read."""
    try:
        return bool(sock.recv(4096, socket.MSG_DONTWAIT))
    except BlockingIOError:
        return None
    except OSError:
        return False
