"""The progress display: the overall bar moves with the bytes of files in flight, and its last frame (left on
the terminal after the run) reads 100 % when everything was sent."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from asyncdepo.accounting import Stats
from asyncdepo.adapters.local import LocalAdapter
from asyncdepo.cli.render import RichSink
from asyncdepo.config import EngineConfig
from asyncdepo.engine.scheduler import push
from asyncdepo.events import Reporter


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=160, color_system=None), out


def _percents(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"asyncdepo \S+ +(\d+\.\d)%", text)]


def test_bar_counts_the_bytes_of_files_in_flight() -> None:
    stats = Stats()
    for _ in range(200):
        stats.found(1_000_000)
        stats.done(1_000_000)  # the small files are done ...
    stats.found(300_000_000)
    stats.walk_finished()
    stats.item_in("big.raw", 300_000_000)
    stats.moved("big.raw", 268_500_000)  # ... and the large one is at 89.5 %
    snap = stats.snapshot()
    assert snap["bytes_moving"] == 268_500_000
    console, out = _console()
    sink = RichSink(console)
    sink.tick(snap)
    sink.close()
    assert _percents(out.getvalue())[-1] == 93.7  # (200 + 268.5) / 500, not 40 %
    assert "89.5%  big.raw" in out.getvalue()


def test_bytes_resent_never_push_the_bar_past_the_file() -> None:
    stats = Stats()
    stats.found(100)
    stats.item_in("a", 100)
    stats.moved("a", 80)
    stats.moved("a", 80)  # a retried chunk counted twice on the wire
    assert stats.snapshot()["bytes_moving"] == 100


async def test_last_frame_of_a_finished_push_reads_100_percent(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.bin").write_bytes(b"x" * (1000 * i + 1))
    (src / "big.bin").write_bytes(b"y" * (3 << 20))
    console, out = _console()
    reporter = Reporter([RichSink(console)])
    # a tick far longer than the run: without the closing tick, the only frame would be the empty first one
    report = await push(src, LocalAdapter(f"file://{tmp_path / 'dest'}"), EngineConfig(chunk_size=1 << 20),
                        reporter=reporter, journal_path=tmp_path / "j.sqlite", tick=3600)
    reporter.close()
    assert report.ok
    frames = _percents(out.getvalue())
    assert frames and frames[-1] == 100.0
    assert "files 21/21" in out.getvalue().rsplit("asyncdepo", 1)[-1]
