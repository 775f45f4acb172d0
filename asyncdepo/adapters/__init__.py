"""Adapters: one module per archive, each translating a job into that archive's API (see ``base``)."""

from __future__ import annotations

import importlib

BUILTINS = ("local", "tus", "s3")


def load_builtins() -> None:
    """Import the built-in URL-scheme adapters so they register themselves; missing optional deps are skipped."""
    for name in BUILTINS:
        try:
            importlib.import_module(f"asyncdepo.adapters.{name}")
        except ModuleNotFoundError as exc:  # an optional dependency (e.g. aiobotocore) is absent
            if exc.name and exc.name.startswith("asyncdepo") and exc.name != f"asyncdepo.adapters.{name}":
                raise
