"""The versions a watch makes of one gypsum asset: ``VERSION``, ``VERSION-2``, ``VERSION-3``..., one per batch of
files that became complete together, each one the whole dataset.

A version after the first declares its batch's files and links every other path of the version before
(gypsum ``link`` entries: nothing is sent for them, the server checks that the target is finished and
holds the path, and records the original as ``ancestor`` for links to links), so ``..latest`` always
names a complete version. A file deleted from the source stays in the versions that follow: the archive
keeps what was sent.

The chain is the job state of the watch (journaled after each start and each completion): the number and
name of the open or next version, whether it is open (started, not completed) and the batch it holds,
and the last version completed (the one the next links to).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


@dataclasses.dataclass
class Chain:
    """See the module docstring. ``version`` is the name of the open or next version."""

    base: str
    next: int = 1
    version: str = ""
    open: bool = False
    files: list[str] = dataclasses.field(default_factory=list)
    last: str | None = None

    def __post_init__(self) -> None:
        self.version = self.version or self.name(self.next)

    def name(self, n: int) -> str:
        """The name of the ``n``-th version (1: the base name)."""
        return self.base if n == 1 else f"{self.base}-{n}"

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`state` of an earlier run of the same watch (ignored when it does not fit)."""
        if state.get("base") != self.base or not isinstance(state.get("next"), int):
            return
        self.next, self.version = int(state["next"]), str(state.get("version") or self.name(int(state["next"])))
        self.open, self.files = bool(state.get("open")), [str(f) for f in state.get("files") or []]
        self.last = str(state["last"]) if state.get("last") else None

    def opened(self, files: Iterable[str]) -> None:
        """The version ``version`` was started with the batch ``files``."""
        self.open, self.files = True, sorted(files)

    def completed(self) -> None:
        """The open version was completed: the next one links to it."""
        self.last, self.next, self.open, self.files = self.version, self.next + 1, False, []
        self.version = self.name(self.next)

    def discarded(self) -> None:
        """The open version was aborted: its name is free again for the next batch."""
        self.open, self.files = False, []

    def pass_over(self) -> str:
        """The name ``version`` is taken (another upload, or a version whose session was lost): the next."""
        self.next += 1
        self.version = self.name(self.next)
        return self.version

    def links(self, project: str, asset: str, last_manifest: Mapping[str, Any], batch: Iterable[str]
              ) -> list[dict[str, Any]]:
        """The ``link`` entries of the paths of the last version that ``batch`` does not replace."""
        replaced = set(batch)
        return [{"type": "link", "path": rel,
                 "link": {"project": project, "asset": asset, "version": self.last, "path": rel}}
                for rel in sorted(last_manifest) if rel not in replaced]
