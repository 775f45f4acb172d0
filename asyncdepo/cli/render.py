"""A rich progress display for terminals: total bytes, files done/total, rate, ETA and the active files.

It redraws from the statistics snapshot on each tick (a few times a second) and prints warnings,
failures and messages above the bars as they happen.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from asyncdepo.events import Event, ItemFailed, ItemRetrying, Message, Sink, printable


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f}"


def _eta(snap: dict[str, Any]) -> str:
    left = snap["bytes_total"] - snap["bytes_done"]
    rate = snap["rate"]
    if not snap["walk_done"] or rate <= 0 or left <= 0:
        return "--:--"
    s = int(left / rate)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class RichSink(Sink):
    """Live progress on a terminal (stderr)."""

    def __init__(self, console: Console | None = None, title: str = "asyncdepo") -> None:
        self.console = console or Console(stderr=True)
        self.title = title
        self.live = Live(Text(""), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def emit(self, event: Event) -> None:
        if isinstance(event, Message):
            style = "yellow" if event.level == "warning" else "cyan"
            self.console.print(f"[{style}]{escape(printable(event.text))}[/]", highlight=False)
        elif isinstance(event, ItemFailed):
            # names and messages are escaped: a file called "x[1].bin" is not markup
            self.console.print(f"[red]failed[/] {escape(printable(event.rel))}: "
                               f"{escape(printable(event.error.splitlines()[0]))}", highlight=False)
        elif isinstance(event, ItemRetrying) and event.attempt == 1:
            self.console.print(f"[yellow]retrying[/] {escape(printable(event.rel))}: "
                               f"{escape(printable(event.error))}", highlight=False)

    def tick(self, snap: dict[str, Any]) -> None:
        total = snap["bytes_total"]
        # what is done plus what the files in flight have moved: the bar moves while a large file is sent
        done = min(total, snap["bytes_done"] + snap.get("bytes_moving", 0)) if total else snap["bytes_done"]
        files_total = snap["files_total"]
        files = snap["files_done"] + snap["files_skipped"]
        if total:
            pct = 100.0 * done / total
        else:  # nothing to send (an empty tree, or every file skipped with size 0): done once the walk is
            pct = 100.0 if snap["walk_done"] and files >= files_total else 0.0
        width = 30
        filled = int(width * pct / 100)
        bar = "█" * filled + "░" * (width - filled)
        more = "" if snap["walk_done"] else "+"
        head = Text.assemble(
            (f"{self.title} ", "bold"), (bar, "green"), f" {pct:5.1f}%  ",
            f"{_size(done)}/{_size(total)}{more}  files {files}/{files_total}{more}  ",
            (f"{_size(snap['rate'])}/s", "cyan"), f"  ETA {_eta(snap)}",
            (f"  failed {snap['files_failed']}", "red") if snap["files_failed"] else "",
            (f"  retries {snap['retries']}", "yellow") if snap["retries"] else "",
        )
        table = Table.grid(padding=(0, 1))
        table.add_row(head)
        for rel, (size, sent) in snap["active"].items():
            frac = f"{100.0 * min(sent, size) / size:5.1f}%" if size > 0 else _size(sent)
            table.add_row(Text(f"  {frac}  {printable(rel)}", style="dim"))
        self.live.update(table)

    def close(self) -> None:
        self.live.stop()
