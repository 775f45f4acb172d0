"""What a watch asks of the file system, in a worker thread: the stat of a file, the files an event names, the
markers of a directory and the files they release (see :mod:`asyncdepo.engine.watch` for the rules). Every
function here blocks; the watch calls them through ``anyio.to_thread``."""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from asyncdepo.contract import Item
from asyncdepo.engine.source import iter_items, selected
from asyncdepo.errors import UsageError


def name_of(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def sent(row: dict[str, object] | None, it: Item, first: bool) -> bool:
    """Whether the journal says ``it`` needs nothing more (done, or failed for good, as it is now)."""
    if row is None or (row.get("size"), row.get("mtime_ns")) != (it.size, it.mtime_ns):
        return False
    return row.get("state") == "done" or (row.get("state") == "failed" and not row.get("transient") and not first)


def stat_file(path: str, follow: bool) -> os.stat_result | None:
    """Blocking: the stat of a regular file at ``path`` (None: gone, a directory, a link not followed...)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                return None
            st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def look(root: Path, paths: list[str], include: tuple[str, ...], exclude: tuple[str, ...], follow: bool,
          ready: str | None) -> tuple[list[Item], list[str]]:
    """Blocking: the files that event ``paths`` name now (a directory stands for the files in it), and the
    directories walked; in marker mode, only the files a marker releases (a marker stands for what it
    releases)."""
    base = str(root)
    files: dict[str, Item] = {}
    dirs: set[str] = set()
    walked: list[str] = []
    for path in paths:
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        if rel == "." or rel.startswith("../"):
            continue
        try:
            lst = os.lstat(path)
        except OSError:
            continue  # gone already
        if stat.S_ISLNK(lst.st_mode) and not follow:
            continue
        if stat.S_ISDIR(lst.st_mode) or (follow and os.path.isdir(path)):
            try:
                inside = list(iter_items(Path(path), follow_symlinks=follow))
            except (UsageError, OSError):
                continue  # gone again
            walked.append(path)
            for it in inside:
                sub = f"{rel}/{it.rel}"
                if ready is not None and fnmatch.fnmatchcase(name_of(sub), ready):
                    dirs.add(os.path.dirname(it.path))
                elif selected(sub, include, exclude):
                    files[sub] = Item(it.path, sub, it.size, it.mtime_ns)
            continue
        if ready is not None and fnmatch.fnmatchcase(name_of(rel), ready):
            dirs.add(os.path.dirname(path))  # a marker: what it releases is decided below
            continue
        st = stat_file(path, follow)
        if st is not None and selected(rel, include, exclude):
            files[rel] = Item(path, rel, st.st_size, st.st_mtime_ns)
    if ready is None:
        return list(files.values()), walked
    for d in dirs:  # every file beside a marker that changed is looked at again
        drel = os.path.relpath(d, base).replace(os.sep, "/")
        try:
            with os.scandir(d) as entries:
                for entry in entries:
                    rel = entry.name if drel == "." else f"{drel}/{entry.name}"
                    if rel in files or fnmatch.fnmatchcase(entry.name, ready) or not selected(rel, include, exclude):
                        continue
                    st = stat_file(entry.path, follow)
                    if st is not None:
                        files[rel] = Item(entry.path, rel, st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return released(list(files.values()), ready), walked


def markers(directory: str, glob: str) -> list[tuple[int, str | None]]:
    """Blocking: (mtime_ns, the file it is named after or None for the whole directory) of each marker."""
    out: list[tuple[int, str | None]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if not fnmatch.fnmatchcase(entry.name, glob):
                    continue
                try:
                    mtime = entry.stat().st_mtime_ns
                except OSError:
                    continue
                name = entry.name
                covers = None
                for i in range(len(name) - 1, 0, -1):  # the longest "<file>." prefix that names a file
                    if name[i] == "." and not fnmatch.fnmatchcase(name[:i], glob) and \
                            os.path.isfile(os.path.join(directory, name[:i])):
                        covers = name[:i]
                        break
                out.append((mtime, covers))
    except OSError:
        pass
    return out


def released(items: list[Item], glob: str) -> list[Item]:
    """Blocking: the ``items`` a marker beside them releases (see the module docstring)."""
    cache: dict[str, list[tuple[int, str | None]]] = {}
    out = []
    for it in items:
        directory, name = os.path.split(it.path)
        marks = cache.get(directory)
        if marks is None:
            if len(cache) > 64:
                cache.clear()
            marks = cache[directory] = markers(directory, glob)
        if any(mtime >= it.mtime_ns and covers in (None, name) for mtime, covers in marks):
            out.append(it)
    return out
