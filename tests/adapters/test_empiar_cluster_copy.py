"""A cluster worker's copy of the EMPIAR adapter (built without the API or Globus, completed by the handoff):
it carries the transfer password and the entry's folder, hands back how groups went, and leaves alone the
files an earlier run's Globus task holds when the coordinator has a Globus route (the two would write one
file at once). The coordinator's side: ``fallback`` is its Globus route, sharing its job state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncdepo import errors
from asyncdepo.adapters.empiar import adapter as EA
from asyncdepo.adapters.empiar.schema import Layout
from asyncdepo.contract import Item, SessionPlan
from asyncdepo.transport.ascp.options import AscpOptions, AscpSecrets


class _Progress:
    def __init__(self) -> None:
        self.failed_: dict[str, errors.DepoError] = {}

    def moved(self, rel: str, n: int) -> None:
        raise AssertionError("nothing may move")

    def done(self, rel: str, state: Any = None) -> None:
        raise AssertionError("nothing is done")

    def failed(self, rel: str, error: errors.DepoError) -> None:
        self.failed_[rel] = error

    async def note(self, state: Any) -> None:
        raise AssertionError("no note")


def _copy(tmp_path: Path) -> EA.EmpiarAdapter:
    layout = Layout(tmp_path, "", (), ())
    dep = EA.Deposition({}, tmp_path / "d.json", layout)
    route = EA.AscpRoute(AscpOptions(ascp="/nonexistent/ascp"), AscpSecrets(), "emp_dep@host")
    return EA.EmpiarAdapter(None, dep, ascp=route, server="https://empiar.example/api/")


def test_worker_copy_takes_the_handoff_and_hands_back_its_routes(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    copy.take_handoff({"entry_id": 7, "directory": "DIR7", "ascp": {"password": "pw", "token": None,
                                                                    "cookie": None}, "globus": True})
    assert copy.ascp is not None and copy.ascp.secrets.password == "pw" and "pw" not in repr(copy.ascp)
    assert copy.remote_dir() == "upload/DIR7/data"
    with pytest.raises(errors.UsageError, match="no API"):
        copy.api  # noqa: B018 - prepare and finish are the coordinator's
    assert copy.fallback() is None  # no Globus route on a worker
    copy._went("set1", "ascp")
    coordinator = _copy(tmp_path)
    coordinator.take_handback(copy.handback())
    coordinator.take_handback({"via": {"set1": "globus"}})
    assert coordinator.state.via == {"set1": "ascp+globus"}


def test_worker_leaves_files_of_an_earlier_globus_task_to_the_coordinator(tmp_path: Path) -> None:
    (tmp_path / "a.mrc").write_bytes(b"x")
    copy = _copy(tmp_path)
    copy.take_handoff({"entry_id": 7, "directory": "DIR7", "ascp": None, "globus": True})
    item = Item(str(tmp_path / "a.mrc"), "a.mrc", 1, 0)
    progress = _Progress()

    async def main() -> None:
        session = await copy.open_session(SessionPlan((item,), {"a.mrc": {"globus_task": "task-1"}}))
        await session.send(progress)  # ascp is never started (its path does not exist)

    anyio.run(main)
    assert isinstance(progress.failed_["a.mrc"], errors.PermanentError)
    assert "Globus task" in str(progress.failed_["a.mrc"])
