"""ascp's management-port protocol and its failures: FASPMGR frames, the FASP error table, classification.

Nothing here runs a process or reads the console's progress lines (that is :mod:`asyncdepo.transport.ascp.console`,
which re-exports every public name of this module). All of it is pure and synchronous.

Management port (``-M port``): ascp connects to our listener and writes frames: a ``FASPMGR 2`` line,
``Key: Value`` lines (one space after the colon is part of the syntax, the rest of the value is kept;
newline, carriage return and ESC inside values are escaped as ESC n, ESC r, ESC ESC), then a blank line.
:class:`FaspMgrParser` turns lines into frame dicts and never raises on malformed input.

Failures: :data:`FASP_ERRORS` names each FASP code; :func:`code_from_text` maps ascp's console messages to
a code when no frame carried one; :func:`classify` maps one failed session to ``asyncdepo.errors``
(``AuthError``, ``TransientError`` or ``PermanentError``, keeping ascp's words); :func:`scrub` removes
secret values from any text before it reaches a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from asyncdepo import errors

# FASP error codes (the number in a management ERROR/FILEERROR frame's ``Code``) and their meaning.
# Which ones are worth retrying is the client's call, not the protocol's; this set follows the
# retryable list of Aspera's own transfer SDK (network, timeouts, resources, busy server).
FASP_ERRORS: dict[int, str] = {
    1: "Generic fasp protocol error", 2: "Generic SCP error", 3: "Target incorrectly specified",
    4: "No such file or directory", 5: "Insufficient permission to read or write",
    6: "Target is not a directory", 7: "File is a directory - expected regular file",
    8: "Incorrect usage of scp command", 9: "Duplicate license", 10: "Rate exceeds the cap imposed by license",
    11: "Internal error (unexpected error)", 12: "Error establishing control connection",
    13: "Timeout establishing control connection", 14: "Error establishing data connection",
    15: "Timeout establishing data connection", 16: "Connection lost", 17: "Receiver fails to send feedback",
    18: "Receiver fails to receive data packets", 19: "Authentication failure", 20: "Nothing to transfer",
    21: "Not a regular file (special file)", 22: "File table overflow", 23: "Too many files open",
    24: "File too big for file system", 25: "No space left on disk", 26: "Read only file system",
    27: "Some individual files failed", 28: "Cancelled by user", 29: "License not found or unable to access",
    30: "License expired", 31: "Unable to setup socket", 32: "Out of memory, unable to allocate",
    33: "Can't spawn thread", 34: "Unauthorized by external auth server",
    35: "Error reading source file from disk", 36: "Error writing to disk", 37: "Authorization failure",
    38: "Operation not permitted by license", 39: "Remote peer terminated session",
    40: "Transfer stalled, timed out", 41: "Path violates docroot containment",
    42: "File or directory already exists", 43: "Cannot stat file", 44: "UDP session initiation fatal error",
    45: "Bandwidth measurement fatal error", 46: "Virtual link error", 47: "Error establishing HTTP connection",
    48: "File encryption error", 49: "File decryption error, bad passphrase",
    50: "aspera.conf contains invalid data", 51: "Remote-host key check failure",
    52: "File start validation failed", 53: "File stop validation failed",
    54: "File threshold validation failed", 55: "File path/name too long for file system",
    56: "Path contains illegal characters", 57: "Chunk size/start must be aligned with storage",
    58: "Session aborted due to validation error", 59: "Remote storage errored",
    60: "Session aborted due to Lua script abort", 61: "Retryable encryption-at-rest error",
    62: "Fatal encryption-at-rest error", 63: "Path refers to a symbolic link loop",
    64: "Can't rename a partial file", 65: "Cipher not usable in FIPS mode", 66: "Peer requires FIPS",
}
RETRYABLE_CODES = frozenset({12, 13, 14, 15, 16, 17, 18, 23, 32, 33, 35, 36, 37, 39, 40, 44, 45, 61})
AUTH_CODES = frozenset({19, 34})
USAGE_EXIT = 112  # ascp run without (valid) arguments prints its usage and exits with this status

# Text ascp prints -> FASP code, for console-only sessions (no management port to give the code).
# Checked in order, on the lower-cased message; the first match wins.
_TEXT_CODES: tuple[tuple[str, int], ...] = (
    ("failed to authenticate", 19), ("authentication fail", 19), ("permission denied (publickey", 19),
    ("unauthorized", 34), ("failed to open tcp connection", 12), ("ssh connection", 12),
    ("control connection", 12), ("connection refused", 12), ("connection lost", 16),
    ("connection reset", 16), ("timed out", 40), ("stalled", 40), ("peer aborted", 39),
    ("no such file or directory", 4), ("docroot", 41), ("permission", 5), ("no space left", 25),
    ("read only file system", 26), ("not a directory", 6), ("is a directory", 7),
)


# -- management port -----------------------------------------------------------------------------------

MGR_HEADER = "FASPMGR 2"


def unescape_value(value: str) -> str:
    """Undo ascp's escaping of ESC n / ESC r / ESC ESC in management values (unknown pairs are kept)."""
    if "\x1b" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\x1b" and i + 1 < len(value) and value[i + 1] in "nr\x1b":
            out.append({"n": "\n", "r": "\r", "\x1b": "\x1b"}[value[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def escape_value(value: str) -> str:
    """The inverse of :func:`unescape_value` (the stand-in ascp writes frames with it)."""
    return value.replace("\x1b", "\x1b\x1b").replace("\n", "\x1bn").replace("\r", "\x1br")


class FaspMgrParser:
    """Line-by-line parser of management frames: ``feed_line`` returns a frame's dict when it ends.

    Malformed input is skipped rather than raised (a progress channel must not kill a transfer): a
    field before any header or a line without ``": "`` is counted in ``garbage``; a new header discards
    an unfinished frame.
    """

    def __init__(self) -> None:
        self._frame: dict[str, str] | None = None
        self.garbage = 0

    def feed_line(self, line: str) -> dict[str, str] | None:
        line = line.rstrip("\r\n")
        if line == MGR_HEADER:
            if self._frame:
                self.garbage += 1
            self._frame = {}
            return None
        if line == "":
            frame, self._frame = self._frame, None
            return frame
        key, sep, value = line.partition(":")
        if self._frame is None or not sep or not key:
            self.garbage += 1
            return None
        self._frame[key] = unescape_value(value.removeprefix(" "))
        return None

    def feed_text(self, text: str) -> list[dict[str, str]]:
        """All frames completed by the lines of ``text`` (for tests and recorded streams)."""
        return [f for f in (self.feed_line(x) for x in text.split("\n")) if f is not None]


def frame_int(frame: dict[str, str], key: str) -> int | None:
    """``frame[key]`` as an int, None when missing or not a number."""
    try:
        return int(frame[key])
    except (KeyError, ValueError):
        return None


# -- failures ------------------------------------------------------------------------------------------

def code_from_text(text: str | None) -> int | None:
    """The FASP code an ascp message stands for (``"failed to authenticate"`` -> 19), None if unknown."""
    if not text:
        return None
    low = text.lower()
    for needle, code in _TEXT_CODES:
        if needle in low:
            return code
    for code, meaning in FASP_ERRORS.items():
        if meaning.lower() in low:
            return code
    return None


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every non-empty secret value replaced by ``***`` (belt and braces for messages)."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def classify(
    *,
    returncode: int | None,
    message: str | None,
    code: int | None = None,
    usage: bool = False,
    stderr_tail: Sequence[str] = (),
) -> errors.TransferError:
    """Map one failed ascp session to the error tree, keeping ascp's own words.

    ``message`` is the best text ascp gave (management ``Description``, ``Session Stop`` text or the
    ``ascp: ...`` stderr line); ``code`` the FASP code when a management frame carried one.
    Authentication codes/texts -> AuthError; retryable codes -> TransientError; other known codes and
    usage errors (exit 112, ``Usage:``) -> PermanentError; death by a signal -> TransientError. A failure
    with no recognisable cause is TransientError: ``-k`` makes a rerun cheap, and attempts are bounded.
    """
    if code is None:
        code = code_from_text(message)
    text = message or (stderr_tail[-1] if stderr_tail else None)
    if returncode is not None and returncode < 0:  # killed: that comes first (its last line may be a log line)
        text = f"killed by signal {-returncode}" + (f"; it last said: {text}" if text else "")
    elif not text:
        text = f"exited with status {returncode}"
    what = f"ascp: {text}" + (f" (FASP error {code}: {FASP_ERRORS.get(code, 'unknown')})" if code else "")
    status = returncode
    if code in AUTH_CODES:
        return errors.AuthError(what, status=status, hint=(
            "check the transfer password (ASPERA_SCP_PASS) or token, the user name and the key file"))
    if code in RETRYABLE_CODES:
        hint = None
        if code in (12, 13):
            hint = "check that the server's TCP port (ascp -P, 33001 by default) is not blocked by a firewall"
        elif code in (14, 15, 44):
            hint = "check that the UDP port (ascp -O, 33001 by default) is open in both directions"
        return errors.TransientError(what, status=status, hint=hint)
    if code is not None:
        return errors.PermanentError(what, status=status)
    if usage or returncode == USAGE_EXIT:
        return errors.PermanentError(f"ascp rejected its command line: {text}", status=status,
                                     hint="check the ascp version and the extra options passed to it")
    return errors.TransientError(what, status=status)
