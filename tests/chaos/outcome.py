"""Running the CLI against a target of the fault suite, killing it at a byte offset, and the one rule every
case ends with: **the target holds exactly the source, or the run exits non-zero naming what differs** (never
exit 0 with a difference), and nothing half-done is left on the target unless the journal keeps it for
resume. The figures the suite reports (kill points survived, faults injected, files verified, bytes lost)
are counted here."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from pathlib import PurePosixPath

import pytest

from tests.chaos.world import Target

CLI = [sys.executable, "-m", "tests.chaos.launch"]
TIMEOUT = 240.0  # a guard against a hang (a run of the suite takes seconds), not a wait

#: the current test's figures; conftest.py adds them to the session's totals when the test passed (those of
#: expected failures are reported apart: they show the bugs their fixes will remove)
FIGURES: Counter[str] = Counter()


@dataclasses.dataclass
class Outcome:
    rc: int
    out: str
    err: str

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL

    @property
    def text(self) -> str:
        return self.out + self.err


def run(target: Target, *extra: str, env: dict[str, str] | None = None) -> Outcome:
    """The target's command (plus ``extra``) to its end."""
    watch = Watch(start(target, *extra, env=env))
    return watch.end()


def start(target: Target, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The target's command in a session of its own (so a kill takes its children, e.g. ascp, with it)."""
    FIGURES["runs"] += 1
    return subprocess.Popen([*CLI, *target.argv(), *extra], env={**target.env(), **(env or {})}, cwd=target.tmp,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)


class Watch:
    """A started run: its output drained in a thread, so a test can wait for an event *or* the run's end."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.ended = threading.Event()
        self._got: list[tuple[str, str]] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        self._got.append(self.proc.communicate())
        self.ended.set()

    def until(self, event: threading.Event, timeout: float = TIMEOUT) -> bool:
        """Wait until ``event`` is set (True) or the run ended first (False)."""
        either = threading.Event()

        def watch(e: threading.Event) -> None:
            if e.wait(timeout):
                either.set()

        for e in (event, self.ended):
            threading.Thread(target=watch, args=(e,), daemon=True).start()
        if not either.wait(timeout):
            raise AssertionError("the run neither reached the awaited point nor ended")
        return event.is_set()

    def end(self, *, kill: bool = False) -> Outcome:
        """The run's outcome; ``kill``: SIGKILL its whole process group first."""
        if kill and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if not self.ended.wait(TIMEOUT):
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run did not end within {TIMEOUT} s")
        out, err = self._got[0]
        return Outcome(self.proc.returncode, out, err)


def finish(proc: subprocess.Popen[str], reached: threading.Event, *, kill: bool = True) -> Outcome:
    """Wait until ``reached`` is set or the process ends; then SIGKILL its process group (``kill``)."""
    watch = Watch(proc)
    watch.until(reached)
    return watch.end(kill=kill)


def run_killed(target: Target, offset: int, *extra: str) -> Outcome:
    """Run until ``offset`` bytes went through the target's server, then SIGKILL the client (and its children).
    A run that ends before the offset is returned as it ended."""
    reached, env = target.arm(offset)
    try:
        outcome = finish(start(target, *extra, env=env), reached)
    finally:
        target.disarm()
    if outcome.killed:
        FIGURES["kills"] += 1
    return outcome


def differing(target: Target) -> dict[str, int]:
    """``rel -> bytes that differ`` between the target and what it should hold."""
    expected, stored = target.expected(), target.stored()
    out = {}
    for rel in expected.keys() | stored.keys():
        a, b = expected.get(rel), stored.get(rel)
        if a != b:
            out[rel] = max(len(a or b""), len(b or b""))
    return out


def names_of(rel: str) -> tuple[str, ...]:
    """How a message may name ``rel``: its path, or its file name, as text or (a name that is not UTF-8) with
    its bytes escaped."""
    out = []
    for name in (rel, PurePosixPath(rel).name):
        raw = os.fsencode(name)
        out += [name, raw.decode("utf-8", "backslashreplace"), raw.decode("utf-8", "replace")]
    return tuple(out)


def check(target: Target, outcome: Outcome, *, ok: bool | None = None, also: tuple[str, ...] = (),
          after_kill: bool = False) -> None:
    """The rule of the suite (module docstring). ``ok``: the run must (True) or must not (False) succeed;
    ``also``: other names a failure may give instead of a file's (a packed archive, an image set);
    ``after_kill``: the run resumed a killed one (the rule is the same: what a killed run started on the
    target is cleaned up or kept for resume by the journal)."""
    assert not outcome.killed, "check() judges finished runs"
    FIGURES["faults"] = target.faults.injected()
    diff = differing(target)
    left = target.leftovers()
    if outcome.rc == 0:
        FIGURES["bytes_lost"] += sum(diff.values())
        assert not diff, f"exit 0 but the target differs from the source: {sorted(diff)}\n{outcome.text[-3000:]}"
        FIGURES["files_verified"] += len(target.expected())
        assert not left, f"exit 0 but half-done uploads are left: {sorted(left)}"
    else:
        unnamed = [rel for rel in diff
                   if not any(n in outcome.text for n in (*names_of(rel), *also, *target.also()))]
        assert not unnamed, f"exit {outcome.rc} without naming {sorted(unnamed)}:\n{outcome.text[-3000:]}"
        kept = target.journaled()
        assert left <= kept, f"left on the target and not in the journal: {sorted(left - kept)}"
    if ok is not None:
        assert (outcome.rc == 0) == ok, f"exit {outcome.rc} (wanted {'0' if ok else 'non-zero'}):\n" \
                                        f"{outcome.text[-3000:]}"


def params(cases: Iterable[tuple[str, str, object]], *, fast: bool, fast_cases: Collection[tuple[str, str]],
           waiting: Mapping[tuple[str, str], str]) -> list[object]:
    """``pytest.param(target, value)`` for each ``(target, kind, value)`` of the fast subset (``fast``) or of the
    rest, with a strict xfail where ``waiting`` names the item of the issue the case waits for."""
    out: list[object] = []
    for target, kind, value in cases:
        if ((target, kind) in fast_cases) != fast:
            continue
        why = waiting.get((target, kind))
        marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
        out.append(pytest.param(target, value, id=f"{target}-{kind}", marks=marks))
    return out
