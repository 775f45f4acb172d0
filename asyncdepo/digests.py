"""Several digests in one pass (md5, sha1, sha256, sha512, blake2b, xxh3, blake3, crc64nvme, crc32c, crc32).

``MultiHash.update`` is called from worker threads, never on the event loop: hashlib, xxhash, blake3 and
awscrt release the GIL on large buffers, so two threads hash at twice the speed of one (measured on a 2-core machine).
The slowest digest an archive requires (md5, ~0.6 GB/s a core) sets the per-core ceiling, so callers
ask only for what a target checks plus what the user asked for with ``--hash``.

Which digest for what:

* **xxh3** (xxh3-128, ~20 GB/s a core) is the whole-file identity the journal and the report keep, unless an
  archive requires md5 (then md5, once).
* **CRCs** are what servers verify cheaply: S3's additional checksums (``x-amz-checksum-crc64nvme``,
  ``-crc32c``, ``-crc32``) and tus's ``crc32``. A CRC of a concatenation is composed from the CRCs of its
  pieces and the length of the second (:func:`combine`), so a multipart upload's full-object value costs
  no second pass over the bytes. CRC-64/NVME and CRC-32C come from awscrt (the AWS common runtime's C
  library, hardware-accelerated: ~9.8 GB/s a core here); CRC-32 is zlib's (3.4 GB/s here, against 2.4 for
  awscrt's on this CPU), composed with awscrt's ``combine_crc32``. The ``crc32c`` package is faster
  (~14.8 GB/s) but has no combine; awscrt has combine for all three, so no CRC code of our own.
  A CRC's hex digest is its value as a big-endian number (S3 sends the base64 of those bytes:
  :func:`to_base64`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
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


class _Crc:
    """A CRC as a hasher: ``update`` continues the running value, ``hexdigest`` is the big-endian hex."""

    __slots__ = ("_fn", "_value", "_width")

    def __init__(self, fn: Callable[[Any, int], int], width: int) -> None:
        self._fn = fn
        self._value = 0
        self._width = width

    def update(self, data: Any, /) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return format(self._value, f"0{self._width * 2}x")


def _crc64nvme() -> _Hasher:
    from awscrt import checksums

    return _Crc(checksums.crc64nvme, 8)


def _crc32c() -> _Hasher:
    from awscrt import checksums

    return _Crc(checksums.crc32c, 4)


def _crc32() -> _Hasher:
    import zlib

    return _Crc(zlib.crc32, 4)


FACTORIES: dict[str, Callable[[], _Hasher]] = {
    "md5": lambda: hashlib.md5(usedforsecurity=False),
    "sha1": lambda: hashlib.sha1(usedforsecurity=False),
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
    "blake2b": hashlib.blake2b,
    "xxh3": _xxh3,
    "blake3": _blake3,
    "crc64nvme": _crc64nvme,
    "crc32c": _crc32c,
    "crc32": _crc32,
}
#: digests whose value for a concatenation is composed from the pieces' values (:func:`combine`)
COMBINABLE = frozenset({"crc64nvme", "crc32c", "crc32"})
#: the whole-file identity digest when the target requires none (see the module docstring)
IDENTITY = "xxh3"


def combine(algo: str, first: str, second: str, second_length: int) -> str:
    """The hex digest of ``A + B`` from the hex digests of ``A`` and ``B`` and the length of ``B``.

    :raises ValueError: ``algo`` is not in :data:`COMBINABLE`.
    """
    from awscrt import checksums

    fns: dict[str, tuple[Callable[[int, int, int], int], int]] = {
        "crc64nvme": (checksums.combine_crc64nvme, 8),
        "crc32c": (checksums.combine_crc32c, 4),
        "crc32": (checksums.combine_crc32, 4),
    }
    if algo not in fns:
        raise ValueError(f"{algo} values cannot be combined")
    fn, width = fns[algo]
    return format(fn(int(first, 16), int(second, 16), second_length), f"0{width * 2}x")


def to_base64(hexdigest: str) -> str:
    """The base64 of a digest's bytes (``Content-MD5``, ``x-amz-checksum-*``, tus ``Upload-Checksum``)."""
    import base64

    return base64.b64encode(bytes.fromhex(hexdigest)).decode("ascii")


