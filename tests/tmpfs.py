"""A small tmpfs for the tests of a full disk: a real ENOSPC from the kernel, not a Python stand-in.

Mounting needs root (CI and these machines run the suite as root); where it cannot be done the test fails,
loudly, rather than skipping what it proves.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """``path`` (created) as a tmpfs of ``size`` (``"1m"``, ``"256k"``) while the block runs; unmounted after
    (lazily: a file a test left open does not keep it)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs for a full-disk case (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    """Change a mounted tmpfs's options in place: ``"size=32m"`` (space freed), ``"ro"``, ``"rw"``."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
