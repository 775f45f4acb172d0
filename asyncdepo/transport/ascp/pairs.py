"""One ascp session over a ``--file-pair-list``, with progress reported per pair: what the adapters that move
many files per session share (EMPIAR uploads, ImmPort pulls).

ascp names a file in its progress by the path it has on the side that writes it (a receive) or reads it (a
send), relative to the transfer root when it lies under it, or by the pair's destination on the console
(:mod:`asyncdepo.transport.ascp.runner` states the rules). :func:`run_pairs` maps every such name back to the
caller's key for the pair; the map holds two names per pair, so it is as large as the session, not the job.

``-l`` is the session's rate: :func:`capped_rate` is the lower of an explicit rate and a byte budget (the
session's share of ``--bwlimit``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from asyncdepo.transport.ascp.options import (
    _RATE,
    NO_SECRETS,
    AscpOptions,
    AscpProgress,
    AscpResult,
    AscpSecrets,
)
from asyncdepo.transport.ascp.runner import run_once

__all__ = ("Pair", "PairProgress", "capped_rate", "pair_safe", "rate_bits", "run_pairs")

#: (the pair's key, or "" when ascp named a file of no pair; bytes moved since the last report; the file is done)
PairProgress = Callable[[str, int, bool], None]
_UNITS = {"": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}  # ascp's -l: kilobits per second unless a suffix says


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    """One line pair: ``source`` (local for a send, remote for a receive), ``dest`` relative to the session's
    target directory, and ``key``, the name progress is reported under."""

    source: str
    dest: str
    key: str


def pair_safe(path: str) -> bool:
    """Whether ``path`` can go in a pair list (the list is line-based: no newline or carriage return)."""
    return "\n" not in path and "\r" not in path


def rate_bits(rate: str) -> float:
    """ascp's ``-l`` text (``200M``, ``500K``, ``1000``) in bits per second."""
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"not an ascp rate: {rate!r}")
    number = rate.rstrip("KMGkmg")
    return float(number) * _UNITS[rate[len(number):].upper()]


def capped_rate(rate: str | None, bytes_per_s: float | None) -> str | None:
    """The session's ``-l``: ``rate`` (ascp's text) capped by ``bytes_per_s`` (a byte budget), whichever is lower;
    None when neither is given."""
    if not bytes_per_s:
        return rate
    budget = f"{max(1, round(bytes_per_s * 8 / 1000))}K"
    if rate is None or rate_bits(budget) < rate_bits(rate):
        return budget
    return rate


async def run_pairs(opts: AscpOptions, pairs: Sequence[Pair], target: str, *, secrets: AscpSecrets = NO_SECRETS,
                    on_progress: PairProgress | None = None) -> AscpResult:
    """Run one ascp session moving ``pairs`` (``opts.mode`` says the direction; ``target`` is the destination
    directory: remote for a send, local for a receive) and report progress per pair key.

    :raises errors.UsageError: no pairs, or a path that a pair list cannot hold (see :func:`pair_safe`).
    :raises: as :func:`~asyncdepo.transport.ascp.runner.run_once` (AuthError, TransientError, PermanentError).
    """
    from asyncdepo import errors

    if not pairs:
        raise errors.UsageError("nothing to transfer: no file pairs given to ascp")
    bad = next((p for p in pairs if not (pair_safe(p.source) and pair_safe(p.dest))), None)
    if bad is not None:
        raise errors.UsageError(f"ascp cannot name {bad.key!r}: a file list holds one path per line")
    send = opts.mode == "send"
    names: dict[str, str] = {}
    for p in pairs:
        dest = p.dest.lstrip("/")
        names[dest] = p.key
        names[os.path.abspath(p.source) if send else os.path.join(os.path.abspath(target), dest)] = p.key

    def progress(event: AscpProgress) -> None:
        if on_progress is not None:
            key = names.get(event.file) or names.get(event.file.lstrip("/")) or ""
            on_progress(key, event.delta, event.done)

    def write(folder: str) -> Path:
        path = Path(folder) / "pairs.txt"
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            for p in pairs:
                f.write(f"{p.source}\n{p.dest}\n")
        return path

    folder = await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="asyncdepo-ascp-"))
    try:
        listing = await anyio.to_thread.run_sync(write, folder)
        return await run_once(opts, [], target, secrets=secrets, on_progress=progress, pair_list=listing)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
