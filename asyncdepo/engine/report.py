"""What a run reports, and the pieces push and pull share: the report, the ticker, error unwrapping.

Kept apart from the scheduler so that a pull (and the CLI) does not import the push engine.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import anyio

from asyncdepo.errors import DepoError
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

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
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
