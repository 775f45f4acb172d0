"""What a run reports, and the pieces push and pull share: the report, the ticker, error unwrapping.

Kept apart from the scheduler so that a pull (and the CLI) does not import the push engine.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import anyio

from asyncdepo.errors import DepoError, DiskFullError
from asyncdepo.events import Reporter
from asyncdepo.transport.pacer import first_leaf


@dataclasses.dataclass
class RunReport:
    """The outcome of a run, as the CLI prints it and ``--json`` writes it."""

    ok: bool
    job_id: str
    files_done: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    bytes: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    retries: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    interrupted: bool = False
    #: why the run stopped before it tried every item (a full disk), "" when it did not
    stopped: str = ""
    #: the --bwlimit the run was held to (bytes/s), for the summary next to the rate
    bwlimit: float | None = None
    #: the error that stopped it (not part of the JSON report: its message is in ``failures``)
    stop_error: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)
    #: per worker of a cluster (name -> files, bytes, bytes_sent, failed, batches); empty on one node
    workers: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    #: on a cluster: workers seen, batches handed out, most items the coordinator held at once
    cluster: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stop_error"}
        d["summary"] = dict(self.summary)
        d["mb_per_s"] = round(self.mb_per_s, 2)
        d["failures"] = [{"rel": r, "error": e} for r, e in self.failures]
        return d


def describe(exc: BaseException) -> str:
    err = first_leaf(exc)
    return err.describe() if isinstance(err, DepoError) else f"{type(err).__name__}: {err}"


async def _ticker(reporter: Reporter, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        reporter.tick()


def _fill(report: RunReport, reporter: Reporter, started: float) -> None:
    s = reporter.stats
    report.files_done = s.files_done
    report.files_skipped = s.files_skipped
    report.files_failed = len(report.failures)
    report.bytes = s.bytes_done
    report.bytes_sent = s.bytes_sent
    report.retries = s.retries
    report.seconds = round(time.monotonic() - started, 3)


def megabytes(n: float) -> str:
    """Bytes as ``12.3 MB`` (MB = 10^6 bytes, as every figure in a report)."""
    return f"{n / 1e6:,.1f} MB"


def disk_full_message(err: DiskFullError, need: int, exact: bool, kept: tuple[int, int]) -> str:
    """The one message of a run stopped by a full disk (reported against the disk's path): how much is free,
    how much more is missing
    (``need``: bytes still to write; ``exact`` False while the walk had not finished, so "at least"), and
    what was kept for resume (``kept``: part files, bytes)."""
    free = err.free
    if free is None:
        space = f"{megabytes(need)} still to write"
    else:
        missing = max(0, need - free)
        space = (f"{megabytes(free)} free, {'' if exact else 'at least '}{megabytes(missing)} more needed "
                 f"({megabytes(need)} still to write)")
    files, size = kept
    text = f"disk full: {space}"
    if files:
        text += f"; {files} partial file(s) ({megabytes(size)}) kept for resume"
    return text + "; free some space and run the same command again"
