"""Several digests in one pass (md5, sha1, sha256, sha512, blake2b, xxh3, blake3).

``MultiHash.update`` is called from worker threads, never on the event loop: hashlib, xxhash and
blake3 release the GIL on large buffers, so two threads hash at twice the speed of one (PERF-FACTS).
The slowest digest an archive requires (md5, ~670 MB/s a core) sets the per-core ceiling, so callers
ask only for what a target checks plus what the user asked for with ``--hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import anyio


class _Hasher(Protocol):
    # object, not None: blake3's update returns the hasher (for chaining); nobody uses the result
    def update(self, data: Any, /) -> object: ...
    def hexdigest(self) -> str: ...


def _xxh3() -> _Hasher:
    import xxhash

    return xxhash.xxh3_128()


def _blake3() -> _Hasher:
    import blake3

    return blake3.blake3(max_threads=1)


FACTORIES: dict[str, Callable[[], _Hasher]] = {
    "md5": lambda: hashlib.md5(usedforsecurity=False),
    "sha1": lambda: hashlib.sha1(usedforsecurity=False),
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
    "blake2b": hashlib.blake2b,
    "xxh3": _xxh3,
    "blake3": _blake3,
}


def check_algorithms(algos: Iterable[str]) -> tuple[str, ...]:
    """Normalise and validate digest names; raises ValueError naming the unknown one."""
    out: list[str] = []
    for a in algos:
        name = a.strip().lower().replace("-", "")
        if name not in FACTORIES:
            raise ValueError(f"unknown digest {a!r}; choose from {', '.join(FACTORIES)}")
        if name not in out:
            out.append(name)
    return tuple(out)


class MultiHash:
    """Feeds the same bytes to several hashers."""

    __slots__ = ("_fixed", "_hashers")

    def __init__(self, algos: Iterable[str]) -> None:
        self._hashers = {a: FACTORIES[a]() for a in algos}
        self._fixed: dict[str, str] | None = None

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(self._hashers)

    def update(self, data: Any) -> None:
        for h in self._hashers.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        if self._fixed is not None:
            return dict(self._fixed)
        return {a: h.hexdigest() for a, h in self._hashers.items()}

    def set_final(self, digests: dict[str, str]) -> None:
        """Take the final digests from a one-shot hash of the whole content (nothing was or will be fed),
        so a file that fits in one chunk is hashed once for both the chunk and the file."""
        self._fixed = {a: digests[a] for a in self._hashers}


def digest_bytes(data: Any, algos: Iterable[str]) -> dict[str, str]:
    """Hex digests of one buffer (call from a thread for large buffers)."""
    m = MultiHash(algos)
    m.update(data)
    return m.hexdigests()


def hash_path_sync(path: str | Path, algos: Iterable[str], *, start: int = 0, stop: int | None = None,
                   block: int = 1 << 20, into: MultiHash | None = None) -> MultiHash:
    """Hash ``[start, stop)`` of a file in a blocking loop (for threads); returns the MultiHash."""
    m = into or MultiHash(algos)
    import mmap
    import os

    buf = mmap.mmap(-1, block)  # page-aligned: readinto on a bytearray is ~5x slower (PERF-FACTS)
    view = memoryview(buf)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = start
            while stop is None or pos < stop:
                want = block if stop is None else min(block, stop - pos)
                n = os.preadv(fd, [view[:want]], pos)
                if n <= 0:
                    break
                m.update(view[:n])
                pos += n
        finally:
            os.close(fd)
    finally:
        view.release()
        buf.close()
    return m


async def hash_file(path: str | Path, algos: Iterable[str] = ("md5",),
                    limiter: anyio.CapacityLimiter | None = None) -> dict[str, str]:
    """Hex digests of a whole file, computed in a worker thread."""
    names = check_algorithms(algos)
    m = await anyio.to_thread.run_sync(lambda: hash_path_sync(path, names), limiter=limiter)
    return m.hexdigests()
