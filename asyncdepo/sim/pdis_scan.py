"""What the PDIS simulator finds inside a stored dataset archive: diffraction images, a PDB id, a verdict.

This is the simulator's stand-in for the archive's validation pipeline. The rules (also in ``docs/pdis.md``):

**Diffraction images** are archive members whose name (case-insensitive) ends with one of
:data:`IMAGE_SUFFIXES` — ``.cbf``, ``.img``, ``.mccd``, ``.smv``, ``.osc``, ``.sfrm``, ``.marNNNN``
(``.mar1200``, ``.mar2300``, ...), an HDF5 master file ``*_master.h5`` or a NeXus file ``.nxs`` —
optionally followed by one compression suffix (``.gz``, ``.bz2``, ``.xz``, ``.zst``). HDF5 data files
(``*_data_000001.h5``) do not count on their own: a dataset is found through its master file.

**Verdict** (the status the submission reaches after ``pending``):

* no image at all -> ``error_no_data``;
* images of more than one format family (e.g. ``.cbf`` and ``.img``) -> ``inconsistent_datasets``;
* an uncompressed image whose header cannot be read -> ``header_not_readable``: an empty image, a ``.cbf``
  not starting with ``###CBF``, an ``.h5``/``.nxs`` without the HDF5 signature, an ``.smv`` not starting
  with ``{``; other binary formats are not checked;
* otherwise ``published``.

**PDB id** (``pdbid`` in the upload answer), first rule that matches wins:

1. a header line ``PDB_ID: 1ABC`` (or ``PDB_ID=1ABC``, key case-insensitive) in the first 4 KiB of an image,
   or anywhere in a small text member (<= 64 KiB: ``*.txt``, ``*.log``, ``*.json``, ``*.cif``, ``*.info``,
   ``*.md``, ``README*``), in archive order;
2. a PDB code in the uploaded file's name, then in member paths in archive order: a digit 1-9 followed by
   three letters or digits, at least one a letter, delimited by anything but a letter or digit
   (``1abc_lysozyme/``, ``dataset_1ABC.tar.zst``; frame numbers like ``_0001`` or ``_1234`` do not match).

Codes are returned upper-case. ``scan_archive`` runs in a worker thread (it reads the stored file).
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

IMAGE_SUFFIXES = (".cbf", ".img", ".mccd", ".smv", ".osc", ".sfrm", "_master.h5", ".nxs")
_MAR = re.compile(r"\.mar\d{3,4}$")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_TEXT_SUFFIXES = (".txt", ".log", ".json", ".cif", ".info", ".md")
_TEXT_LIMIT = 64 * 1024
_HEADER_BYTES = 4096
PDB_CODE = re.compile(r"^[0-9][A-Za-z0-9]{3}$")
_HEADER_LINE = re.compile(rb"(?im)^[#\s]*PDB_ID\s*[:=]\s*([1-9][A-Za-z0-9]{3})\b")
_NAME_CODE = re.compile(r"(?<![A-Za-z0-9])([1-9](?=[A-Za-z0-9]{0,2}[A-Za-z])[A-Za-z0-9]{3})(?![A-Za-z0-9])")
# what a readable header starts with, per family (families not listed are not checked)
_HEADER_MAGIC = {"cbf": b"###CBF", "h5": b"\x89HDF\r\n\x1a\n", "smv": b"{"}

# archive kinds by magic bytes of the stored (inner) file
KIND_TAR, KIND_GZ, KIND_BZ2, KIND_ZIP = "tar", "tar.gz", "tar.bz2", "zip"


def sniff_kind(head: bytes) -> str | None:
    """The archive kind of a stream starting with ``head`` (>= 262 bytes unless the stream is shorter).

    tar: ``ustar`` at offset 257 (POSIX and GNU); gzip ``1f 8b``; bzip2 ``BZh``; zip ``PK\\x03\\x04`` or the
    empty-archive ``PK\\x05\\x06``. Anything else is refused by the upload.
    """
    if head[:2] == b"\x1f\x8b":
        return KIND_GZ
    if head[:3] == b"BZh":
        return KIND_BZ2
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return KIND_ZIP
    if head[257:262] == b"ustar":
        return KIND_TAR
    return None


def image_family(name: str) -> str | None:
    """The image format family of member ``name`` (``cbf``, ``img``, ``h5``, ``mar``, ...) or None."""
    lower = name.lower()
    for suffix in _COMPRESSED:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    if _MAR.search(lower):
        return "mar"
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return "h5" if suffix in ("_master.h5", ".nxs") else suffix[1:]
    return None


def _is_compressed(name: str) -> bool:
    return name.lower().endswith(_COMPRESSED)


def _is_text(name: str) -> bool:
    base = name.rsplit("/", 1)[-1].lower()
    return base.endswith(_TEXT_SUFFIXES) or base.startswith("readme")


def code_in_name(name: str) -> str | None:
    """A PDB code found in a file or directory name by rule 2 of the module docstring, upper-cased."""
    match = _NAME_CODE.search(name)
    return match.group(1).upper() if match else None


@dataclasses.dataclass
class ScanResult:
    """What :func:`scan_archive` found. ``verdict`` is the status after ``pending``."""

    kind: str
    members: int = 0
    images: int = 0
    families: set[str] = dataclasses.field(default_factory=set)
    unreadable: list[str] = dataclasses.field(default_factory=list)
    header_pdbid: str | None = None
    name_pdbid: str | None = None

    @property
    def verdict(self) -> str:
        if self.images == 0:
            return "error_no_data"
        if len(self.families) > 1:
            return "inconsistent_datasets"
        if self.unreadable:
            return "header_not_readable"
        return "published"

    @property
    def details(self) -> str | None:
        """``status_details`` for an error verdict."""
        verdict = self.verdict
        if verdict == "error_no_data":
            return f"no diffraction images among {self.members} archive members"
        if verdict == "inconsistent_datasets":
            return "images of several formats: " + ", ".join(sorted(self.families))
        if verdict == "header_not_readable":
            return "unreadable image header: " + ", ".join(self.unreadable[:3])
        return None

    def pdbid(self, upload_name: str) -> str | None:
        return self.header_pdbid or code_in_name(upload_name) or self.name_pdbid


class ArchiveUnreadable(Exception):
    """The stored file has the right magic bytes but is not a readable archive."""


def _members(path: Path, kind: str) -> Iterator[tuple[str, int, IO[bytes] | None]]:
    """(name, size, open file or None) for each regular member, in archive order."""
    if kind == KIND_ZIP:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    with zf.open(info) as fh:
                        yield info.filename, info.file_size, fh
        return
    # stream mode for compressed tars: one sequential pass, no seeks into a gzip/bzip2 stream
    mode = {KIND_TAR: "r:", KIND_GZ: "r|gz", KIND_BZ2: "r|bz2"}[kind]
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for member in tf:
            if member.isfile():
                yield member.name, member.size, tf.extractfile(member)


def scan_archive(path: Path, kind: str) -> ScanResult:
    """Scan the stored archive at ``path`` (of ``kind`` from :func:`sniff_kind`) by the module's rules.

    :raises ArchiveUnreadable: the archive's structure cannot be read (truncated, corrupt).
    """
    result = ScanResult(kind=kind)
    try:
        for name, size, fh in _members(path, kind):
            result.members += 1
            family = image_family(name)
            text = _is_text(name) and size <= _TEXT_LIMIT
            if family is None and not text:
                if result.name_pdbid is None:
                    result.name_pdbid = code_in_name(name)
                continue
            head = b""
            if fh is not None and (text or not _is_compressed(name)):
                head = fh.read(size if text else _HEADER_BYTES)
            if family is not None:
                result.images += 1
                result.families.add(family)
                magic = _HEADER_MAGIC.get(family)
                if not _is_compressed(name) and (size == 0 or (magic and not head.startswith(magic))):
                    result.unreadable.append(name)
            if result.header_pdbid is None:
                match = _HEADER_LINE.search(head)
                if match:
                    result.header_pdbid = match.group(1).decode().upper()
            if result.name_pdbid is None:
                result.name_pdbid = code_in_name(name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise ArchiveUnreadable(f"{type(exc).__name__}: {exc}") from exc
    return result
