"""Storage of the tus simulator (:mod:`asyncdepo.sim.tus`): the upload resources and their layout on disk.

Under ROOT: ``uploads/<id>.bin`` (the bytes) and ``uploads/<id>.json`` (length, metadata decoded and raw,
offset, terminated), rewritten atomically after every request that changed it; on a restart the JSON offset
is the truth and the data file is truncated to it. A completed upload is hard-linked to
``complete/<relpath>``. The protocol (and why) is described in :mod:`asyncdepo.sim.tus`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from pathlib import Path
from typing import Any

import orjson


class Upload:
    """One upload resource; ``offset`` is the number of bytes accepted so far."""

    def __init__(self, uid: str, length: int | None, metadata: dict[str, str], raw_metadata: str) -> None:
        self.id = uid
        self.length = length
        self.metadata = metadata
        self.raw_metadata = raw_metadata
        self.offset = 0
        self.terminated = False
        self.materialised = False
        self.lock = asyncio.Lock()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "length": self.length,
            "metadata": self.metadata,
            "metadata_header": self.raw_metadata,
            "offset": self.offset,
            "terminated": self.terminated,
        }

    @property
    def complete(self) -> bool:
        return self.length is not None and self.offset == self.length


class TusState:
    """The simulator's uploads and storage layout."""

    def __init__(self, root: Path, max_size: int | None, extensions: tuple[str, ...], lock_timeout: float):
        self.root = root
        self.uploads_dir = root / "uploads"
        self.complete_dir = root / "complete"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.complete_dir.mkdir(parents=True, exist_ok=True)
        self.max_size = max_size
        self.extensions = extensions
        self.lock_timeout = lock_timeout
        self.uploads: dict[str, Upload] = {}

    def data_path(self, uid: str) -> Path:
        return self.uploads_dir / f"{uid}.bin"

    def info_path(self, uid: str) -> Path:
        return self.uploads_dir / f"{uid}.json"

    def save(self, up: Upload) -> None:
        """Rewrite the info file atomically."""
        tmp = self.info_path(up.id).with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(up.to_json()))
        os.replace(tmp, self.info_path(up.id))

    def get(self, uid: str) -> Upload | None:
        """The upload ``uid``, loaded from disk after a restart; None when unknown."""
        up = self.uploads.get(uid)
        if up is not None or not uid.isalnum():
            return up
        try:
            info = orjson.loads(self.info_path(uid).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        up = Upload(uid, info["length"], info["metadata"], info["metadata_header"])
        up.offset, up.terminated = info["offset"], info["terminated"]
        if not up.terminated:  # the JSON offset is the truth: drop unconfirmed bytes of a crashed request
            try:
                os.truncate(self.data_path(uid), up.offset)
            except OSError:
                return None
        self.uploads[uid] = up
        return up

    def target_rel(self, up: Upload) -> str:
        """Where a completed upload lands under ``complete/``: ``relpath``, else ``filename``, else its id. A
        name that is not UTF-8 (Linux file names are bytes) lands under those very bytes."""
        for key in ("relpath", "filename"):
            name = up.metadata.get(key) or raw_name(up.raw_metadata, key)
            if name:
                return name
        return up.id

    def materialise(self, up: Upload) -> None:
        """Hard-link a completed upload to ``complete/<relpath>``, replacing an older file atomically."""
        dest = self.complete_dir / self.target_rel(up)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{up.id}.tmp"  # not the name plus a suffix: that may be longer than a name may be
        tmp.unlink(missing_ok=True)
        os.link(self.data_path(up.id), tmp)
        os.replace(tmp, dest)
        up.materialised = True


def raw_name(header: str, key: str) -> str | None:
    """The value of ``key`` in a raw ``Upload-Metadata`` header as a file-system name (``os.fsdecode`` of its
    bytes, so a name that is not UTF-8 maps back to the same bytes), or None when absent, unreadable or not
    a relative path without ``..``."""
    for pair in header.split(","):
        name, _, value = pair.strip().partition(" ")
        if name != key:
            continue
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except binascii.Error:
            return None
        parts = raw.split(b"/")
        if not raw or raw.startswith(b"/") or b".." in parts or b"\0" in raw or b"\\" in raw:
            return None
        return os.fsdecode(raw)
    return None
