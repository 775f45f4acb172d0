"""The engine facade adapters may use: hashing a file off the loop. Nothing else of the engine is theirs to
import (the transport helpers they need live in :mod:`asyncdepo.transport`, the shared types in
:mod:`asyncdepo.contract`). An adapter that needs more of the engine adds it here, so the import-linter contract
"Adapters use the engine only through its facade" keeps naming the one door."""

from __future__ import annotations

from asyncdepo.digests import hash_file

__all__ = ("hash_file",)
