"""Adapters: one module (or small package) per archive, each translating a job into that archive's API.

Every adapter implements :mod:`asyncdepo.contract` and registers its URL scheme with
:func:`asyncdepo.contract.register`; :func:`lookup` imports the built-in ones on first use.
"""

from __future__ import annotations

import importlib

from asyncdepo.contract import REGISTRY, AdapterFactory

BUILTINS = ("local", "tus", "s3")
_loaded = False


def load_builtins() -> None:
    """Import the built-in URL-scheme adapters so they register themselves. Their modules import only
    required dependencies; an optional one (aiobotocore for ``s3``) is imported on first use."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTINS:
        importlib.import_module(f"asyncdepo.adapters.{name}")


def lookup(scheme: str) -> AdapterFactory | None:
    """The factory registered for ``scheme`` (``file``, ``tus+http``, ``s3``), or None."""
    load_builtins()
    return REGISTRY.get(scheme)


def schemes() -> list[str]:
    """Registered URL schemes, for help and error messages."""
    load_builtins()
    return sorted(REGISTRY)
