"""``file:///DIR`` — a directory on a local or mounted file system as a target (and a pull source).

Push, per item (chunked mode): bytes go to ``DIR/<rel>.asyncdepo-part`` at each chunk's offset (a name too
long for the suffix gets a shorter hashed part name in the same folder: :mod:`asyncdepo.transport.partfiles`);
``complete`` fsyncs the part file, checks its size and renames it to ``DIR/<rel>`` (atomic on one file
system), so a file appears under its real name only once it is whole. ``abort`` removes the part file.

Resume: the writer's ``state()`` records the source file's size and mtime. When an item is reopened with
that state and the source is unchanged, ``confirmed`` is the size of the existing part file (clamped to the
item's size), so a crash or Ctrl-C resumes where the disk stopped. Without matching saved state a part file
left behind is not trusted (it may hold another version of the file): it is truncated and the item starts
from zero. Before the engine builds on a part file, ``verify`` re-hashes it chunk by chunk against the
digests the journal recorded as each chunk was written, and truncates it after the last chunk that matches
(bytes past the journal's record, written just before a crash, are re-sent too: at most half a second's
worth). A resumed item that was not verified that way is checked at ``complete`` by hashing the whole part
file with the digests the engine passes; items written in one go are not re-read.

A full disk (ENOSPC, EDQUOT) is :class:`~asyncdepo.errors.DiskFullError` carrying the space still free: it
is not retried, and the part file stays for the resume once space is freed. A write the file system refuses
for good (ENAMETOOLONG, EACCES, EROFS...) is a PermanentError: that file fails, without retries.

Chunks are idempotent: a chunk at or below ``confirmed`` is rewritten in place; one past ``confirmed``
raises OffsetMismatchError. Every file operation runs in a worker thread (``anyio.to_thread``); the part
file is opened per chunk, so a writer the engine drops holds no descriptor. Part files are created with
mode 0644 (less the umask) and parent directories as needed.

Pull (``features.pull``): ``list_remote`` walks DIR one directory at a time (part files skipped, symlinks
not followed), ``read`` yields 1 MiB blocks from an offset. No digests are published.

Paths: ``rel`` must be relative and free of ``..``; anything else is a UsageError (never written). Any name
Linux allows is written as it is, including names that are not UTF-8 (``Features.any_name``).

``discard(rel, saved)`` removes the part file of an item whose source vanished.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import anyio

from asyncdepo.contract import Adapter, Chunk, ChunkWriter, Features, Item, RemoteItem, register
from asyncdepo.digests import FACTORIES, hash_path_sync
from asyncdepo.errors import (
    DiskFullError,
    IntegrityError,
    OffsetMismatchError,
    PermanentError,
    SourceError,
    TransientError,
    UsageError,
)
from asyncdepo.transport.failures import disk_error
from asyncdepo.transport.partfiles import SUFFIX as PART_SUFFIX
from asyncdepo.transport.partfiles import part_path

READ_BLOCK = 1 << 20


def safe_rel(rel: str) -> PurePosixPath:
    """``rel`` as a path that stays inside the target directory.

    :raises UsageError: absolute, empty, or containing ``..`` / NUL.
    """
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\0" in rel or str(p) in (".", ""):
        raise UsageError(f"refusing path {rel!r}: it must be relative and stay inside the target directory")
    return p


def _io_error(what: str, exc: OSError, root: Path | None = None) -> DiskFullError | PermanentError | TransientError:
    """An I/O failure as an error of the tree (``failures.disk_error``): a full disk stops the run, a write the
    file system refuses for good (a name too long, no permission) fails the item without a retry, anything
    else (a vanished mount, an I/O error) may come back and is transient."""
    return disk_error(what, exc, root if root is not None else Path("/"))


class LocalWriter(ChunkWriter):
    """Writes one item into its part file; see the module docstring."""

    def __init__(self, final: Path, item: Item, resumed: bool, root: Path | None = None) -> None:
        super().__init__()
        self.final = final
        self.part = part_path(final)
        self.item = item
        self.resumed = resumed
        self.root = root or final.parent

    def state(self) -> dict[str, Any]:
        return {"size": self.item.size, "mtime_ns": self.item.mtime_ns, "confirmed": self.confirmed}

    async def resync(self) -> int:
        try:
            self.confirmed = (await anyio.to_thread.run_sync(os.stat, self.part)).st_size
        except OSError as exc:
            raise _io_error(f"stat {self.item.rel}{PART_SUFFIX}", exc) from exc
        return self.confirmed

    async def write(self, chunk: Chunk) -> None:
        """Write ``chunk`` at its offset (idempotent for chunks already confirmed).

        :raises OffsetMismatchError: the chunk starts past ``confirmed`` (a gap would be left).
        :raises DiskFullError: the disk is full.
        :raises PermanentError | TransientError: the write failed (see :func:`_io_error`).
        """
        if chunk.offset > self.confirmed:
            raise OffsetMismatchError(
                f"{self.item.rel}: chunk at {chunk.offset} but {self.confirmed} bytes confirmed",
                offset=self.confirmed,
            )
        data = chunk.data

        def pwrite_all() -> None:
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                done = 0
                while done < len(data):  # pwrite may be short (signals, some file systems)
                    done += os.pwrite(fd, data[done:], chunk.offset + done)
            finally:
                os.close(fd)

        try:
            await anyio.to_thread.run_sync(pwrite_all)
        except OSError as exc:
            raise _io_error(f"write {self.item.rel}{PART_SUFFIX}", exc, self.root) from exc
        self.confirmed = max(self.confirmed, chunk.offset + len(data))

    async def verify(self, chunks: AsyncIterator[list[tuple[int, int, str]]], algo: str) -> int:
        """Re-hash the part file's chunks against the journal's digests; truncate it after the last chunk that
        matches (see the module docstring). Returns the new ``confirmed``.

        :raises TransientError: the part file cannot be read or truncated.
        """
        good = 0
        if algo in FACTORIES:
            try:
                async for batch in chunks:
                    good, whole = await anyio.to_thread.run_sync(self._check, batch, good, algo)
                    if not whole:
                        break
            except OSError as exc:
                raise _io_error(f"verify {self.item.rel}{PART_SUFFIX}", exc, self.root) from exc
        if good < self.confirmed:
            try:
                await anyio.to_thread.run_sync(os.truncate, self.part, good)
            except OSError as exc:
                raise _io_error(f"truncate {self.item.rel}{PART_SUFFIX}", exc, self.root) from exc
            self.confirmed = good
        self.resumed = False  # the prefix is verified: complete() need not hash the whole file again
        return self.confirmed

    def _check(self, batch: list[tuple[int, int, str]], start: int, algo: str) -> tuple[int, bool]:
        """Blocking: the end of the verified prefix after ``batch``, and whether every chunk in it matched."""
        pos = start
        for offset, length, digest in batch:
            if offset != pos or offset + length > self.confirmed:
                return pos, False  # a gap in the record, or past what the file holds
            got = hash_path_sync(self.part, (algo,), start=offset, stop=offset + length).hexdigests()[algo]
            if got != digest:
                return pos, False
            pos = offset + length
        return pos, True

    async def complete(self, digests: Mapping[str, str], size: int) -> dict[str, Any]:
        """fsync, check the size (and, for a resumed item, the digests), then rename into place.

        :raises IntegrityError: the part file's size or digest differs from what was read.
        :raises TransientError: an I/O error.
        """
        expect = size if self.item.size >= 0 else self.confirmed

        def finish() -> int:
            fd = os.open(self.part, os.O_RDONLY)
            try:
                os.fsync(fd)
                got = os.fstat(fd).st_size
                if got != expect:
                    raise IntegrityError(f"{self.item.rel}: wrote {got} bytes, expected {expect}")
                if self.resumed:
                    _verify(fd, self.item.rel, digests)
            finally:
                os.close(fd)
            os.replace(self.part, self.final)
            _fsync_dir(self.final.parent)  # make the rename itself durable
            return got

        try:
            got = await anyio.to_thread.run_sync(finish)
        except OSError as exc:
            raise _io_error(f"finish {self.item.rel}", exc, self.root) from exc
        return {"path": self.item.rel, "size": got}

    async def abort(self) -> None:
        try:
            await anyio.to_thread.run_sync(lambda: self.part.unlink(missing_ok=True))
        except OSError:  # abort never raises an I/O error: it runs in cleanup paths
            return


def _verify(fd: int, rel: str, digests: Mapping[str, str]) -> None:
    """Hash the whole file behind ``fd`` with every hashlib algorithm in ``digests`` and compare."""
    algos = {a: d for a, d in digests.items() if a in hashlib.algorithms_available and d}
    if not algos:
        return
    hashers = {a: hashlib.new(a) for a in algos}
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    pos = 0
    while n := os.preadv(fd, [view], pos):
        pos += n
        for h in hashers.values():
            h.update(view[:n])
    for algo, hasher in hashers.items():
        if hasher.hexdigest() != algos[algo].lower():
            raise IntegrityError(
                f"{rel}: {algo} of the resumed file differs from the source; it will be re-sent"
            )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


@register("file")
class LocalAdapter(Adapter):
    """A local directory as a target: ``file:///DIR`` (``file://localhost/DIR`` also accepted)."""

    name = "local"
    features = Features(chunked=True, resumable=True, pull=True, any_name=True)

    def __init__(self, url: str, config: Any = None, secrets: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
            raise UsageError(f"not a local directory URL: {url!r} (expected file:///DIR)")
        self.root = Path(unquote(parts.path))
        self.config = config

    def describe(self) -> str:
        return f"file://{self.root}"

    async def __aenter__(self) -> Self:
        try:
            await anyio.to_thread.run_sync(lambda: self.root.mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise UsageError(f"cannot use {self.root} as a target: {exc.strerror}") from exc
        return self

    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> LocalWriter:
        """Prepare ``DIR/<rel>.asyncdepo-part``; resume from its size when ``saved`` matches the item.

        :raises UsageError: ``item.rel`` escapes the directory.
        :raises PermanentError: the file system refuses the directory or part file for good (no permission).
        :raises TransientError: the directory or part file cannot be created (an I/O error).
        """
        final = self.root.joinpath(*safe_rel(item.rel).parts)
        trusted = (
            saved is not None and saved.get("size") == item.size and saved.get("mtime_ns") == item.mtime_ns
        )
        writer = LocalWriter(final, item, resumed=False, root=self.root)

        def prepare() -> int:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(writer.part, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                have = os.fstat(fd).st_size
                keep = min(have, item.size) if trusted and item.size >= 0 else (have if trusted else 0)
                if keep != have:
                    os.ftruncate(fd, keep)
                return keep
            finally:
                os.close(fd)

        try:
            writer.confirmed = await anyio.to_thread.run_sync(prepare)
        except OSError as exc:
            raise _io_error(f"open {item.rel}{PART_SUFFIX}", exc, self.root) from exc
        writer.resumed = writer.confirmed > 0
        return writer

    async def discard(self, rel: str, saved: Mapping[str, Any] | None) -> None:
        """Remove the part file of ``rel`` (the source vanished); nothing when there is none.

        :raises UsageError: ``rel`` escapes the directory.
        :raises TransientError: the part file exists but cannot be removed.
        """
        final = self.root.joinpath(*safe_rel(rel).parts)
        part = part_path(final)
        try:
            await anyio.to_thread.run_sync(lambda: part.unlink(missing_ok=True))
        except OSError as exc:
            raise _io_error(f"remove {rel}{PART_SUFFIX}", exc) from exc

    # -- pull ------------------------------------------------------------------------------------------
    async def list_remote(self) -> AsyncIterator[RemoteItem]:
        """Every complete regular file under DIR, one directory listed at a time."""
        pending = [""]
        while pending:
            rel_dir = pending.pop()

            def scan(d: str = rel_dir) -> list[tuple[str, bool, int]]:
                out = []
                with os.scandir(self.root / d) as it:
                    for e in it:
                        st = e.stat(follow_symlinks=False)
                        out.append(
                            (e.name, stat.S_ISDIR(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else -1)
                        )
                return out

            try:
                entries = await anyio.to_thread.run_sync(scan)
            except OSError as exc:
                raise SourceError(f"cannot list {self.root / rel_dir}: {exc.strerror}") from exc
            for name, is_dir, size in sorted(entries):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                if is_dir:
                    pending.append(rel)
                elif size >= 0 and not name.endswith(PART_SUFFIX):
                    yield RemoteItem(rel=rel, size=size, digests={}, ref=rel)

    async def read(self, item: RemoteItem, offset: int) -> AsyncIterator[bytes]:
        """The bytes of ``item`` from ``offset``, in 1 MiB blocks read in a thread."""
        path = self.root.joinpath(*safe_rel(item.rel).parts)
        try:
            fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        except OSError as exc:
            raise SourceError(f"cannot read {item.rel}: {exc.strerror}") from exc
        try:
            while block := await anyio.to_thread.run_sync(os.pread, fd, READ_BLOCK, offset):
                offset += len(block)
                yield block
        finally:
            os.close(fd)
