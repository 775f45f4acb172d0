"""Fixtures of the fault suite: the S3 servers (moto and ``rclone serve s3``, once per session), a target by
name, and the figures printed at the end (kill points survived, faults injected, files verified, bytes lost)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.s3_servers import S3TestServer, moto_server, rclone_server  # noqa: F401 - fixtures
from tests.chaos.outcome import FIGURES
from tests.chaos.world import Target, dataset, make_target


@pytest.fixture
def s3(request: pytest.FixtureRequest) -> dict[str, S3TestServer]:
    """The S3 servers a test's target needs, started lazily (rclone only when asked for)."""
    class Lazy(dict[str, S3TestServer]):
        def __missing__(self, key: str) -> S3TestServer:
            server: S3TestServer = request.getfixturevalue(f"{key}_server")
            self[key] = server
            return server

    return Lazy()


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path, s3: dict[str, S3TestServer]) -> Iterator[Target]:
    """The target named by the test's ``name`` parameter, running, with the default data set as its source."""
    name: str = request.param if hasattr(request, "param") else request.getfixturevalue("name")
    with make_target(name, tmp_path, s3) as target:
        target.make_source(dataset(7, target.sizes))
        yield target


TOTALS: dict[str, Counter[str]] = {"passed": Counter(), "xfailed": Counter()}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "setup":
        FIGURES.clear()
    elif report.when == "teardown":
        return
    elif report.passed and not hasattr(report, "wasxfail"):
        TOTALS["passed"].update(FIGURES)
    elif report.skipped and hasattr(report, "wasxfail"):
        TOTALS["xfailed"].update(FIGURES)


def _line(f: Counter[str]) -> str:
    return (f"kill points survived: {f['kills_survived']} (of {f['kills']} kills), faults injected: {f['faults']}, "
            f"files verified: {f['files_verified']}, bytes lost: {f['bytes_lost']}, CLI runs: {f['runs']}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    passed, xfailed = TOTALS["passed"], TOTALS["xfailed"]
    if passed or xfailed:
        terminalreporter.write_sep("-", "fault suite")
        terminalreporter.write_line(f"passed cases: {_line(passed)}")
        if xfailed:
            terminalreporter.write_line(f"expected failures (bugs awaiting their fix): {_line(xfailed)}")
