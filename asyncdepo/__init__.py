"""asyncdepo: an asyncio transfer engine for scientific datasets and public archives.

Public API::

    from asyncdepo import push, pull, EngineConfig, Reporter
    report = anyio.run(push, "/data/run42", adapter, EngineConfig(transfers=8))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncdepo.config import EngineConfig
from asyncdepo.errors import (
    AuthError,
    Cancelled,
    ConflictError,
    DepoError,
    IntegrityError,
    PermanentError,
    QuotaError,
    SourceChangedError,
    SourceError,
    TransferError,
    TransientError,
    UsageError,
    ValidationError,
)
from asyncdepo.events import Reporter

if TYPE_CHECKING:
    from asyncdepo.engine.pull import pull
    from asyncdepo.engine.report import RunReport
    from asyncdepo.engine.scheduler import push

# the engines load on first use: a command that only pulls (or only prints help) does not import the push
# engine, and none of them pays for what it does not run
_LAZY = {"push": "asyncdepo.engine.scheduler", "pull": "asyncdepo.engine.pull",
         "RunReport": "asyncdepo.engine.report", "Job": "asyncdepo.engine.report"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'asyncdepo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), "RunReport" if name == "Job" else name)
    globals()[name] = value
    return value


__all__ = (
    "AuthError", "Cancelled", "ConflictError", "DepoError", "EngineConfig", "IntegrityError", "Job",
    "PermanentError", "QuotaError", "Reporter", "RunReport", "SourceChangedError", "SourceError",
    "TransferError", "TransientError", "UsageError", "ValidationError", "pull", "push",
)
