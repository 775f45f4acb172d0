"""The ImmPort simulator's storage (:mod:`asyncdepo.sim.immport`): studies on disk and their manifests.

Storage is a directory of studies, ``ROOT/SDYnnn/...``; every regular file under it is a shared file whose
ImmPort path is ``/SDYnnn/...``. Names starting with ``.`` are hidden, and a sidecar ``NAME.sim-md5``
(holding 32 hex digits) overrides the ``generatedMD5`` the manifest publishes for ``NAME``, so a test can
simulate a corrupted file. :func:`write_study` fills a study with pseudo-random files.
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MD5_SIDECAR = ".sim-md5"


def norm_path(path: str) -> str | None:
    """An ImmPort path (``/SDY1/a/b``) as a relative POSIX path (``SDY1/a/b``); None when it escapes."""
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".") for p in parts):
        return None
    return "/".join(parts)


def is_hidden(name: str) -> bool:
    """Hidden names (``.x``) and md5 sidecars are no shared files."""
    return name.startswith(".") or name.endswith(MD5_SIDECAR)


def file_uuid(rel: str) -> str:
    """The stable fileUUID of the shared file at ``rel`` (same across simulator restarts)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"immport-sim:{rel}"))


class StudyStore:
    """The studies under ``root``: path resolution, listing walks, published md5s (cached by size and
    mtime) and the fileUUID index. The simulator (``ImmportSim``) is one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._md5: dict[str, tuple[int, int, str]] = {}
        self._uuids: dict[str, str] = {}

    def resolve(self, path: str) -> Path | None:
        """The local path of an ImmPort path, or None when it does not exist (or is hidden)."""
        rel = norm_path(path)
        if rel is None or not rel:
            return None if rel is None else self.root
        local = self.root / rel
        return local if local.exists() and not is_hidden(local.name) else None

    def walk(self, rel: str) -> Iterator[tuple[str, os.stat_result]]:
        """(rel, stat) of every visible regular file under ``rel`` (sorted, recursive)."""
        base = self.root / rel if rel else self.root
        if base.is_file():
            yield rel, base.stat()
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for full in (Path(dirpath) / n for n in sorted(filenames) if not is_hidden(n)):
                yield full.relative_to(self.root).as_posix(), full.stat()

    def published_md5(self, rel: str, st: os.stat_result) -> str:
        """generatedMD5 of ``rel``: the sidecar override, else the cached or computed md5 (blocking)."""
        local = self.root / rel
        sidecar = local.with_name(local.name + MD5_SIDECAR)
        if sidecar.exists():
            return sidecar.read_text().strip()
        cached = self._md5.get(rel)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        with open(local, "rb") as f:
            digest = hashlib.file_digest(f, "md5").hexdigest()
        self._md5[rel] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def manifest(self, study: str) -> list[dict[str, Any]]:
        """The study's file manifest (blocking: hashes new files)."""
        rows = []
        for rel, st in self.walk(study):
            uid = file_uuid(rel)
            self._uuids[uid] = rel
            rows.append({"fileUUID": uid, "path": "/" + rel, "fileName": rel.rsplit("/", 1)[-1],
                         "generatedMD5": self.published_md5(rel, st), "filesizeBytes": st.st_size,
                         "studyAccession": study})
        return rows

    def by_uuid(self, uid: str) -> str | None:
        rel = self._uuids.get(uid)
        if rel is None:  # not seen in a manifest yet: index everything once
            for r, _ in self.walk(""):
                self._uuids[file_uuid(r)] = r
            rel = self._uuids.get(uid)
        return rel if rel is not None and (self.root / rel).is_file() else None


def write_study(root: Path, study: str, count: int, size: int, *, per_dir: int = 100, seed: int = 1,
                prefix: str = "ResultFiles") -> list[str]:
    """Create ``count`` files of ``size`` pseudo-random bytes under ``root/study/prefix/dNN/``; returns
    their ImmPort paths. For tests, benchmarks and the demo."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        rel = f"{study}/{prefix}/d{i // per_dir:02d}/file{i:05d}.bin"
        local = root / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(rng.randbytes(size))
        paths.append("/" + rel)
    return paths
