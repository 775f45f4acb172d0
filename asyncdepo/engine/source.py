"""Lazy dataset walk with os.scandir: Item(path, rel, size, mtime_ns), filtered by globs.

The walk runs in a worker thread and hands items to the event loop in small batches, so walking a
million files never holds them all: memory is the stack of directories still to visit plus one batch.
Symbolic links are skipped unless ``follow_symlinks`` (then directory loops are cut by (dev, inode));
sockets, FIFOs and devices are skipped with a warning through ``on_skip``. A directory that cannot be
listed, or an entry that cannot be stat'ed, goes to ``on_error`` when one is given (the caller makes it a
failure: the target would otherwise silently miss files), else to ``on_skip``. Directory order is the
file system's (stable for an unchanged directory), not sorted, so a huge directory is never listed
in memory.

Names: ``rel`` is built from ``os.scandir`` on ``str`` paths, so a name that is not UTF-8 arrives with
surrogate escapes (``os.fsdecode``) and maps back to the same bytes in every ``os`` call.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path

import anyio

from asyncdepo.contract import Item
from asyncdepo.errors import SourceError, UsageError

BATCH = 256


def selected(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether ``--include``/``--exclude`` keep ``rel`` (the same rule for a walk and for a pull's listing)."""
    return (not include or _match(rel, include)) and not (exclude and _match(rel, exclude))


def _match(rel: str, globs: tuple[str, ...]) -> bool:
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(base, g) for g in globs)


def check_source(root: Path) -> Path:
    """The absolute source path; raises UsageError when it does not exist or cannot be read."""
    if not root.exists():
        raise UsageError(f"source {str(root)!r} does not exist")
    if not os.access(root, os.R_OK):
        raise UsageError(f"source {str(root)!r} is not readable")
    return root.resolve()


def iter_items(root: Path, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               follow_symlinks: bool = False,
               on_skip: Callable[[str, str], None] | None = None,
               on_error: Callable[[str, str], None] | None = None) -> Generator[Item, None, None]:
    """Blocking generator of the regular files under ``root`` (or ``root`` itself when it is a file)."""
    skip = on_skip or (lambda rel, why: None)
    error = on_error or skip
    root = check_source(root)
    if root.is_file():
        st = root.stat()
        yield Item(str(root), root.name, st.st_size, st.st_mtime_ns)
        return
    seen: set[tuple[int, int]] = set()
    st0 = root.stat()
    seen.add((st0.st_dev, st0.st_ino))
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        dpath, drel = stack.pop()
        try:
            it = os.scandir(dpath)
        except OSError as exc:
            error(drel or ".", f"cannot list directory: {exc.strerror}")
            continue
        with it:
            for entry in it:
                rel = f"{drel}/{entry.name}" if drel else entry.name
                try:
                    if entry.is_symlink() and not follow_symlinks:
                        skip(rel, "symbolic link (use --follow-symlinks to follow)")
                        continue
                    st = entry.stat(follow_symlinks=True)
                except OSError as exc:
                    error(rel, f"cannot stat: {exc.strerror}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        skip(rel, "directory loop")
                        continue
                    seen.add(key)
                    stack.append((entry.path, rel))
                elif stat.S_ISREG(st.st_mode):
                    if include and not _match(rel, include):
                        continue
                    if exclude and _match(rel, exclude):
                        continue
                    yield Item(entry.path, rel, st.st_size, st.st_mtime_ns)
                else:
                    skip(rel, "not a regular file (socket, FIFO or device)")


async def walk(root: Path | str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               follow_symlinks: bool = False,
               on_skip: Callable[[str, str], None] | None = None,
               on_error: Callable[[str, str], None] | None = None) -> AsyncIterator[list[Item]]:
    """Batches of Items from a walk running in a worker thread (see the module docstring); ``on_skip`` and
    ``on_error`` are called on the event loop, before the batch that follows them (an exception they raise
    ends the walk).

    :raises UsageError: the source does not exist or cannot be read.
    """
    path = Path(root)
    await anyio.to_thread.run_sync(check_source, path)
    skipped: list[tuple[str, str, bool]] = []
    gen = iter_items(path, include, exclude, follow_symlinks, lambda r, w: skipped.append((r, w, False)),
                     lambda r, w: skipped.append((r, w, on_error is not None)))

    def batch() -> list[Item]:
        out: list[Item] = []
        for item in gen:
            out.append(item)
            if len(out) >= BATCH:
                break
        return out

    try:
        while True:
            items = await anyio.to_thread.run_sync(batch)
            noted, skipped[:] = list(skipped), []
            for rel, why, failed in noted:
                if failed and on_error is not None:
                    on_error(rel, why)
                elif on_skip is not None:
                    on_skip(rel, why)
            if not items:
                return
            yield items
    except OSError as exc:
        raise SourceError(f"walking {path}: {exc}") from None
    finally:
        gen.close()
