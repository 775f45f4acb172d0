"""asyncdepo: an asyncio transfer engine for scientific datasets and public archives.

Public API::

    from asyncdepo import push, pull, EngineConfig, Reporter
    report = anyio.run(push, "/data/run42", adapter, EngineConfig(transfers=8))
"""

from __future__ import annotations

from asyncdepo.config import EngineConfig
from asyncdepo.engine.pull import pull
from asyncdepo.engine.scheduler import RunReport, push
from asyncdepo.errors import (AuthError, Cancelled, ConflictError, DepoError, IntegrityError, PermanentError,
                              QuotaError, SourceChangedError, SourceError, TransferError, TransientError,
                              UsageError, ValidationError)
from asyncdepo.events import Reporter

Job = RunReport  # a job's outcome; the journal holds its history

__all__ = (
    "AuthError", "Cancelled", "ConflictError", "DepoError", "EngineConfig", "IntegrityError", "Job",
    "PermanentError", "QuotaError", "Reporter", "RunReport", "SourceChangedError", "SourceError",
    "TransferError", "TransientError", "UsageError", "ValidationError", "pull", "push",
)
