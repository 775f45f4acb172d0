"""The gypsum simulator's bucket: objects as plain files under ``ROOT/bucket/``, and the layout keys.

Contract:

* An object key ``p/a/v/dir/file`` lives at ``ROOT/bucket/p/a/v/dir/file``; internal layout files
  (``..manifest``, ``..summary``, ``..latest``, ``..permissions``, ``..quota``, ``..usage``, ``..links``,
  ``..LOCK``) are objects like any other, so ``/file/`` and ``/list`` see exactly what a reader of the real
  bucket sees.
* Objects appear atomically: JSON is written to ``ROOT/tmp/`` and renamed into place; uploads do the same
  (see ``gypsum_upload``), so a reader never sees half an object and ``/list`` never shows one in flight.
* ``etag(key)`` is the hex md5 of the object (what S3/R2 report for a single PUT). It is remembered when
  the object is written and recomputed (then cached by size and mtime) for objects found on disk.
* A key and a "directory" of the same name cannot coexist (S3 allows it, a file system does not); the
  upload start refuses such a file set with 400 before anything is written.

Filesystem work here is synchronous: layout files are small, and the simulator is a test double whose
request handlers may block the loop for the length of a small write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

# -- layout keys -------------------------------------------------------------------------------------


def permissions_key(project: str) -> str:
    return f"{project}/..permissions"


def quota_key(project: str) -> str:
    return f"{project}/..quota"


def usage_key(project: str) -> str:
    return f"{project}/..usage"


def lock_key(project: str) -> str:
    return f"{project}/..LOCK"


def latest_key(project: str, asset: str) -> str:
    return f"{project}/{asset}/..latest"


def summary_key(project: str, asset: str, version: str) -> str:
    return f"{project}/{asset}/{version}/..summary"


def manifest_key(project: str, asset: str, version: str) -> str:
    return f"{project}/{asset}/{version}/..manifest"


def links_key(project: str, asset: str, version: str, hostdir: str) -> str:
    """``hostdir`` is '' or ends with '/' (the directory holding the linked-from files)."""
    return f"{project}/{asset}/{version}/{hostdir}..links"


def is_internal(key: str) -> bool:
    """True for layout files (any component starting with '..'), which do not count towards usage."""
    return key.startswith("..") or "/.." in key


def iso_now(now: float | None = None) -> str:
    """An Internet date/time like JavaScript's ``toISOString()`` (what the real server writes)."""
    when = _dt.datetime.fromtimestamp(now if now is not None else _dt.datetime.now().timestamp(), _dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> float | None:
    """Seconds since the epoch for an Internet date/time, None when unreadable."""
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.timestamp()


class BadKey(ValueError):
    """A key that cannot name an object (empty component, '.', '..', backslash, NUL)."""


class Bucket:
    """Objects under ``root/bucket``; temporary files under ``root/tmp`` (same file system, for rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "bucket"
        self.tmp = root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._etags: dict[str, tuple[int, int, str]] = {}
        self._parsed: dict[str, tuple[int, int, Any]] = {}

    # -- keys ----------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """The file holding ``key``.

        :raises BadKey: the key has an empty, '.' or '..' component, a backslash or a NUL.
        """
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
            raise BadKey(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def temp_path(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    # -- objects -------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except BadKey:
            return False

    def stat(self, key: str) -> os.stat_result | None:
        try:
            st = self.path(key).stat()
        except (BadKey, OSError):
            return None
        return st if os.path.isfile(self.path(key)) else None

    def read_json(self, key: str) -> Any:
        """The parsed object, or None when it does not exist."""
        try:
            data = self.path(key).read_bytes()
        except (BadKey, FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return orjson.loads(data)

    def read_json_cached(self, key: str) -> Any:
        """:meth:`read_json` remembered by size and mtime: for objects read on every request (the
        manifest of an upload in progress is consulted by each presign). Callers must not mutate it."""
        try:
            st = self.path(key).stat()
        except (BadKey, FileNotFoundError, NotADirectoryError):
            return None
        known = self._parsed.get(key)
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        value = self.read_json(key)
        if len(self._parsed) > 64:
            self._parsed.clear()
        self._parsed[key] = (st.st_size, st.st_mtime_ns, value)
        return value

    def write_json(self, key: str, value: Any) -> None:
        data = orjson.dumps(value)
        self.commit_bytes(key, data)

    def commit_bytes(self, key: str, data: bytes) -> None:
        tmp = self.temp_path()
        tmp.write_bytes(data)
        self.commit_file(key, tmp, hashlib.md5(data).hexdigest())

    def commit_file(self, key: str, tmp: Path, md5hex: str) -> None:
        """Move a finished temporary file into place as ``key`` (atomic replace) and remember its md5."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        self._parsed.pop(key, None)
        st = dest.stat()
        self._etags[key] = (st.st_size, st.st_mtime_ns, md5hex)

    def delete(self, key: str) -> int:
        """Remove one object; returns its size (0 if absent). Empty parent directories are pruned."""
        try:
            path = self.path(key)
            size = path.stat().st_size
            path.unlink()
        except (BadKey, FileNotFoundError, IsADirectoryError):
            return 0
        self._etags.pop(key, None)
        self._parsed.pop(key, None)
        self._prune(path.parent)
        return size

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (which ends with '/'); returns the bytes of user files freed."""
        freed = sum(size for key, size in self.walk(prefix) if not is_internal(key))
        try:
            base = self.path(prefix.rstrip("/"))
        except BadKey:
            return 0
        if base.is_dir():
            shutil.rmtree(base, ignore_errors=True)
            self._prune(base.parent)
        for key in [k for k in self._etags if k.startswith(prefix)]:
            del self._etags[key]
        for key in [k for k in self._parsed if k.startswith(prefix)]:
            del self._parsed[key]
        return freed

    def _prune(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def etag(self, key: str) -> str:
        """Hex md5 of the object (cached by size and mtime)."""
        path = self.path(key)
        st = path.stat()
        known = self._etags.get(key)
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        self._etags[key] = (st.st_size, st.st_mtime_ns, digest.hexdigest())
        return digest.hexdigest()

    # -- listing -------------------------------------------------------------------------------------
    def walk(self, prefix: str) -> Iterator[tuple[str, int]]:
        """``(key, size)`` of every object whose key starts with ``prefix``, in key order."""
        for key, size, _ in self._scan(prefix, recursive=True):
            yield key, size

    def list(self, prefix: str | None, recursive: bool) -> list[str]:
        """Keys starting with ``prefix``; without ``recursive``, deeper keys fold into ``dir/`` entries
        (S3 ``delimiter='/'`` semantics: the common prefixes carry the full key up to the next '/')."""
        return [key for key, _, _ in self._scan(prefix or "", recursive)]

    def _scan(self, prefix: str, recursive: bool) -> Iterator[tuple[str, int, bool]]:
        head, _, stem = prefix.rpartition("/")
        try:
            base = self.path(head) if head else self.root
        except BadKey:
            return
        if not base.is_dir():
            return
        lead = f"{head}/" if head else ""
        yield from self._scan_dir(base, lead, stem, recursive)

    def _scan_dir(self, base: Path, lead: str, stem: str, recursive: bool) -> Iterator[tuple[str, int, bool]]:
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not entry.name.startswith(stem):
                continue
            key = lead + entry.name
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    yield from self._scan_dir(Path(entry.path), key + "/", "", True)
                else:
                    yield key + "/", 0, True
            elif entry.is_file(follow_symlinks=False):
                yield key, entry.stat().st_size, False

    def usage(self, project: str) -> int:
        """Bytes of user files (not layout files) under the project."""
        return sum(size for key, size in self.walk(f"{project}/") if not is_internal(key))