def from_base64(text: str) -> str:
    """The hex digest behind a base64 value; "" when ``text`` is not valid base64."""
    import base64
    import binascii

    try:
        return base64.b64decode(text.strip(), validate=True).hex()
    except (binascii.Error, ValueError):
        return ""


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
    """Feeds the same bytes to several hashers.

    ``composed`` names digests (of :data:`COMBINABLE`) that are not fed bytes but built from the digests of
    consecutive pieces with :meth:`add_piece` (a multipart upload's full-object CRC from its parts' CRCs).
    """

    __slots__ = ("_composed", "_fixed", "_hashers", "_order")

    def __init__(self, algos: Iterable[str], composed: Iterable[str] = ()) -> None:
        algos = tuple(algos)
        skip = set(composed) & COMBINABLE
        self._order = algos
        self._hashers = {a: FACTORIES[a]() for a in algos if a not in skip}
        self._composed: dict[str, str | None] = {a: None for a in algos if a in skip}
        self._fixed: dict[str, str] | None = None

    @property
    def algorithms(self) -> tuple[str, ...]:
        return self._order

    @property
    def fed(self) -> tuple[str, ...]:
        """The algorithms ``update`` feeds (all but the composed ones)."""
        return tuple(self._hashers)

    def update(self, data: Any) -> None:
        for h in self._hashers.values():
            h.update(data)

    def add_piece(self, digests: Mapping[str, str], length: int) -> None:
        """Append a piece of ``length`` bytes whose digests (at least the composed ones) are known."""
        for a, current in self._composed.items():
            value = digests[a]
            self._composed[a] = value if current is None else combine(a, current, value, length)

    def hexdigests(self) -> dict[str, str]:
        if self._fixed is not None:
            return dict(self._fixed)
        out = {a: h.hexdigest() for a, h in self._hashers.items()}
        for a, value in self._composed.items():
            out[a] = value if value is not None else FACTORIES[a]().hexdigest()
        return {a: out[a] for a in self._order}

    def set_final(self, digests: dict[str, str]) -> None:
        """Take the final digests from a one-shot hash of the whole content (nothing was or will be fed),
        so a file that fits in one chunk is hashed once for both the chunk and the file."""
        self._fixed = {a: digests[a] for a in self._order}


def digest_bytes(data: Any, algos: Iterable[str]) -> dict[str, str]:
    """Hex digests of one buffer (call from a thread for large buffers)."""
    m = MultiHash(algos)
    m.update(data)
    return m.hexdigests()


def _thread_buffer(block: int) -> memoryview:
    """A page-aligned ``block``-byte buffer kept per thread (readinto on a bytearray is ~5x slower on this machine).

    Reused across calls: a fresh anonymous mapping per file costs a page fault and a page clear per 4 KiB
    plus the mapping's teardown — on 1,000 x 1 MiB files that was ~1 core-second per GB, more than reading
    the files (benchmarks/bench_gypsum.py, perf). One buffer per thread that hashes (the I/O limiter bounds
    how many); it goes away with its thread.
    """
    view: memoryview | None = getattr(_LOCAL, "view", None)
    if view is None or len(view) != block:
        import mmap

        view = _LOCAL.view = memoryview(mmap.mmap(-1, block))
    return view


_LOCAL = threading.local()


def hash_path_sync(path: str | Path, algos: Iterable[str], *, start: int = 0, stop: int | None = None,
                   block: int = 1 << 20, into: MultiHash | None = None) -> MultiHash:
    """Hash ``[start, stop)`` of a file in a blocking loop (for threads); returns the MultiHash."""
    m = into or MultiHash(algos)
    view = _thread_buffer(block)  # nothing keeps a view of it once this returns: hashers copy nothing
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
    return m


async def hash_file(path: str | Path, algos: Iterable[str] = ("md5",),
                    limiter: anyio.CapacityLimiter | None = None) -> dict[str, str]:
    """Hex digests of a whole file, computed in a worker thread."""
    names = check_algorithms(algos)
    m = await anyio.to_thread.run_sync(lambda: hash_path_sync(path, names), limiter=limiter)
    return m.hexdigests()
