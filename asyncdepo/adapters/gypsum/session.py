"""Where an interrupted gypsum upload keeps what it needs to resume, outside the journal.

The session token of an upload is a secret (it can complete or abort the upload), so it never goes to the
journal: it lives in a file of its own, created 0600 in a 0700 directory (by default
``$XDG_STATE_HOME/asyncdepo/gypsum-sessions``; the CLI puts it next to the journal). One file per target
``server + project/asset/version``; the name is a hash of those, so it says nothing by itself.

Format: a first line with a JSON header (``label`` — the non-secret id of the upload, used in the job id —,
server, project, asset, version, probation, complete/abort URLs and the token), then one JSON line
``[path, presigned-file URL]`` per file that must be PUT (the URLs the start answered: the API gives no
other way to get them back).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import orjson


def default_directory() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "asyncdepo" / "gypsum-sessions"


@dataclasses.dataclass
class SessionRecord:
    """An open upload session. ``token`` is secret; ``repr`` hides it."""

    label: str
    server: str
    project: str
    asset: str
    version: str
    probation: bool
    complete_url: str
    abort_url: str
    token: str = dataclasses.field(repr=False)
    file_urls: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)


class SessionStore:
    """Session files in ``directory`` (created 0700 on first write)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()

    def path_for(self, server: str, project: str, asset: str, version: str) -> Path:
        digest = hashlib.sha256(f"{server}\x00{project}\x00{asset}\x00{version}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}.session"

    def load(self, server: str, project: str, asset: str, version: str) -> SessionRecord | None:
        """The record for the target, or None (absent or unreadable: a torn write is no session)."""
        path = self.path_for(server, project, asset, version)
        try:
            with open(path, "rb") as fh:
                head = orjson.loads(fh.readline())
                urls = {}
                for line in fh:
                    if line.strip():
                        rel, url = orjson.loads(line)
                        urls[rel] = url
        except (FileNotFoundError, orjson.JSONDecodeError, ValueError, TypeError):
            return None
        try:
            rec = SessionRecord(file_urls=urls, **head)
        except TypeError:
            return None
        if (rec.server, rec.project, rec.asset, rec.version) != (server, project, asset, version):
            return None
        return rec

    def save(self, rec: SessionRecord) -> Path:
        """Write the record atomically, readable by the owner only."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path_for(rec.server, rec.project, rec.asset, rec.version)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        head = {k: v for k, v in dataclasses.asdict(rec).items() if k != "file_urls"}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(head) + b"\n")
            for rel, url in rec.file_urls.items():
                fh.write(orjson.dumps([rel, url]) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def delete(self, server: str, project: str, asset: str, version: str) -> None:
        self.path_for(server, project, asset, version).unlink(missing_ok=True)
