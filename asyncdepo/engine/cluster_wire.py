"""What travels between a cluster's coordinator (:mod:`asyncdepo.engine.cluster`) and its workers
(:mod:`asyncdepo.engine.cluster_worker`): the job's spec and its batches (pickled into the tasks, so never a
secret), and the batches' results. Plain data; no dask import here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from asyncdepo import errors
from asyncdepo.config import EngineConfig
from asyncdepo.contract import Adapter
from asyncdepo.errors import DepoError
from asyncdepo.transport.pacer import first_leaf


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What every batch task of a job shares; secret-free (it is pickled into the task graph).

    :param recipe: builds a fresh, secret-free adapter from the config (e.g. a picklable dataclass of the
        target URL and options); the handoff adds credentials on the worker.
    :param topic: the Dask event topic progress goes to, and the prefix of the batches' checkpoints.
    :param channel: the name of the run's :class:`~asyncdepo.engine.cluster_worker.SecretChannel` plugin.
    :param requests: a job-wide cap on requests in flight (every worker together), held by a Dask
        ``Semaphore`` named ``topic + "-requests"``; None: each worker's ``--transfers`` only.
    """

    job: str
    recipe: Callable[[EngineConfig], Adapter]
    config: EngineConfig
    topic: str
    channel: str
    requests: int | None = None


@dataclasses.dataclass(frozen=True)
class Batch:
    """Items for one task. ``items`` are (path, rel, size, mtime_ns); ``saved`` the journaled ``remote``
    state of those that have one, ``chunks`` their journaled chunk digests ([offset, length, digest]); ``known``
    digests computed before the start; ``rate`` this worker's share of ``--bwlimit`` (bytes/s, None: no
    limit)."""

    key: str
    items: tuple[tuple[str, str, int, int], ...]
    saved: dict[str, Any]
    known: dict[str, dict[str, str]]
    rate: float | None
    chunks: dict[str, list[list[Any]]] = dataclasses.field(default_factory=dict)


#: error attributes that travel with a WireError (those of the classes in :mod:`asyncdepo.errors`)
_ATTRS = ("path", "free", "status", "retry_after", "offset", "field", "holder")


@dataclasses.dataclass(frozen=True)
class WireError:
    """An error as it travels back to the coordinator: its class in :mod:`asyncdepo.errors` (the nearest one
    for an adapter's own subclass; ``DepoError`` for an exception outside the tree, its type in the message),
    its message, hint and attributes (a DiskFullError's path and free bytes, a status...). Plain data, rebuilt
    on the coordinator by :meth:`rebuild`: a pickled exception may not unpickle (keyword-only constructors)
    and would drag its traceback's frames along. Messages hold no secret (see :mod:`asyncdepo.errors`)."""

    kind: str
    message: str
    hint: str | None = None
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, exc: BaseException) -> WireError:
        err = first_leaf(exc)
        if not isinstance(err, DepoError):
            return cls("DepoError", f"{type(err).__name__}: {err}")
        kind = next(c.__name__ for c in type(err).__mro__ if getattr(errors, c.__name__, None) is c)
        attrs = {a: getattr(err, a) for a in _ATTRS if a in vars(err)}
        return cls(kind, str(err), err.hint, attrs)

    def rebuild(self) -> DepoError:
        """The error, of its class, with its message, hint and attributes."""
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, DepoError)):
            cls = DepoError
        err = cls.__new__(cls)
        Exception.__init__(err, self.message)
        if self.hint is not None:
            err.hint = self.hint
        for name, value in self.attrs.items():
            setattr(err, name, value)
        return err


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """The outcome of one item: ``row`` holds the fields to journal; ``error`` is set when it failed;
    ``left``: not finished because the run stopped (a full disk) or the batch's sessions ended early (see
    ``BatchResult.fatal``) — its row says what the target holds."""

    rel: str
    row: dict[str, Any]
    sent: int = 0
    error: WireError | None = None
    earlier: bool = False  # finished by an earlier run of this batch (on a worker that died since)
    left: bool = False


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """A batch's outcome: per-item results, the adapter's ``handback``; ``fatal``: the error that ended the
    batch's sessions early (a refused login, which ends the job on one node; its ``left`` items were not
    sent); ``stopped``: the error on which the worker stopped the run's batches (a full disk; its ``left``
    items stay as they are)."""

    worker: str
    items: list[ItemResult]
    handback: dict[str, Any] = dataclasses.field(default_factory=dict)
    fatal: WireError | None = None
    stopped: WireError | None = None  # the worker stopped the run on this error (a full disk)


def checkpoint_name(spec: JobSpec, batch_key: str) -> str:
    return f"{spec.topic}-{batch_key}"

