"""The options, secrets and progress records of an ascp session (safe-to-log values and what they mean).

Kept apart from the runner so that the child-process module (:mod:`.session`) and the runner
(:mod:`.runner`) both build on them without importing each other.
"""

from __future__ import annotations

import dataclasses
import re

SECRET_ENV = ("ASPERA_SCP_PASS", "ASPERA_SCP_TOKEN", "ASPERA_SCP_COOKIE")
# Where Aspera's installers put ascp when it is not on PATH (Connect, the CLI, the SDK, a server).
_KNOWN_LOCATIONS = (
    "~/.aspera/connect/bin/ascp", "~/.aspera/cli/bin/ascp", "~/.aspera/sdk/ascp", "/opt/aspera/bin/ascp",
    "~/Applications/Aspera Connect.app/Contents/Resources/ascp",
    "/Applications/Aspera Connect.app/Contents/Resources/ascp",
)
_RATE = re.compile(r"^\d+(?:\.\d+)?[KMGkmg]?$")
_POLICIES = ("fixed", "high", "fair", "low")


@dataclasses.dataclass(frozen=True)
class AscpOptions:
    """Everything about an ascp session except secrets (safe to log, journal and compare)."""

    ascp: str = "ascp"               # binary path or name, resolved with shutil.which
    host: str | None = None          # with host: --mode/--host/--user and plain paths; else user@host:path
    user: str | None = None          # --user
    tcp_port: int = 33001            # -P (SSH)
    udp_port: int | None = None      # -O (FASP data)
    rate: str | None = None          # -l target rate, e.g. "200M" (bits/s; K/M/G suffixes)
    min_rate: str | None = None      # -m
    policy: str | None = None        # --policy=fixed|high|fair|low
    fair: bool = False               # -Q (legacy fair policy)
    no_encryption: bool = False      # -T
    create_dir: bool = False         # -d
    preserve_times: bool = False     # -p
    resume: int = 2                  # -k 0..3, always passed (first run too)
    key_file: str | None = None      # -i
    mode: str = "send"               # "send" | "recv"
    log_dir: str = "-"               # -L ("-" = console)
    extra: tuple[str, ...] = ()      # more ascp options, placed before the paths (never secrets)
    management_port: bool = False    # -M <our 127.0.0.1 listener>; progress from FASPMGR frames
    stall_timeout: float = 120.0     # no progress for this long -> stop the child, TransientError
    grace: float = 5.0               # SIGTERM -> wait this long -> SIGKILL


@dataclasses.dataclass(frozen=True)
class AscpSecrets:
    """Credentials, handed to ascp through its environment only (never argv). ``repr`` hides them."""

    password: str | None = dataclasses.field(default=None, repr=False)   # ASPERA_SCP_PASS
    token: str | None = dataclasses.field(default=None, repr=False)      # ASPERA_SCP_TOKEN
    cookie: str | None = dataclasses.field(default=None, repr=False)     # ASPERA_SCP_COOKIE

    def values(self) -> tuple[str | None, ...]:
        return (self.password, self.token, self.cookie)


@dataclasses.dataclass(frozen=True)
class AscpProgress:
    """Progress of one file (see the module docstring for the exact meaning of each field)."""

    file: str
    bytes: int
    delta: int
    total: int | None
    rate_bps: float | None
    done: bool


@dataclasses.dataclass(frozen=True)
class AscpResult:
    """A finished transfer. ``bytes``: what ascp moved in all attempts (exact with the management port,
    else the KB precision of ascp's ``Completed:`` line); ``files``: files completed; ``partial``: ascp
    reported ``Partial Completion`` (some files failed) yet exited 0; ``attempts``: sessions run."""

    bytes: int
    files: int
    seconds: float
    partial: bool
    attempts: int


#: no credentials (a key file or an open server)
NO_SECRETS = AscpSecrets()
