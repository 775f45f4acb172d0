"""The Ledger seam: a worker's MemoryLedger keeps what the item path records and hands the changed rows to
its owner at each flush; the SQLite journal is the other Ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncdepo.engine.journal import Journal
from asyncdepo.engine.ledger import Ledger, MemoryLedger


async def _record_item(ledger: Ledger) -> None:
    """What the engine's item path does to a ledger, in order."""
    await ledger.record("job", "a.bin", size=10, mtime_ns=1, state="partial", remote={"location": "/u/1"})
    await ledger.flush()
    await ledger.record("job", "a.bin", state="partial", offset=5, remote={"location": "/u/1"})
    await ledger.record("job", "a.bin", state="done", offset=10, digests={"md5": "x"}, error=None, transient=0)


async def test_memory_ledger_hands_changed_rows_to_its_owner_at_each_flush() -> None:
    flushed: list[dict[str, dict[str, Any]]] = []

    async def owner(rows: dict[str, dict[str, Any]]) -> None:
        flushed.append(rows)

    ledger = MemoryLedger("job", {"b.bin": {"remote": {"location": "/u/2"}}}, on_flush=owner, interval=3600)
    await _record_item(ledger)
    assert flushed == [{"a.bin": {"size": 10, "mtime_ns": 1, "state": "partial", "remote": {"location": "/u/1"}}}]
    await ledger.flush()
    assert flushed[1]["a.bin"]["state"] == "done" and flushed[1]["a.bin"]["offset"] == 10
    await ledger.flush()
    assert len(flushed) == 2  # nothing changed: no call
    # rows given at the start are looked up like recorded ones (a retry reopens from them)
    assert (await ledger.lookup("job", ["b.bin", "nope"])) == {"b.bin": {"remote": {"location": "/u/2"}}}
    assert ledger.row("a.bin")["digests"] == {"md5": "x"}
    with pytest.raises(ValueError, match="unknown"):
        await ledger.record("job", "a.bin", secret="no")


async def test_memory_ledger_flushes_by_itself_after_its_interval() -> None:
    flushed: list[dict[str, dict[str, Any]]] = []

    async def owner(rows: dict[str, dict[str, Any]]) -> None:
        flushed.append(rows)

    ledger = MemoryLedger("job", on_flush=owner, interval=0)
    await ledger.record("job", "a.bin", size=1, mtime_ns=1, state="failed", transient=1)
    assert flushed and flushed[-1]["a.bin"]["state"] == "failed"
    assert await ledger.failed_transient("job") == ["a.bin"]


async def test_the_journal_is_a_ledger(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        await _record_item(journal)
        await journal.flush()
        row = (await journal.lookup("job", ["a.bin"]))["a.bin"]
        assert row["state"] == "done" and row["offset"] == 10 and row["remote"] == {"location": "/u/1"}
    finally:
        await journal.close()
