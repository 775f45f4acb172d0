"""Every fault class on the wire, over every target, through the CLI: a connection dropped mid-body, 5xx, 429
with Retry-After, a stalled server, a bit flipped in transit, a server answering a wrong digest, a server
that reads slowly in odd-sized pieces. Each run must end with the target equal to the source (the faults are
transient: the retries absorb them) or, where the archive itself publishes a wrong digest, fail naming the
files; never exit 0 with a difference (``check``).

Faults are injected by the target's simulator, by the fault proxy in front of moto and ``rclone serve s3``,
or by the stand-in ascp (its ``ASYNCDEPO_SIM_ASCP_FAIL``), never by Python stand-ins in the client.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import pytest

from asyncdepo.sim import globus as globus_sim
from tests.chaos.outcome import Watch, check, params, run, start
from tests.chaos.world import EmpiarTarget, Target

#: where each HTTP target's data goes (method, path pattern): the faults aim there
DATA = {
    "tus": ("PATCH", "/files/*"),
    "s3-moto": ("PUT", "*"),
    "s3-rclone": ("PUT", "*"),
    "pdis": ("POST", "/api/v1/upload/"),
    "gypsum": ("PUT", "/s3/*"),
    "immport-https": ("GET", "/_s3/immport-shared/*"),
}
#: where each target's server reports a digest, when not on the data route
DIGEST = {"immport-https": ("GET", "/data/query/api/study/manifest/*")}
RULES = {
    "drop": "drop after=150K first=1",
    "5xx": "status=503 first=2",
    "429": "status=429 retry-after=0.05 first=2",
    "stall": "stall first=1",
    "corrupt": "corrupt after=100K first=1",
    "digest": "digest first=1",
    "slow": "slow first=0",
}


@dataclasses.dataclass(frozen=True)
class Case:
    target: str
    fault: str
    rule: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()
    setup: Callable[[Target], None] | None = None
    ok: bool = True
    why: str | None = None  # a strict xfail: the behaviour #14 asks for has not landed yet

    @property
    def id(self) -> str:
        return f"{self.target}-{self.fault}"


def _globus(fn: Callable[[globus_sim.GlobusState], None]) -> Callable[[Target], None]:
    def setup(world: Target) -> None:
        assert isinstance(world, EmpiarTarget) and world.globus.server is not None
        state = globus_sim.state_of(world.globus.server.app)
        world.globus.call(lambda: fn(state))
    return setup


def _cases() -> list[Case]:
    cases = []
    for target, (method, path) in DATA.items():
        for fault, rule in RULES.items():
            m, p = DIGEST.get(target, (method, path)) if fault == "digest" else (method, path)
            ok = not (target == "immport-https" and fault == "digest")  # the archive's own digest is wrong
            cases.append(Case(target, fault, f"{m} {p} {rule}", ok=ok, why=WAITING.get((target, fault))))
    api = {"empiar-ascp": "POST /empiar/deposition/api/deposit_entry/",
           "empiar-globus": "POST /empiar/deposition/api/deposit_entry/",
           "immport-ascp": "POST /data/download/token"}
    for target, route in api.items():
        cases.append(Case(target, "5xx", f"{route} status=503 first=2"))
        cases.append(Case(target, "429", f"{route} status=429 retry-after=0.05 first=2"))
    for target in ("empiar-ascp", "immport-ascp"):
        cases.append(Case(target, "drop", env=(("ASYNCDEPO_SIM_ASCP_FAIL", "drop:250000:once"),)))
        cases.append(Case(target, "stall", env=(("ASYNCDEPO_SIM_ASCP_FAIL", "stall:250000:once"),),
                          extra=("--stall-timeout", "1")))
    cases.append(Case("empiar-globus", "drop", setup=_globus(lambda s: setattr(s, "transient_faults", 2))))
    # a task Globus itself ends FAILED (permission denied on the destination) is permanent: exit non-zero
    cases.append(Case("empiar-globus", "task-failed", setup=_globus(lambda s: setattr(s, "fail_tasks", 1)),
                      ok=False, why=WAITING.get(("empiar-globus", "task-failed"))))
    return cases


#: cases whose fix has not landed on main: (target, fault) -> the item of #14 they wait for
WAITING: dict[tuple[str, str], str] = {}

CASES = _cases()
FAST = {("tus", "drop"), ("tus", "corrupt"), ("s3-moto", "drop"), ("s3-moto", "429"), ("s3-moto", "digest"),
        ("gypsum", "slow"), ("pdis", "5xx"), ("immport-https", "corrupt"), ("empiar-ascp", "drop")}


def _params(fast: bool) -> list[object]:
    waiting = {(c.target, c.fault): c.why for c in CASES if c.why}
    return params([(c.target, c.fault, c) for c in CASES], fast=fast, fast_cases=FAST, waiting=waiting)


def _run_with(world: Target, case: Case) -> None:
    if case.setup is not None:
        case.setup(world)
    rule = world.faults.add(case.rule) if case.rule else None
    env = dict(case.env)
    if case.fault == "stall" and rule is not None:
        # a stalled server: the run must wait it out without losing or doubling anything
        stalled = threading.Event()
        world.faults.on_stall[:] = [lambda n: stalled.set()]
        watch = Watch(start(world, *case.extra, env=env))
        watch.until(stalled)
        world.call(world.faults.release_stalls)  # woken by the server when the request is held; the run goes on
        outcome = watch.end()
    else:
        outcome = run(world, *case.extra, env=env)
    if rule is not None:
        assert rule.hits, f"the fault {case.rule!r} never hit: the case tests nothing"
    check(world, outcome, ok=case.ok)


@pytest.mark.parametrize(("world", "case"), _params(fast=True), indirect=["world"])
def test_fault_on_the_wire(world: Target, case: Case) -> None:
    _run_with(world, case)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "case"), _params(fast=False), indirect=["world"])
def test_every_fault_on_every_target(world: Target, case: Case) -> None:
    _run_with(world, case)
